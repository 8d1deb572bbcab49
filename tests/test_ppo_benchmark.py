"""``benchmarks/ppo.py --dry``: one PPO epoch of ours beside the PyTorch reference loop, at toy
size, in a subprocess (one CPU device, as a user runs it).

The final JSON line must hold every figure as a positive finite number, and on the first
epoch, where both sides start from the same weights and update on the same rollouts, they must
compute the same log-probabilities, values and epoch statistics.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Timed figures of each side (median seconds per epoch) and their ratios.
TIMES = [f"{part}_{side}_s" for part in ("rollout", "update", "total", "cpu")
         for side in ("ours", "torch")] + [f"{part}_ratio" for part in
                                           ("rollout", "update", "total", "cpu")]
WARMUP = ["first_ours_s", "first_torch_s", "second_ours_s", "second_torch_s"]


@pytest.fixture(scope="module")
def dry_run() -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``ppo.py --dry`` once: the process and its final JSON line."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, not the test suite's eight
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "benchmarks/ppo.py", "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_dry_run_reports_every_figure(dry_run):
    proc, res = dry_run
    assert res["mode"] == "dry"
    assert (res["batch"], res["minibatch"], res["passes"], res["epochs"]) == (8, 4, 2, 1)
    for key in TIMES + WARMUP:
        value = res[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert res["total_ratio"] == pytest.approx(res["total_torch_s"] / res["total_ours_s"])
    for row in ("ours (lib.ppo)", "PyTorch + HF generate", "ratio torch / ours"):
        assert row in proc.stdout, row


def test_dry_run_both_sides_compute_the_same(dry_run):
    _, res = dry_run
    assert res["logp_diff"] < 1e-5, res
    assert res["value_diff"] < 1e-5, res
    # Statistics of the whole first epoch: experience and 4 Adam steps on each side.
    assert res["stat_diff"] < 1e-4, res
