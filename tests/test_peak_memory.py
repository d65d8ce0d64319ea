"""PeakMemory: the most memory a stretch of code held, as growth over what was in use before."""

import sys

import pytest
import torch

from memorizing_transformers.evaluation.peak_memory import PeakMemory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_counts_a_freed_allocation_and_in_use_forgets_it():
    with PeakMemory("cpu") as use:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        held = use.in_use()
        del block
    assert held >= 60 * 2**20
    assert use.peak_bytes >= 60 * 2**20
    assert use.in_use() < 32 * 2**20  # freed (large blocks go back to the system)
