"""The device a measurement names, and waiting for it before a clock is read."""

from __future__ import annotations

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
