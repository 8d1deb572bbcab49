"""Task families. ``create(config, mode)`` returns the task that ``config.task`` names, built on
its config once the values pass the task's checks; ``tasks.base.Task`` is the interface."""

from __future__ import annotations

import importlib

from lib.errors import UserError

TASKS = ("classification", "sft", "loopcot", "matching", "reward_model", "pet", "p_tuning", "ppo",
         "uie", "simcse", "summarization", "t5_qa", "t5_filling")


def task_class(name: str) -> type:
    """The ``Task`` class of the task ``name``."""
    if name not in TASKS:
        raise UserError(f"config.task={name!r}: choose one of {', '.join(TASKS)}")
    return importlib.import_module(f"tasks.{name}").Task


def create(config, mode: str = "train"):
    """The task of ``config.task`` for ``config`` (validated for ``mode``)."""
    return task_class(config.task).create(config, mode)
