"""The device a measurement names, waiting for it before a clock is read, and the host's allocator."""

from __future__ import annotations

import ctypes
import platform

import torch


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's kind and the threads torch uses on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {threads} thread{'' if threads == 1 else 's'}"


def synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on a CUDA device (nothing to wait for elsewhere)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (whose malloc settings these functions use)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc's own symbol
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_host_memory() -> bool:
    """Have glibc's malloc serve large allocations from its heap and keep what is freed for the next.

    By default glibc maps fresh pages for every allocation over 32 MiB and unmaps them when it is
    freed, so each such tensor (a training step's logits, a memory's retrieved keys and values)
    page-faults all its pages in again at every step: 10-16% of a CPU training step in these models
    (docs/PERFORMANCE.md). PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for the same
    reason; this is glibc's own setting (mallopt), for machines that have neither. The process keeps
    up to 1 GiB of freed memory at the top of its heap instead of returning it, and whatever freed
    memory lies below live allocations (release_freed_host_memory returns it all on demand, as
    PeakMemory does before it reads the resident set, and benchmarks between configurations). `mt`,
    the experiments and the benchmarks call it; library users may. Returns False, changing nothing,
    where the C library is not glibc.
    """
    if (libc := _glibc()) is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))


def release_freed_host_memory() -> None:
    """Return the host memory malloc holds free to the system (glibc's malloc_trim; nothing elsewhere)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)
