"""The memory a stretch of code takes, as growth over what was in use when it began.

    with PeakMemory(device) as peak:
        ...                       # peak.in_use(): growth still held now
    peak.peak_bytes               # the most held at any moment

On the CPU these are the process's resident set (VmRSS) and its high-water mark (VmHWM,
reset to the current resident set on entry through /proc/self/clear_refs), so they count
everything the process touched, tensors or not (Linux only); memory malloc holds free (see
devices.keep_freed_host_memory) is returned to the system before the resident set is read; on CUDA, torch's allocated
and peak allocated memory of the device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..devices import release_freed_host_memory


def process_memory_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), e.g. VmRSS or VmHWM (peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the file gives kB
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak and current memory growth of the code inside `with`, on `device`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.before = 0
        self.peak_bytes = 0

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        release_freed_host_memory()
        return process_memory_bytes("VmRSS")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.before = self._current()
        if self.device.type != "cuda":
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return self

    def in_use(self) -> int:
        """Bytes held now beyond those held on entry."""
        return self._current() - self.before

    def peak(self) -> int:
        """The most bytes held beyond those held on entry, up to now."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.before
        return process_memory_bytes("VmHWM") - self.before

    def __exit__(self, *exc: object) -> None:
        self.peak_bytes = self.peak()
