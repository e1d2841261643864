"""Run independent pieces of a CPU op on all intra-op threads, one single-threaded piece each.

The blocked expert kernels work on many small experts (fine-grained MoE: ~256 rows of
[256, 512] x [512, 128] GEMMs). Splitting each such GEMM over the intra-op threads runs MKL
at ~125 GFLOP/s on 2 cores, and their small activation/gather ops run on one core, while two
single-threaded GEMMs on different experts run at ~2 x 84 GFLOP/s. :func:`run` hands each of
``torch.get_num_threads()`` persistent worker threads one callable; a worker's ATen/MKL calls
are single-threaded (``torch.set_num_threads(1)`` in that thread: the OpenMP and MKL thread
counts are per thread), and ATen kernels release the GIL, so the workers compute at the same
time. The pool follows the caller's thread count and is rebuilt after a fork.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_size = 0
_pid = -1


def _init_worker() -> None:
    torch.get_num_threads()  # the lazy per-thread init first (it reads the global count) ...
    torch.set_num_threads(1)  # ... then one thread for this worker's OpenMP and MKL calls


def _workers(n: int) -> ThreadPoolExecutor:
    global _executor, _size, _pid
    with _lock:
        if _executor is None or _size != n or _pid != os.getpid():
            if _executor is not None and _pid == os.getpid():
                _executor.shutdown(wait=False)
            ex = ThreadPoolExecutor(n, thread_name_prefix="moespec-cpu", initializer=_init_worker)
            started = threading.Barrier(n + 1)
            fs = [ex.submit(started.wait) for _ in range(n)]  # start every worker now
            started.wait()
            for f in fs:
                f.result()
            # set_num_threads also stores the count new threads start with: restore it.
            torch.set_num_threads(n)
            _executor, _size, _pid = ex, n, os.getpid()
        return _executor


def threads() -> int:
    """How many pieces :func:`run` runs at once (the caller's intra-op thread count)."""
    return torch.get_num_threads()


def _below_autograd() -> contextlib.AbstractContextManager:
    guard = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
    return guard() if guard is not None else contextlib.nullcontext()


def _as_kernel(piece: Callable[[], None], inference: bool) -> Callable[[], None]:
    """``piece`` under the calling kernel's thread-local state: no autograd recording (the
    kernels of a custom op run below autograd; ``out=`` calls on tensors that require grad
    need it) and the caller's inference mode (its outputs may be inference tensors)."""

    def call() -> None:
        with torch.inference_mode(inference), torch.no_grad(), _below_autograd():
            piece()

    return call


def run(pieces: list[Callable[[], None]]) -> None:
    """Call every piece, each in its own worker thread, and wait for all (re-raising the first
    error). At most :func:`threads` pieces; a single piece runs in the calling thread. Meant
    for the CPU kernels of custom ops: the pieces run without autograd."""
    if len(pieces) == 1:
        pieces[0]()
        return
    n = threads()
    assert len(pieces) <= n, (len(pieces), n)
    inference = torch.is_inference_mode_enabled()
    futures = [_workers(n).submit(_as_kernel(p, inference)) for p in pieces]
    wait(futures)  # all of them, even when one failed: none may still write afterwards
    for f in futures:
        f.result()
