"""Recycled CPU buffers for the large outputs and temporaries of the fused ops.

A fresh CPU tensor of tens of MiB is handed out by glibc as a new ``mmap`` (or from heap
memory it trimmed back to the OS), so every one of its pages faults on first touch: on the
benchmark machine a fresh 32 MiB [N, D] tensor costs ~12 ms of page faults, about a third of
the expert GEMM time of a fine-grained layer's forward. :func:`empty` hands out tensors on
storages kept here instead, and reuses a storage only once nothing but this pool holds it: its
C++ use count is 1 (no tensor, view, saved tensor or ``.grad`` refers to it) and no Python
code holds its storage object (``t.untyped_storage()`` returns the pool's own object). So a
recycled buffer is never visible to two owners. Its values are stale (like ``torch.empty``);
callers overwrite them.

The pool keeps at most ``MAX_POOL_BYTES`` of storages (least recently used free ones are
dropped first; when every pooled storage is in use, new allocations are plain ones) and only
pools allocations of at least ``MIN_BYTES``; :func:`release` empties it.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict

import torch
from torch import Tensor

MIN_BYTES = 1 << 20
MAX_POOL_BYTES = 768 << 20

_lock = threading.Lock()
_pool: OrderedDict[int, list] = OrderedDict()  # id(storage) -> [nbytes, storage]
_pooled_bytes = 0


def _refs(entry: list) -> int:
    return sys.getrefcount(entry[1])


_BASE_REFS = _refs([0, object()])  # Python references of a storage only the pool holds


def _free(entry: list) -> bool:
    # Tensors on the storage count in its C++ use count; a storage object obtained through
    # ``t.untyped_storage()`` is the pool's own Python object (PyObject preservation).
    return torch._C._storage_Use_Count(entry[1]._cdata) == 1 and _refs(entry) == _BASE_REFS


def _wrap(s: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    t = torch.empty(0, dtype=dtype)
    return t.set_(s, 0, shape)


Shape = tuple[int, ...] | list[int] | torch.Size


def _tracing() -> bool:
    """True under torch.compile / export tracing (an active fake mode)."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


def empty(shape: Shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor, on a recycled storage where one is free (CPU only)."""
    global _pooled_bytes
    # Autograd formulas are traced by torch.compile/export (fake tensors, symbolic sizes that
    # may be data-dependent): nothing to recycle. The cheap checks go first; the fake-mode
    # lookup only runs for the large CPU tensors the pool would take.
    if device.type != "cpu" or any(not isinstance(d, int) for d in shape):
        return torch.empty(shape, dtype=dtype, device=device)
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or _tracing():
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        for key, entry in _pool.items():
            if entry[0] == nbytes and _free(entry):
                _pool.move_to_end(key)
                return _wrap(entry[1], shape, dtype)
        if _pooled_bytes + nbytes > MAX_POOL_BYTES:  # make room: drop free storages, oldest first
            for key in [k for k, entry in _pool.items() if _free(entry)]:
                _pooled_bytes -= _pool.pop(key)[0]
                if _pooled_bytes + nbytes <= MAX_POOL_BYTES:
                    break
        if _pooled_bytes + nbytes > MAX_POOL_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        s = torch.UntypedStorage(nbytes)
        _pool[id(s)] = [nbytes, s]
        _pooled_bytes += nbytes
        return _wrap(s, shape, dtype)


def empty_like(t: Tensor) -> Tensor:
    return empty(t.shape, t.dtype, t.device)


def release() -> None:
    """Drop every pooled storage (those still in use live on with their owners)."""
    global _pooled_bytes
    with _lock:
        _pool.clear()
        _pooled_bytes = 0
