"""Adapter algorithms, their injection into a torch model, and the LoRA file format. Pure PyTorch: no ComfyUI."""
