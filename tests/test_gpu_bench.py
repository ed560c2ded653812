"""`bench/gpu.py`, the script a first GPU session runs, works before a GPU is ever lent: every
check runs on the CPU at tiny sizes and passes its own assertions (losses fall, kernels equal a
float64 reference, fused cross-entropy equals full logits, one compiled graph, ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_check_passes_on_the_cpu_at_tiny_sizes(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--small",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    results = json.loads((tmp_path / "gpu.json").read_text())
    failed = {name: r.get("error") or r for name, r in results.items() if not r.get("ok")}
    assert done.returncode == 0 and not failed, (failed, done.stderr[-3000:])
    assert list(results) == ["env", "lora_tiny", "attention", "fused_ce", "compile", "offload", "qlora", "moe",
                             "torchrun", "decode", "throughput"]
    assert results["compile"]["unique_graphs"] == 1 and results["decode"]["equal_to_cpu"]
    assert "| throughput | True |" in (tmp_path / "gpu.md").read_text()
