"""The training loop and what it is made of: objectives, data order, optimizers, checkpointing. Pure PyTorch."""
