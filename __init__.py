"""LoRA Trainer: a ComfyUI node pack that trains LoRA / LoHa / LoKr / OFT adapters. ComfyUI loads this file."""
try:
    import folder_paths  # noqa: F401  (always importable inside ComfyUI)
except ImportError:
    # Imported outside ComfyUI (pytest collects this folder as a package): there is nothing to register.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
