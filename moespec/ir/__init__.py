"""Resolved, derived views of a validated spec (parameter counts, FLOPs, memory)."""
