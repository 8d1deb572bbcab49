"""The task interface: what the trainer, the sweep and the command line call on a task.

A task gets its config once, at construction (``Task(config)``, or ``Task.create(config, mode)``
which validates it first), and keeps it as ``self.config``. Every capability is a method
declared here; the optional ones have a default, so callers never probe a task:

- ``build() -> (model, tokenizer)``, usually through ``build_model(head, ...)`` (the model
  registry, ``lib.models``: no task names a model family); a scratch model's character
  vocabulary comes from ``char_vocab`` over the task's ``vocab_texts()``
- ``trainable()``: the NNX filter of the trained variables (default: as ``config.model``
  says: LoRA adapters, a p-tuning v2 prefix, or every parameter)
- ``datasets(tokenizer) -> (train, eval)``: ``train`` serves batches by step
  (``lib.data.ArrayDataset``); ``eval`` carries whatever ``evaluate`` needs
- ``test_dataset(tokenizer)``: the test split named by ``config.data.test``, evaluated on the
  best checkpoint after training (default None: no test split)
- ``save_assets(tokenizer, workdir)``: what eval/predict need besides the checkpoint
  (default: a scratch run's character vocabulary)
- ``loss(model, batch, rng) -> (loss, aux)``, inside the jitted train step
- ``evaluate(model, eval_data, repeat=0) -> (metrics, samples)``; ``repeat`` numbers repeated
  evaluations (tasks that sample fold it into their key)
- ``evaluate_repeats(model, eval_data, repeats)``: the sweep's ``repeats`` evaluations, yielded
  one by one (default: ``evaluate`` with repeat 0, 1, ...; LoopCoT decodes every repeat's
  samples of a prompt from one prefill)
- ``predict(model, tokenizer, inputs) -> outputs`` (default: a ``UserError``)
- ``export(model, tokenizer, out_dir)`` (default: a ``UserError``)
- ``tools()``: interactive modes beyond the four (``--mode=rate`` / ``rank`` of PPO's human
  feedback), by name (default: none)
- ``run(workdir)``: ``--mode=train``. The default trains once (``lib.train.train``), or runs
  the sweep that ``config.sweep.runs`` declares (``lib.sweep``); a task with its own loop
  overrides it.

``RULES`` is the task's table of config checks (``lib.config.validate``): the base fields'
rules plus the task's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flax import nnx

from lib import config as config_lib
from lib import models
from lib.errors import UserError
from lib.tokenizer import CharVocab

# Where a scratch run keeps its character vocabulary (``<workdir>/tokenizer``).
TOKENIZER_DIR = "tokenizer"


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

    def build_model(self, head: str, **options: Any) -> models.Built:
        """The task's model from ``config.model`` through the registry (``lib.models.build``):
        the checkpoint of ``model.path`` with its tokenizer, or a scratch ``model.family`` with
        the character vocabulary of ``char_vocab``."""
        vocab = None if self.config.model.path else self.char_vocab()
        self.built = models.build(self.config.model, head=head, tokenizer=vocab,
                                  seed=int(self.config.train.seed), **options)
        return self.built

    def vocab_texts(self) -> list[str]:
        """The texts a scratch model's character vocabulary is built from (the training
        data)."""
        raise UserError(f"task {self.name} has no scratch model: set config.model.path")

    def char_vocab(self) -> CharVocab:
        """A scratch model's vocabulary: the run's own (``<workdir>/tokenizer``, written by
        ``save_assets``, so eval and predict need no data), else built from ``vocab_texts``
        (characters seen fewer than ``model.min_char_freq`` times map to ``[UNK]``)."""
        saved = Path(self.config.workdir or ".") / TOKENIZER_DIR
        if self.config.workdir and (saved / "vocab.txt").is_file():
            return CharVocab.load(saved)
        return CharVocab.build(self.vocab_texts(), min_freq=int(self.config.model.min_char_freq))

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
        """Save what eval/predict need besides the checkpoint into the run's ``workdir``: a
        scratch run's character vocabulary (a pretrained tokenizer stays in ``model.path``)."""
        if isinstance(tokenizer, CharVocab):
            tokenizer.save_pretrained(str(Path(workdir) / TOKENIZER_DIR))

    # --- training and evaluation ----------------------------------------------------------

    def loss(self, model, batch: dict, rng) -> tuple[Any, dict]:
        """``(loss, aux)``; an ``aux["weight"]`` weights the micro-batches (``lib.train``);
        ``rng=None`` is evaluation mode (no dropout)."""
        raise NotImplementedError

    def evaluate(self, model, eval_data, repeat: int = 0) -> tuple[dict[str, float], list]:
        """``(metrics, samples)`` of ``model`` on ``eval_data``."""
        raise NotImplementedError

    def evaluate_repeats(self, model, eval_data, repeats: int) -> Iterator[tuple[dict, list]]:
        """``repeats`` evaluations ``(metrics, samples)``, yielded one by one (the sweep's mean
        of N): ``evaluate`` with repeat numbers ``0 .. repeats - 1``."""
        for r in range(repeats):
            yield self.evaluate(model, eval_data, repeat=r)

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

    def tools(self) -> dict[str, Callable[[Path], None]]:
        """The task's interactive modes (``--mode=NAME`` -> a function of the workdir), e.g.
        the human-feedback tools of ``tasks.ppo`` (default: none)."""
        return {}
