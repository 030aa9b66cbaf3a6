"""The runner under torchrun: each process (rank) joins PyTorch's default process group before ComfyUI starts, on its
own GPU, and every rank runs the whole workflow; the pack's training node sees ``torch.distributed`` and trains its
share of each batch (training/distributed.py), and only rank 0 writes files and prints progress."""
from __future__ import annotations

import os


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


def leave() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
