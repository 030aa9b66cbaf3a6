"""LoRA helpers for graphs: a file loaded by a name computed in the graph (Save LoRA's filename output), through
ComfyUI's own LoraLoaderModelOnly (its lora_name is a combo, which a link from a STRING output cannot feed); and a
LORA_MODEL as a bare dict, as ComfyUI's own training node gives one (no metadata, no layer names)."""


class LoadLoraByName:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "lora_name": ("STRING", {"forceInput": True}),
                             "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, model, lora_name, strength):
        import nodes

        return nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, strength)


class PlainDict:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": ("LORA_MODEL",)}}

    RETURN_TYPES = ("LORA_MODEL",)
    FUNCTION = "strip"
    CATEGORY = "testing"

    def strip(self, lora):
        return (dict(lora),)
