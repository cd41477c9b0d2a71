"""The foundations: the state-dict tree, storage identity, buffers, completions, and the only
doors to CUDA (``cuda``) and torch.distributed (``dist``)."""
