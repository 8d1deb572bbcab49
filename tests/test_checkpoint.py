"""Checkpoints: latest N plus the best by a metric, across reopenings."""

import jax.numpy as jnp
import numpy as np
import pytest

from lib.checkpoint import Checkpoints
from lib.errors import UserError


def items(step: int) -> dict:
    return {"params": {"w": jnp.ones(3) * step}, "train": {"step": jnp.asarray(step)}}


def test_keeps_latest_and_best(tmp_path):
    ckpt = Checkpoints(tmp_path, keep=2, best_metric="acc")
    for step, acc in [(1, 0.5), (2, 0.9), (3, None), (4, 0.6), (5, None), (6, 0.7)]:
        ckpt.save(step, items(step), metrics=None if acc is None else {"acc": acc})
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    ckpt.close()
    again = Checkpoints(tmp_path, keep=2, best_metric="acc")
    assert again.best_step() == 2 and again.latest_step() == 6
    restored = again.restore(2, {"params": items(0)["params"]})
    np.testing.assert_array_equal(restored["params"]["w"], np.full(3, 2.0))
    assert set(restored) == {"params"}


def test_best_mode_min(tmp_path):
    ckpt = Checkpoints(tmp_path, keep=1, best_metric="loss", best_mode="min")
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        ckpt.save(step, items(step), metrics={"loss": loss})
    assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2


def test_missing_best_metric_and_incompatible_restore(tmp_path):
    ckpt = Checkpoints(tmp_path, keep=2, best_metric="f1")
    with pytest.raises(UserError, match="best_metric='f1' is not among"):
        ckpt.save(1, items(1), metrics={"acc": 1.0})
    ckpt.save(2, items(2), metrics={"f1": 1.0})
    with pytest.raises(UserError, match="has shape \\(3,\\), this config needs \\(4,\\)"):
        ckpt.restore(2, {"params": {"w": jnp.zeros(4)}})
    with pytest.raises(UserError, match="has no entry 'v'"):
        ckpt.restore(2, {"params": {"w": jnp.zeros(3), "v": jnp.zeros(1)}})
