class DescribeDataset:
    """Per item of a data set (lists of LATENT and CONDITIONING, as data-set nodes give them): a digest of its latent,
    digests of its reference latents (``reference_latents``, in order), its context's shape and its caption text.
    Equal digests mean bit-equal tensors: a reference that is the same picture as a target encodes to its latent."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latents": ("LATENT",), "positive": ("CONDITIONING",)},
                "optional": {"captions": ("STRING", {"forceInput": True})}}

    INPUT_IS_LIST = True
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"
    CATEGORY = "testing"

    def report(self, latents, positive, captions=None):
        import hashlib

        def digest(tensor) -> str:
            return hashlib.sha256(tensor.float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]

        items = []
        for i, (latent, conditioning) in enumerate(zip(latents, positive, strict=True)):
            assert len(conditioning) == 1, "one conditioning entry per item"
            context, extra = conditioning[0]
            items.append({"latent": digest(latent["samples"]), "shape": list(latent["samples"].shape),
                          "references": [digest(r) for r in extra.get("reference_latents", [])],
                          "context": list(context.shape), "caption": captions[i] if captions else None})
        return {"ui": {"items": items}}
