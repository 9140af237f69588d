"""Cost figures: each run's own peak RSS, also when one process runs several (a sweep, the demo)."""

import os
import subprocess
import sys

import pytest
import torch

from unitune.core.usage import costs, peak_accelerator_mb, reset_peaks


@pytest.mark.skipif(sys.platform != "linux", reason="the per-run reset needs /proc/self/clear_refs")
def test_peak_rss_is_measured_from_the_last_reset():
    """In a fresh process (this one's freed heap, kept resident by the suite's allocator
    settings, would absorb the allocation)."""
    code = """
import numpy as np
from unitune.core.usage import peak_rss_mb, reset_peaks
reset_peaks(); before = peak_rss_mb()
big = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
during = peak_rss_mb()
del big
reset_peaks(); after = peak_rss_mb()
print(before, during, after)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout  # fmt: skip
    before, during, after = map(float, out.split())
    assert during - before > 250
    assert after < during - 250  # the next run does not inherit this one's peak


def test_costs_on_cpu():
    reset_peaks()
    c = costs(1000, 4.0, torch.device("cpu"))
    assert c["tokens"] == 1000 and c["tokens_per_s"] == 250.0
    assert c["peak_rss_mb"] > 0 and c["peak_accelerator_mb"] is None
    assert peak_accelerator_mb(torch.device("cpu")) is None
    assert costs(0, 0.0, None)["tokens_per_s"] is None
