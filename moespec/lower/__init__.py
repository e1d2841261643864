"""IR -> executable code: torch.fx graphs of fused custom ops (``fx``)."""
