"""The runner under torchrun: each process (rank) joins PyTorch's default process group before ComfyUI starts, on its
own GPU, and every rank runs the whole workflow; the pack's training node sees ``torch.distributed`` and trains its
share of each batch (training/distributed.py), and only rank 0 writes files and prints progress."""
from __future__ import annotations

import os
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def join() -> None:
    """Joins the process group torchrun describes in the environment (no-op for a single process). CUDA ranks see
    only their own GPU (LOCAL_RANK-th of those visible), so ComfyUI's device 0 is theirs; gloo on the CPU, NCCL on
    CUDA. Must run before anything initialises CUDA."""
    if world_size() <= 1:
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local] if local < len(visible) else str(local)
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)


def leave(succeeded: bool) -> None:
    """After a successful run all ranks leave together: a rank exiting while another's gloo threads still talk to it
    aborts ("terminate called without an active exception"). After a failure a rank just exits: the others may be
    inside a collective that would never match a barrier, and torchrun stops them when this one ends."""
    import torch

    if succeeded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_now(code: int) -> None:
    """Ends a torchrun worker without the interpreter's teardown, where gloo's background threads can still abort
    the process (SIGABRT) after everything was done and written; a single process exits normally."""
    if world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
