"""Copies of KV between L1, the caller's tensors and shared memory, at single-thread memcpy speed.

torch's ``copy_`` splits a large copy over its intra-op threads: on a 2-vCPU host that runs at ~4 GB/s whenever
another process is runnable (the two halves wait for each other), against 11-15 GB/s for one thread's memcpy. A
KV chunk is megabytes, so one ``memmove`` on the calling thread (with the GIL released: ctypes drops it for the
call) is both faster on a busy host and leaves the other core to whoever needs it.
"""

from __future__ import annotations

import ctypes

import torch


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src`` on this thread. Both contiguous CPU tensors of one dtype and shape: one memmove
    (overlap allowed); anything else (another dtype, a broadcast, a strided view): torch's ``copy_``."""
    if (
        dst.dtype == src.dtype
        and dst.shape == src.shape
        and dst.device.type == "cpu"
        and src.device.type == "cpu"
        and dst.is_contiguous()
        and src.is_contiguous()
    ):
        n = dst.numel() * dst.element_size()
        if n:
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), n)
        return
    dst.copy_(src)


def clone(src: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor equal to ``src``, filled by :func:`copy_into`."""
    out = torch.empty(src.shape, dtype=src.dtype)
    copy_into(out, src.contiguous())
    return out
