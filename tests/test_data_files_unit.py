"""The data set file without a server: the memory-mapped safetensors reader (training/mapped_safetensors.py) and the
file's manifest (training/dataset_file.py), including captions stored once for several images."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import dataset_file  # noqa: E402
from training.mapped_safetensors import MappedFileError, open_mapped  # noqa: E402

pytestmark = pytest.mark.fast


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=g).half(), "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(-3, 9), "i32": torch.arange(5, dtype=torch.int32), "u8": torch.arange(250, 256).byte(),
        "i8": torch.arange(-4, 4, dtype=torch.int8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8"] = torch.randn(6, generator=g).to(torch.float8_e4m3fn)
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (equal bytes, whatever the dtype; torch.equal has no float8 kernels)."""
    return t.reshape(-1).contiguous().view(torch.uint8)


def test_mapped_tensors_equal_what_safetensors_wrote(tmp_path):
    tensors = every_dtype()
    path = tmp_path / "all.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"manifest": "{}", "other": "x"})
    mapped, metadata = open_mapped(path)
    assert metadata == {"manifest": "{}", "other": "x"}
    assert set(mapped) == set(tensors)
    for key, value in tensors.items():
        assert mapped[key].dtype == value.dtype and mapped[key].shape == value.shape, key
        assert torch.equal(as_bytes(mapped[key]), as_bytes(value)), key


def test_writing_into_a_mapped_tensor_never_changes_the_file(tmp_path):
    path = tmp_path / "one.safetensors"
    safetensors.torch.save_file({"x": torch.ones(1000)}, str(path))
    before = path.read_bytes()
    mapped, _ = open_mapped(path)
    mapped["x"].mul_(3)
    assert float(mapped["x"][0]) == 3.0
    del mapped
    assert path.read_bytes() == before
    assert torch.equal(open_mapped(path)[0]["x"], torch.ones(1000))


def header_file(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("case, content, message", [
    ("short", b"abc", "shorter than a safetensors header"),
    ("huge header", struct.pack("<Q", 10**9) + b"{}", "header length"),
    ("not json", struct.pack("<Q", 4) + b"{{{{", "not JSON"),
])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, case, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(MappedFileError, match=message):
        open_mapped(path)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}, "does not match its bytes"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "does not match its bytes"),  # past the file's end
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}, "does not match its bytes"),
    ({"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [1]}, "malformed header entry"),
])
def test_a_header_that_does_not_fit_its_bytes_is_refused(tmp_path, entry, message):
    path = header_file(tmp_path / "bad.safetensors", {"t": entry}, b"\0" * 12)
    with pytest.raises(MappedFileError, match=f"tensor 't': .*{message}"):
        open_mapped(path)


def sample_set(shared: bool):
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(3, 4, 2, 2, generator=g)
    samples = list(batch)  # rows of one batch: they share memory, as the node's inputs do
    one = [torch.randn(1, 5, 8, generator=g), {"pooled_output": torch.randn(1, 8, generator=g), "guidance": 3.5}]
    own = [[torch.randn(1, 5, 8, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}] for _ in range(3)]
    return samples, ([one] * 3 if shared else own)


@pytest.mark.parametrize("shared", [False, True])
def test_pack_and_unpack_round_trip_and_a_shared_caption_is_stored_once(tmp_path, shared):
    samples, captions = sample_set(shared)
    tensors, metadata = dataset_file.pack(samples, captions)
    path = tmp_path / "set.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    stored = [k for k in tensors if k.endswith(".cross_attn")]
    assert len(stored) == (1 if shared else 3)
    got_samples, got_captions = dataset_file.unpack(*open_mapped(path), "set")
    assert all(torch.equal(a, b) for a, b in zip(got_samples, samples)) and len(got_samples) == 3
    for got, want in zip(got_captions, captions):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1]["pooled_output"], want[1]["pooled_output"])
        assert got[1].get("guidance") == want[1].get("guidance")
    assert (len({id(c) for c in got_captions}) == 1) == shared, "a stored-once caption loads as one shared entry"


def test_files_of_the_first_format_still_load(tmp_path):
    samples, captions = sample_set(shared=False)
    tensors, metadata = dataset_file.pack(samples, captions)
    manifest = json.loads(metadata["manifest"])
    manifest["format"] = "lora_trainer.dataset/1"
    got_samples, got_captions = dataset_file.unpack(tensors, {"manifest": json.dumps(manifest)}, "old")
    assert len(got_samples) == len(got_captions) == 3


def test_lists_of_tensors_in_a_caption_round_trip(tmp_path):
    """An edit model's reference_latents (one latent per reference, of any size) are stored and read back in order,
    and count towards a shard's size."""
    samples, captions = sample_set(shared=False)
    g = torch.Generator().manual_seed(2)
    references = [[torch.randn(1, 4, 2, 2, generator=g)], [torch.randn(1, 4, 2, 3, generator=g),
                                                           torch.randn(1, 4, 2, 2, generator=g)], []]
    for caption, refs in zip(captions, references):
        if refs:
            caption[1]["reference_latents"] = refs
    tensors, metadata = dataset_file.pack(samples, captions)
    assert json.loads(metadata["manifest"])["format"] == "lora_trainer.dataset/3"
    path = tmp_path / "edit.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    _, got = dataset_file.unpack(*open_mapped(path), "edit")
    for caption, refs in zip(got, references):
        assert len(caption[1].get("reference_latents", [])) == len(refs)
        assert all(torch.equal(a, b) for a, b in zip(caption[1].get("reference_latents", []), refs))
    with_refs = dataset_file._caption_bytes(captions[1])
    assert with_refs == sum(t.numel() * 4 for t in (captions[1][0], captions[1][1]["pooled_output"], *references[1]))


@pytest.mark.parametrize("same_as", [1, 5, -1])
def test_a_caption_naming_one_that_does_not_come_before_it_is_refused(same_as):
    samples, captions = sample_set(shared=True)
    tensors, metadata = dataset_file.pack(samples, captions)
    manifest = json.loads(metadata["manifest"])
    manifest["captions"][1] = {"same_as": same_as}
    with pytest.raises(ValueError, match="dataset: 'x' is not a training data set file of this pack"):
        dataset_file.unpack(tensors, {"manifest": json.dumps(manifest)}, "x")


def rss_file_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


def test_release_gives_back_the_pages_a_read_brought_in_and_owned_copies_only_mapped_tensors(tmp_path):
    from training.mapped_safetensors import owned, release

    values = torch.randn(2**23, generator=torch.Generator().manual_seed(3))  # 32 MB
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({"a": values, "b": values[:10].clone()}, str(path))
    mapped, _ = open_mapped(path)
    before = rss_file_mb()
    assert torch.equal(mapped["a"], values)
    assert rss_file_mb() - before > 24, "reading the tensor brought its pages in"
    release(mapped["a"][5:7])  # any view releases its tensor's storage
    assert rss_file_mb() - before < 4
    assert torch.equal(mapped["a"], values) and torch.equal(mapped["b"], values[:10]), "read again from the file"
    copy = owned(mapped["b"])
    assert copy.untyped_storage().data_ptr() != mapped["b"].untyped_storage().data_ptr()
    assert torch.equal(copy, values[:10])
    assert owned(values) is values
    release(values)  # not mapped: nothing happens


def test_a_read_only_map_reads_and_releases_alike(tmp_path, monkeypatch):
    """Where the kernel refuses a private writable map of the file (strict overcommit), the map is read-only."""
    import mmap

    from training import mapped_safetensors

    monkeypatch.setattr(mapped_safetensors, "_map", lambda f: mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    values = torch.randn(2**22, generator=torch.Generator().manual_seed(4))
    path = tmp_path / "ro.safetensors"
    safetensors.torch.save_file({"a": values}, str(path))
    mapped, _ = open_mapped(path)
    before = rss_file_mb()
    assert torch.equal(mapped["a"], values)
    mapped_safetensors.release(mapped["a"])
    assert rss_file_mb() - before < 4 and torch.equal(mapped["a"], values)
