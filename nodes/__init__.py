"""ComfyUI glue: node schemas and the translation of ComfyUI objects into what ``lora/`` and ``training/`` need."""
