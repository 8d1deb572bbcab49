"""Task families. ``get(name)`` returns the task object that ``config.task`` names.

A task is a small object with plain methods (see ARCHITECTURE.md):
``build(config) -> (model, tokenizer)``, ``datasets(config, tokenizer) -> (train, eval)``,
``loss(model, batch, rng) -> (loss, aux)``, ``evaluate(model, eval_data) -> (metrics, samples)``,
``predict(config, model, tokenizer, inputs) -> outputs`` and ``export(...)``.
"""

from __future__ import annotations

import importlib

from lib.errors import UserError

TASKS = ("classification", "sft", "loopcot")


def get(name: str):
    """The task object for ``config.task == name``."""
    if name not in TASKS:
        raise UserError(f"config.task={name!r} is not a task; choose one of {', '.join(TASKS)}")
    return importlib.import_module(f"tasks.{name}").Task()
