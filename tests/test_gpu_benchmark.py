"""``benchmarks/gpu.py --dry``: the GPU readiness benchmark's code paths, on the CPU at toy size.

One subprocess run (as a user runs it: one CPU device, no GPU) whose final JSON line must hold
every figure as a positive finite number; in fp32 both sides compute the same thing, so the
greedy tokens are identical and the first train losses agree.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every figure of the JSON line: speeds, times, MFU, losses, agreement, sizes.
FIGURES = [
    f"{name}_{side}"
    for name in ("train_tok_s", "mfu", "train_step_s", "train_first_s", "first_loss",
                 "decode_tok_s", "decode_s", "decode_first_s")
    for side in ("ours", "torch")
] + ["train_ratio", "decode_ratio", "decode_identical", "params", "tokens_per_step",
     "model_tflop_per_step", "peak_tflops", "batch", "seq", "steps", "decode_batch", "prompt",
     "new", "repeats"]


@pytest.fixture(scope="module")
def dry_run() -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``gpu.py --dry`` once: the process and its final JSON line."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, not the test suite's eight
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    return proc, json.loads(last)


def test_dry_run_reports_every_figure(dry_run):
    proc, res = dry_run
    assert res["mode"] == "dry"
    for key in FIGURES:
        assert key in res, key
        value = res[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)
    # The table is printed too, with both sides' rows.
    for row in ("sft train tokens/s", "sft train MFU", "decode tokens/s",
                "identical greedy tokens"):
        assert row in proc.stdout, row


def test_dry_run_both_sides_compute_the_same(dry_run):
    _, res = dry_run
    assert res["dtype"] == "float32"
    assert res["decode_identical"] == 1.0
    assert abs(res["first_loss_ours"] - res["first_loss_torch"]) < 1e-4, res
