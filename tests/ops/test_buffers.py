"""moespec.ops._buffers: a recycled storage is handed out only once nothing else holds it."""

from __future__ import annotations

import pytest
import torch

from moespec.ops import _buffers

CPU = torch.device("cpu")
SHAPE = (512, 1024)  # 2 MiB of fp32: pooled


@pytest.fixture(autouse=True)
def _fresh_pool():
    _buffers.release()
    yield
    _buffers.release()


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_reused_only_when_free():
    a = _buffers.empty(SHAPE, torch.float32, CPU)
    assert a.shape == SHAPE and a.dtype == torch.float32 and a.is_contiguous() and a._base is None
    b = _buffers.empty(SHAPE, torch.float32, CPU)
    assert _ptr(a) != _ptr(b)  # a is alive: not handed out twice
    pa = _ptr(a)
    del a
    c = _buffers.empty(SHAPE, torch.float32, CPU)
    assert _ptr(c) == pa  # recycled
    v = c[3:]  # a view keeps the storage in use
    del c
    d = _buffers.empty(SHAPE, torch.float32, CPU)
    assert _ptr(d) not in (pa, _ptr(b))
    del v
    assert _ptr(_buffers.empty((1024, 512), torch.float32, CPU)) == pa  # same bytes, other shape


def test_storage_objects_and_grads_keep_it_in_use():
    a = _buffers.empty(SHAPE, torch.float32, CPU)
    s, pa = a.untyped_storage(), _ptr(a)
    del a
    assert _ptr(_buffers.empty(SHAPE, torch.float32, CPU)) != pa  # the storage object holds it
    del s
    p = torch.zeros(SHAPE, requires_grad=True)
    g = _buffers.empty(SHAPE, torch.float32, CPU).fill_(1.0)
    pg = _ptr(g)
    (p * g).sum().backward()  # p.grad is a different tensor; g stays alive through `g`
    p.grad = g
    del g
    assert _ptr(_buffers.empty(SHAPE, torch.float32, CPU)) != pg  # held by p.grad
    assert torch.all(p.grad == 1.0)


def test_small_and_capped_allocations_are_plain(monkeypatch):
    small = _buffers.empty((4, 4), torch.float32, CPU)
    del small
    assert _buffers._pooled_bytes == 0
    monkeypatch.setattr(_buffers, "MAX_POOL_BYTES", 3 << 20)
    keep = [_buffers.empty(SHAPE, torch.float32, CPU) for _ in range(3)]  # the third is not pooled
    assert _buffers._pooled_bytes == 2 << 20
    del keep
    _buffers.empty((1024, 1024), torch.float32, CPU)  # 4 MiB: over the cap even after evicting
    assert _buffers._pooled_bytes <= 3 << 20
