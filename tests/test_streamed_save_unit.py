"""Writing a data set tensor by tensor (training/streamed_safetensors.py, training/dataset_file.py plan and shards,
lora/file_format.py claims), without a server: the streamed file holds what the safetensors library's own writer
holds (tensor by tensor, metadata included) and both readers read it; each tensor is made only when its bytes are
due; shards split by size; a failing write leaves nothing visible."""
from __future__ import annotations

import io
import sys
import weakref
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora import file_format  # noqa: E402
from training import dataset_file, streamed_safetensors  # noqa: E402
from training.mapped_safetensors import open_mapped  # noqa: E402

pytestmark = pytest.mark.fast


def data_set(count: int, shared: bool, seed: int = 0) -> tuple[list[torch.Tensor], list[list]]:
    g = torch.Generator().manual_seed(seed)
    batch = torch.randn(count, 4, 6, 6, generator=g)
    samples = list(batch)  # rows of one batch, as the node gets them (views)
    one = [torch.randn(1, 7, 16, generator=g).half(), {"pooled_output": torch.randn(1, 8, generator=g),
                                                        "guidance": 3.5, "attention_mask": torch.ones(1, 7).long()}]
    own = [[torch.randn(1, 5 + i, 16, generator=g).bfloat16(), {"pooled_output": None}] for i in range(count)]
    return samples, ([one] * count if shared else own)


def streamed(path: Path, entries, metadata) -> None:
    with open(path, "wb") as out:
        streamed_safetensors.write(out, entries, metadata)


@pytest.mark.parametrize("shared", [False, True])
def test_the_streamed_file_holds_what_the_librarys_writer_wrote(tmp_path, shared):
    samples, captions = data_set(5, shared)
    tensors, metadata = dataset_file.pack(samples, captions)
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(old), metadata=metadata)
    new = tmp_path / "new.safetensors"
    streamed(new, *dataset_file.plan(samples, captions))
    for reader in ("safetensors", "mapped"):
        if reader == "safetensors":
            with safe_open(str(new), framework="pt") as f, safe_open(str(old), framework="pt") as g:
                assert f.metadata() == g.metadata() == metadata
                assert sorted(f.keys()) == sorted(g.keys())
                for key in g.keys():
                    a, b = f.get_tensor(key), g.get_tensor(key)
                    assert a.dtype == b.dtype and torch.equal(a, b), key
        else:
            got, got_meta = open_mapped(new)
            assert got_meta == metadata and set(got) == set(tensors)
            assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert new.stat().st_size == old.stat().st_size  # same header size rule (8-byte padding) and the same bytes


def test_every_dtype_streams_and_reads_back(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, 2, generator=g).half(), "i64": torch.arange(-3, 9), "bool":
               torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "strided": torch.randn(4, 6, generator=g).t()}
    path = tmp_path / "all.safetensors"
    streamed(path, streamed_safetensors.entries_of(tensors), {"k": "v"})
    loaded = safetensors.torch.load_file(str(path))
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_each_tensor_is_made_when_its_bytes_are_due_and_dropped_before_the_next():
    made: list[weakref.ref] = []
    writes_before_first_tensor: list[int] = []

    class Recorder(io.BytesIO):
        def write(self, data) -> int:
            if not made:
                writes_before_first_tensor.append(len(data))
            return super().write(data)

    def make() -> torch.Tensor:
        assert all(ref() is None for ref in made), "an earlier tensor is still alive"
        tensor = torch.full((1000,), float(len(made) + 1))
        made.append(weakref.ref(tensor))
        return tensor

    entries = [streamed_safetensors.Entry(n, torch.float32, (1000,), make) for n in "abc"]
    out = Recorder()
    streamed_safetensors.write(out, entries, None)
    assert len(made) == 3
    assert sum(writes_before_first_tensor) == len(streamed_safetensors.header(entries, None)), "the header goes first"
    loaded = safetensors.torch.load(out.getvalue())
    assert [float(loaded[n][0]) for n in "abc"] == [1.0, 2.0, 3.0]


def test_a_tensor_unlike_its_header_entry_stops_the_write():
    bad = streamed_safetensors.Entry("x", torch.float32, (3,), lambda: torch.zeros(4))
    with pytest.raises(ValueError, match="x: made a torch.float32 tensor of shape \\(4,\\)"):
        streamed_safetensors.write(io.BytesIO(), [bad], None)


@pytest.mark.parametrize("shared", [False, True])
def test_shards_hold_at_most_the_size_and_keep_every_item_in_order(shared):
    samples, captions = data_set(10, shared)
    item = samples[0].numel() * 4
    ranges = dataset_file.shards(samples, captions, 3 * item + dataset_file._caption_bytes(captions[-1]) * 3)
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(10))
    for start, stop in ranges:
        entries, _ = dataset_file.plan(samples[start:stop], captions[start:stop])
        assert streamed_safetensors.total_bytes(entries) <= 3 * item + dataset_file._caption_bytes(captions[-1]) * 3
    assert len(ranges) > 1
    assert dataset_file.shards(samples, captions, 1) == [(i, i + 1) for i in range(10)], "one item per shard at least"
    assert dataset_file.shards(samples, captions, 2**40) == [(0, 10)]


def test_a_failing_write_leaves_no_visible_file_and_an_existing_one_is_never_replaced(tmp_path):
    def fails(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise ValueError("stop")

    with pytest.raises(ValueError, match="stop"):
        file_format.claim_new(tmp_path, "set", fails)
    assert list(tmp_path.iterdir()) == []
    first = file_format.claim_new(tmp_path, "set", lambda tmp: Path(tmp).write_bytes(b"1"))
    second = file_format.claim_new(tmp_path, "set", lambda tmp: Path(tmp).write_bytes(b"2"))
    assert (first.name, second.name) == ("set_00001.safetensors", "set_00002.safetensors")
    assert first.read_bytes() == b"1"


def test_a_folder_of_shards_appears_whole_or_not_at_all(tmp_path):
    def fails(folder: Path) -> None:
        (folder / "part_00001.safetensors").write_bytes(b"x")
        raise ValueError("stop")

    with pytest.raises(ValueError, match="stop"):
        file_format.claim_new_folder(tmp_path, "set", fails)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "set_00001").mkdir()
    (tmp_path / "set_00001" / "keep.safetensors").write_bytes(b"k")
    made = file_format.claim_new_folder(tmp_path, "set", lambda f: (f / "part_00001.safetensors").write_bytes(b"y"))
    assert made.name == "set_00002" and (made / "part_00001.safetensors").read_bytes() == b"y"
    assert (tmp_path / "set_00001" / "keep.safetensors").read_bytes() == b"k"
