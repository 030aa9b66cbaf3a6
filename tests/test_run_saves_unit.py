"""Intermediate saves across a resume (issue 21), without a server: the real loop on a tiny torch model, the pack's
IntermediateSaves and load_resume on temporary loras and output folders. A resumed run's saves are all of its run's
saves still on disk — those before the interruption too — and keep_last counts them all."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from test_training_unit import gen, toy_problem  # noqa: E402
from lora.injection import attached  # noqa: E402
from training import loop  # noqa: E402

pytestmark = pytest.mark.fast

IDENTITY = {"run": "test"}
STEPS, EVERY = 10, 2


@pytest.fixture
def pack(tmp_path, monkeypatch):
    """The pack's nodes modules, with ComfyUI's loras and output folders in ``tmp_path``."""
    import harness  # tools/, on the path through conftest.py

    try:
        harness.put_comfyui_on_path()
        harness.load_pack()
        import folder_paths
    except Exception as e:  # no ComfyUI checkout here
        pytest.skip(f"ComfyUI is not importable: {e}")
    folders = getattr(folder_paths, "get_folder_paths")
    monkeypatch.setattr(folder_paths, "get_folder_paths",
                        lambda name: [str(tmp_path / "loras")] if name == "loras" else folders(name))
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    nodes = sys.modules[f"{harness.PACK_NAME}.nodes"]
    return SimpleNamespace(run_saves=nodes.run_saves, options=nodes.training_options, root=tmp_path,
                           LoraWeights=sys.modules[f"{harness.PACK_NAME}.lora.file_format"].LoraWeights)


def run(pack, keep_last: int, stop_after: int | None = None, resume_from: str | None = None):
    """Trains the toy problem for STEPS steps, saving every EVERY under runs/u, from the state ``resume_from`` or
    the start, cancelled once step ``stop_after`` (of the run) is done; returns the saves object."""
    options = pack.options.RunOptions(save_every_n_steps=EVERY, keep_last=keep_last, save_prefix="runs/u")
    resumed = (pack.run_saves.load_resume(resume_from, IDENTITY, STEPS) if resume_from
               else pack.run_saves.Resumed())
    saves = pack.run_saves.IntermediateSaves(
        options, lambda total: pack.LoraWeights({"w": torch.full((2,), float(total))}, {"steps": str(total)}),
        0, IDENTITY, None, [], resumed.saves)
    reports = []
    net, aset, groups, sched, denoise = toy_problem(0)
    callbacks = loop.Callbacks(cancelled=lambda: bool(stop_after and reports and reports[-1].step >= stop_after),
                               step=reports.append, checkpoint_every=EVERY, checkpoint=saves)
    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, denoise, sched,
                            loop.Settings(steps=STEPS, batch_size=2, learning_rate=0.05), gen(0), callbacks,
                            resumed.state)
    assert result.cancelled == (stop_after is not None)
    return saves


def on_disk(pack) -> tuple[list[str], list[str]]:
    """The intermediate LoRAs and training states in the folders, by name."""
    return (sorted(p.name for p in (pack.root / "loras" / "runs").glob("*.safetensors")),
            sorted(p.name for p in (pack.root / "output" / "training_states" / "runs").glob("*.safetensors")))


def names(*steps: int, counter: int = 1) -> list[str]:
    return [f"u_{n}_steps_{counter:05}.safetensors" for n in steps]


def test_a_run_resumed_twice_reports_and_keeps_the_newest_saves_of_the_whole_run(pack):
    first = run(pack, keep_last=3, stop_after=3)
    assert first.steps == [2] and on_disk(pack) == (names(2), names(2))
    second = run(pack, keep_last=3, stop_after=5, resume_from="runs/u_2_steps_00001.safetensors")
    assert second.steps == [2, 4] and on_disk(pack) == (names(2, 4), names(2, 4))
    last = run(pack, keep_last=3, resume_from="runs/u_4_steps_00001.safetensors")
    # saves at 6 and 8 after the second resume; with 3 kept, the one of step 2 (before both resumes) is removed
    assert last.steps == [4, 6, 8]
    assert on_disk(pack) == (names(4, 6, 8), names(4, 6, 8))
    assert [(s.lora_file, s.state_file) for s in last.kept] == [(f"runs/{n}", f"runs/{n}") for n in names(4, 6, 8)]


def test_a_resume_from_an_older_save_continues_that_history(pack):
    """Resumed from step 4 while the stopped attempt also saved at 6: the run's saves are 2, 4 and the new 6 and 8;
    the abandoned attempt's step-6 save is not one of them (nor removed)."""
    run(pack, keep_last=0, stop_after=7)
    assert on_disk(pack)[0] == names(2, 4, 6)
    resumed = run(pack, keep_last=0, resume_from="runs/u_4_steps_00001.safetensors")
    assert resumed.steps == [2, 4, 6, 8]
    assert [s.lora_file for s in resumed.kept] == [f"runs/{n}" for n in names(2, 4) + names(6, counter=2) + names(8)]
    assert on_disk(pack)[0] == sorted(names(2, 4, 6, 8) + names(6, counter=2))


def test_saves_removed_by_hand_are_not_reported(pack):
    run(pack, keep_last=0, stop_after=7)
    (pack.root / "loras" / "runs" / names(2)[0]).unlink()
    resumed = pack.run_saves.load_resume("runs/u_6_steps_00001.safetensors", IDENTITY, STEPS)
    assert [s.step for s in resumed.saves] == [4, 6]


def rewrite_info(path: Path, change) -> None:
    """Changes the ``info`` a state file carries, as a hand-made state could."""
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
    change(manifest["info"])
    safetensors.torch.save_file(tensors, str(path), metadata={"manifest": json.dumps(manifest)})


def test_a_state_that_lists_no_saves_or_other_files_never_removes_them(pack):
    run(pack, keep_last=0, stop_after=5)
    victims = [pack.root / "loras" / "favourite.safetensors", pack.root / "outside_2_steps_00001.safetensors",
               pack.root / "loras" / "runs" / "notes.txt"]
    for victim in victims:
        victim.write_bytes(b"keep me")
    state = pack.root / "output" / "training_states" / "runs" / names(4)[0]
    listed = [{"step": 1, "lora_file": "favourite.safetensors", "state_file": None},
              {"step": 1, "lora_file": "../outside_2_steps_00001.safetensors", "state_file": None},
              {"step": 1, "lora_file": "runs/notes.txt", "state_file": "runs/notes.txt"}, "junk", {"step": "x"}]
    rewrite_info(state, lambda info: info.update(saves=listed))
    resumed = run(pack, keep_last=1, resume_from=f"runs/{names(4)[0]}")
    assert resumed.steps == [8] and all(v.read_bytes() == b"keep me" for v in victims)
    # an older state, without the list: its own save is the run's first
    run(pack, keep_last=0, stop_after=3)
    older = pack.root / "output" / "training_states" / "runs" / names(2, counter=2)[0]
    rewrite_info(older, lambda info: info.pop("saves"))
    assert [s.step for s in pack.run_saves.load_resume(f"runs/{older.name}", IDENTITY, STEPS).saves] == [2]


def test_a_process_that_writes_no_files_reports_the_same_steps(pack, monkeypatch):
    monkeypatch.setattr(pack.run_saves.process_group, "writes_files", lambda: False)
    earlier = [pack.run_saves.Save(2, "runs/a_2_steps_00001.safetensors", None)]
    saves = pack.run_saves.IntermediateSaves(pack.options.RunOptions(keep_last=2), None, 0, IDENTITY, None, [],
                                             earlier)
    for step in (4, 6):
        saves(SimpleNamespace(step=step))
    assert saves.steps == [4, 6] and not (pack.root / "loras").exists()
