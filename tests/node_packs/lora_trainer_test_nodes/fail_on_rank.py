"""A MODEL passed through, except on one rank of a torchrun job, where it raises: a worker that fails while the
others go on (tests/test_distributed.py)."""


class FailOnRank:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "rank": ("INT", {"default": 1, "min": 0, "max": 1024})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model, rank):
        import torch

        if torch.distributed.is_initialized() and torch.distributed.get_rank() == rank:
            raise RuntimeError(f"injected failure on rank {rank}")
        return (model,)
