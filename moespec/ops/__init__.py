"""Operators of built MoE layers.

``reference/`` holds the plain-PyTorch semantics (the oracle every fast path is tested
against); fused custom ops and generated kernels live beside it.
"""
