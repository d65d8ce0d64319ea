"""PeakMemory: the most memory a stretch of code held, as growth over what was in use before."""

import json
import subprocess
import sys

import pytest

# In a fresh process: in a long one, memory freed earlier is reused without the resident set growing.
MEASURE = """
import json, sys, torch
from memorizing_transformers.devices import keep_freed_host_memory
from memorizing_transformers.evaluation.peak_memory import PeakMemory
if sys.argv[1] == "keep":  # malloc keeps what is freed: 256 MiB freed before, which the stretch could reuse
    assert keep_freed_host_memory()
    torch.ones(256 * 2**20 // 4)  # touched, then freed at once
with PeakMemory("cpu") as use:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    held = use.in_use()
    del block
print(json.dumps({"held": held, "peak": use.peak_bytes, "after": use.in_use()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("allocator", ["default", "keep"])
def test_peak_counts_a_freed_allocation_and_in_use_forgets_it(allocator):
    done = subprocess.run([sys.executable, "-c", MEASURE, allocator], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["held"] >= 60 * 2**20
    assert measured["peak"] >= 60 * 2**20
    assert measured["after"] < 32 * 2**20  # freed (given back to the system before the resident set is read)
