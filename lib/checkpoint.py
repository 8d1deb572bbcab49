"""Orbax checkpoints of the train state: the latest N steps plus the best by a metric.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or
a SIGKILL during a save leaves the previous checkpoints intact; a half-written step is never
seen as a checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lib.errors import UserError


class _QuietMissingMetrics(logging.Filter):
    """Saves between evaluations carry no metrics by design; Orbax warns about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietMissingMetrics())

# The named pytrees of a checkpoint: trainable params, and the rest of the train state.
ITEMS = ("params", "train")


class Checkpoints:
    """Save and restore named pytrees (``params``, ``train``) per step under ``directory``.

    Items are stored separately so that ``--config.init_from`` can take the ``params`` of
    another run without its optimizer state.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
    ):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        preserve: list = [policies.LatestN(n=keep)]
        if best_metric:
            preserve.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax store each save's metrics and rank steps by them.
            best_fn=(lambda m: m[best_metric]) if best_metric else None,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=False,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={name: ocp.StandardCheckpointHandler() for name in ITEMS},
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every checkpoint kept on disk, oldest first."""
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` among kept checkpoints, or None."""
        return self.manager.best_step() if self.best_metric else None

    def save(
        self, step: int, items: dict[str, Any], metrics: dict[str, float] | None = None
    ) -> None:
        """Save the named pytrees at ``step`` (blocking), with eval ``metrics`` for best."""
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            raise UserError(
                f"config.eval.best_metric={self.best_metric!r} is not among the task's "
                f"metrics {sorted(metrics)}"
            )
        args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
        self.manager.save(step, args=args, metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, targets: dict[str, Any]) -> dict[str, Any]:
        """Restore the named items of ``step`` into the structure, shapes and shardings of
        ``targets`` (arrays or ``jax.ShapeDtypeStruct`` with shardings); other saved items
        are not read. A checkpoint from another model or config is a ``UserError`` naming
        the first mismatching entry.
        """
        abstract = {k: jax.tree.map(_abstract, v) for k, v in targets.items()}
        for name, tree in abstract.items():
            self._check_compatible(step, name, tree)
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in abstract.items()})
        restored = self.manager.restore(step, args=args)
        return {k: restored[k] for k in targets}

    def _check_compatible(self, step: int, name: str, abstract: Any) -> None:
        where = self.directory / str(step) / name
        try:
            saved = self.manager.item_metadata(step)[name]
        except Exception:  # noqa: BLE001 - unreadable metadata: let restore report it
            return
        if saved is None:
            raise UserError(f"checkpoint {where} is missing (written by a different task?)")
        saved = getattr(saved, "tree", saved)
        saved_flat = dict(_flatten(saved))
        want_flat = dict(_flatten(abstract))
        for key in sorted(set(saved_flat) | set(want_flat)):
            if key not in saved_flat:
                raise UserError(
                    f"checkpoint {where} is incompatible: it has no entry {key!r}; it was "
                    "written by a different model/config (use a fresh --workdir)"
                )
            if key not in want_flat:
                raise UserError(
                    f"checkpoint {where} is incompatible: unexpected entry {key!r}; it was "
                    "written by a different model/config (use a fresh --workdir)"
                )
            got = tuple(getattr(saved_flat[key], "shape", ()) or ())
            want = tuple(want_flat[key].shape)
            if got != want:
                raise UserError(
                    f"checkpoint {where} is incompatible: {key!r} has shape {got}, this "
                    f"config needs {want} (use a fresh --workdir, or the original config)"
                )

    def close(self) -> None:
        """Finish pending work and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _flatten(tree: Any) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
    )[0]
    return [("/".join(_key_str(k) for k in path), leaf) for path, leaf in leaves]


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
