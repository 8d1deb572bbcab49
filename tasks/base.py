"""The task interface: what the trainer, the sweep and the command line call on a task.

A task gets its config once, at construction (``Task(config)``, or ``Task.create(config, mode)``
which validates it first), and keeps it as ``self.config``. Every capability is a method
declared here; the optional ones have a default, so callers never probe a task:

- ``build() -> (model, tokenizer)``, usually through ``build_model(head, vocab=...)`` (the
  model registry, ``lib.models``: no task names a model family)
- ``trainable()``: the NNX filter of the trained variables (default: as ``config.model``
  says: LoRA adapters, a p-tuning v2 prefix, or every parameter)
- ``datasets(tokenizer) -> (train, eval)``: ``train`` serves batches by step
  (``lib.data.ArrayDataset``); ``eval`` carries whatever ``evaluate`` needs
- ``test_dataset(tokenizer)``: the test split named by ``config.data.test``, evaluated on the
  best checkpoint after training (default None: no test split)
- ``save_assets(tokenizer, workdir)``: what eval/predict need besides the checkpoint, e.g. a
  vocabulary built from the data (default: nothing)
- ``loss(model, batch, rng) -> (loss, aux)``, inside the jitted train step
- ``evaluate(model, eval_data, repeat=0) -> (metrics, samples)``; ``repeat`` numbers repeated
  evaluations (tasks that sample fold it into their key)
- ``predict(model, tokenizer, inputs) -> outputs`` (default: a ``UserError``)
- ``export(model, tokenizer, out_dir)`` (default: a ``UserError``)
- ``run(workdir)``: ``--mode=train``. The default trains once (``lib.train.train``), or runs
  the sweep that ``config.sweep.runs`` declares (``lib.sweep``); a task with its own loop
  overrides it.

``RULES`` is the task's table of config checks (``lib.config.validate``): the base fields'
rules plus the task's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flax import nnx

from lib import config as config_lib
from lib import models
from lib.errors import UserError


class Task:
    """The base of every task (see the module docstring)."""

    RULES: dict[str, config_lib.Rule] = config_lib.BASE_RULES

    def __init__(self, config):
        self.config = config
        # What ``build_model`` made (the model's port and config, for ``export``).
        self.built: models.Built | None = None

    @classmethod
    def create(cls, config, mode: str = "train") -> Task:
        """The task for ``config``, once its values pass ``RULES`` for ``mode``."""
        config_lib.validate(config, cls.RULES, mode)
        return cls(config)

    @property
    def name(self) -> str:
        """The task's name (``config.task``)."""
        return self.config.task

    # --- model and data -------------------------------------------------------------------

    def build(self) -> tuple[nnx.Module, Any]:
        """``(model, tokenizer)``."""
        raise NotImplementedError

    def trainable(self) -> Any:
        """The NNX filter of the variables the optimizer updates (the rest stays frozen): the
        LoRA adapters, the p-tuning v2 prefix or every parameter, as ``config.model`` says."""
        return models.trainable_of(self.config.model)

    def build_model(self, head: str, *, vocab: Any = None, **options: Any) -> models.Built:
        """The task's model from ``config.model`` through the registry (``lib.models.build``):
        the checkpoint of ``model.path``, or a scratch ``model.family`` with ``vocab``."""
        self.built = models.build(self.config.model, head=head, tokenizer=vocab,
                                  seed=int(self.config.train.seed), **options)
        return self.built

    def export_model(self, model, out_dir: str) -> None:
        """``lib.models.export`` of a model made by ``build_model`` (an HF directory, or a
        PEFT adapter for a LoRA run)."""
        if self.built is None:
            raise UserError(f"task {self.name}: export needs the model built first")
        models.export(self.built, model, out_dir, self.config.model)

    def datasets(self, tokenizer) -> tuple[Any, Any]:
        """``(train, eval)`` data."""
        raise NotImplementedError

    def test_dataset(self, tokenizer) -> Any | None:
        """Eval data of the test split (``config.data.test``), or None: no test split."""
        return None

    def save_assets(self, tokenizer, workdir: Path) -> None:
        """Save what eval/predict need besides the checkpoint into the run's ``workdir``."""

    # --- training and evaluation ----------------------------------------------------------

    def loss(self, model, batch: dict, rng) -> tuple[Any, dict]:
        """``(loss, aux)``; an ``aux["weight"]`` weights the micro-batches (``lib.train``);
        ``rng=None`` is evaluation mode (no dropout)."""
        raise NotImplementedError

    def evaluate(self, model, eval_data, repeat: int = 0) -> tuple[dict[str, float], list]:
        """``(metrics, samples)`` of ``model`` on ``eval_data``."""
        raise NotImplementedError

    def run(self, workdir: str | Path) -> dict[str, float]:
        """``--mode=train``: the sweep of ``config.sweep.runs`` if it names runs, else one
        training. Returns the final metrics."""
        if self.config.sweep.runs:
            from lib import sweep

            return sweep.run(self, workdir)
        from lib import train

        metrics = train.train(self.config, workdir, self)
        print("final eval: " + json.dumps(metrics, ensure_ascii=False), flush=True)
        return metrics

    # --- inference ------------------------------------------------------------------------

    def predict(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        """One output record per input text."""
        raise UserError(f"task {self.name} cannot predict")

    def export(self, model, tokenizer, out_dir: str) -> None:
        """Write the model to ``out_dir`` in a format other tools load."""
        raise UserError(f"task {self.name} cannot export")
