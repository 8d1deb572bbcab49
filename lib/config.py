"""The fields every experiment shares, and the validation of config values.

``base(task, variant)`` is where each experiment file in ``configs/`` starts: the model
basics, the trainer, mesh, checkpoint, evaluation, logging, prediction and sweep fields, each
with its default and its meaning. An experiment file adds its task's own fields and states
only what differs.

``validate(config, rules, mode)`` checks values before anything runs, against a table
``{dotted key: Rule}``: ``BASE_RULES`` for the fields here, plus what each task adds
(``tasks.base.Task.RULES``). A bad value is one ``UserError`` naming the key, the value and
what is allowed: ``config.train.schedule='cosin': choose one of linear, cosine, constant``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from lib.errors import UserError

MODES = ("train", "eval", "predict", "export", "rate", "rank")
# Where the data files are read: predict and export work from the run's saved assets.
DATA_MODES = ("train", "eval")


def base(task: str, variant: str) -> ml_collections.ConfigDict:
    """The shared fields with their defaults (see the module docstring)."""
    c = ml_collections.ConfigDict()
    # Task module in tasks/.
    c.task = task
    # Which named variant of the experiment file built this config.
    c.variant = variant
    # Filled in by main.py from --workdir: the run's checkpoints, logs, vocabulary, exports.
    c.workdir = ""
    # Train params only from another run's workdir (its best, else latest checkpoint).
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    # HF checkpoint directory (its config.json's model_type picks the port, lib.models); empty:
    # a small model of `family` trained from scratch, sized below.
    c.model.path = ""
    # Scratch model: the port (an HF model_type of lib.models.PORTS: qwen2, llama, gpt2, glm,
    # bert, ...).
    c.model.family = "qwen2"
    # HF hub id this variant stands for (download it on a connected machine).
    c.model.hub_id = ""
    # Compute dtype (params stay fp32): float32, or bfloat16 on accelerators.
    c.model.dtype = "float32"
    # Recompute each layer's activations in the backward pass to save memory.
    c.model.remat = False
    # Scratch model (HF config names): hidden size.
    c.model.hidden_size = 128
    # Scratch model: transformer layers.
    c.model.num_hidden_layers = 2
    # Scratch model: attention heads.
    c.model.num_attention_heads = 4
    # Scratch model: key/value heads (grouped-query attention; decoders that have it).
    c.model.num_key_value_heads = 4
    # Scratch model: feed-forward width.
    c.model.intermediate_size = 256
    # Scratch model: dropout.
    c.model.dropout = 0.0
    # Scratch model: characters seen fewer times than this map to [UNK].
    c.model.min_char_freq = 1
    c.model.lora = ml_collections.ConfigDict()
    # LoRA rank; 0 trains every parameter.
    c.model.lora.rank = 0
    # LoRA scale numerator: the update is (alpha / rank) * B A.
    c.model.lora.alpha = 32.0
    # Dropout on the LoRA input.
    c.model.lora.dropout = 0.1
    # Modules that get adapters: our module names or the checkpoint's HF ones (GPT-2's
    # c_attn), as a suffix ("q_proj") or a regex over the dotted path.
    c.model.lora.targets = ("q_proj", "v_proj")
    # What --mode=export writes for a LoRA run: "adapter" (a PEFT adapter directory in the
    # base's HF module names) or "merged" (the base with the adapters folded in).
    c.model.lora.export = "adapter"
    c.model.prefix = ml_collections.ConfigDict()
    # p-tuning v2: learned key/value positions in front of every decoder layer; 0: none.
    # Only the prefix is trained.
    c.model.prefix.length = 0
    # Reparametrize the prefix through a tanh MLP (ChatGLM's prefix_projection).
    c.model.prefix.projection = False
    # Width of that MLP; 0: the model's hidden size.
    c.model.prefix.hidden_size = 0
    # Dropout on the prefix while training.
    c.model.prefix.dropout = 0.0

    c.data = ml_collections.ConfigDict()
    # Training data file.
    c.data.train = ""
    # Held-out data evaluated during training (model selection) and by --mode=eval.
    c.data.eval = ""

    c.train = ml_collections.ConfigDict()
    # Optimizer steps (ignored when epochs > 0).
    c.train.steps = 1000
    # Whole passes over the training data; 0: use `steps`.
    c.train.epochs = 0
    # Examples per micro-batch (global, across devices).
    c.train.batch_size = 16
    # Micro-batches accumulated per optimizer step (weighted by the loss's `weight`, e.g.
    # target tokens, so k micro-batches are exactly one k-times larger batch).
    c.train.grad_accum = 1
    # Peak learning rate.
    c.train.lr = 1e-3
    # Learning-rate schedule after warmup: linear, cosine or constant.
    c.train.schedule = "linear"
    # Warmup steps (warmup_ratio > 0 overrides it).
    c.train.warmup_steps = 0
    # Warmup as a fraction of all steps.
    c.train.warmup_ratio = 0.0
    # AdamW weight decay (never on biases and norm scales).
    c.train.weight_decay = 0.01
    # Clip gradients to this global norm; 0 disables.
    c.train.grad_clip = 1.0
    # AdamW first-moment decay.
    c.train.b1 = 0.9
    # AdamW second-moment decay.
    c.train.b2 = 0.999
    # AdamW epsilon.
    c.train.eps = 1e-8
    # Seed of initialization, data order and dropout.
    c.train.seed = 42

    c.mesh = ml_collections.ConfigDict()
    # Data-parallel axis size; -1 takes the devices left over.
    c.mesh.data = -1
    # Fully-sharded data-parallel axis size (shards params and batch).
    c.mesh.fsdp = 1
    # Tensor-parallel axis size (shards heads, MLP, vocab).
    c.mesh.tensor = 1
    # (logical axis, mesh axis) pairs placing the parameters; empty: lib.sharding.DEFAULT_RULES.
    c.mesh.rules = ()

    c.checkpoint = ml_collections.ConfigDict()
    # Save every this many steps (evaluations and the last step also save); 0: only those.
    c.checkpoint.every = 0
    # Latest checkpoints kept (the best by eval.best_metric is kept as well).
    c.checkpoint.keep = 2

    c.eval = ml_collections.ConfigDict()
    # Evaluate every this many steps (and at the end); 0: only at the end.
    c.eval.every = 0
    # Evaluations spread evenly over the run (each also saves); 0: every `every` steps.
    c.eval.count = 0
    # Eval batch size.
    c.eval.batch_size = 16
    # Metric that picks the best checkpoint.
    c.eval.best_metric = "loss"
    # Whether a larger (max) or smaller (min) best_metric is better.
    c.eval.best_mode = "min"

    c.log = ml_collections.ConfigDict()
    # Print and log training metrics every this many steps; 0: at evaluations and saves only.
    c.log.every = 10

    c.predict = ml_collections.ConfigDict()
    # --mode=predict reads one input per line from this file ('-' = stdin).
    c.predict.input = "-"

    c.sweep = ml_collections.ConfigDict()
    # Runs of a multi-run experiment (lib.sweep): name -> config overrides, e.g.
    # {"focal": nest({"loss.focal_gamma": 2.0})}; each trains in <workdir>/<name>/, in name
    # order. Empty: --mode=train is one training in <workdir>.
    c.sweep.runs = {}
    # Evaluations of each run's selected checkpoint, with different sampling keys.
    c.sweep.repeats = 1
    # Metrics of the table, the plots and the mean/std (a task's "<part>/<metric>" metrics
    # give one row per part).
    c.sweep.metrics = ()
    # Metric selecting each run's (and part's) checkpoint, better as eval.best_mode says;
    # empty: eval.best_metric.
    c.sweep.select_metric = ""
    # Evaluations of the untrained model (<workdir>/untrained/); 0: none.
    c.sweep.untrained_repeats = 0
    # Config overrides of the untrained model's config (e.g. the data whose parts it scores).
    c.sweep.untrained = {}
    return c


def nest(flat: Mapping[str, Any]) -> dict:
    """``{"loss.focal_gamma": 2.0}`` -> ``{"loss": {"focal_gamma": 2.0}}`` (config overrides
    are stored nested: ConfigDict keys cannot hold dots, and nested ones can be overridden
    from the command line)."""
    out: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def with_overrides(config, overrides, where: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the nested ``overrides`` (``config.<where>``) set; a key that
    the config lacks or a value of the wrong type is a ``UserError`` naming it."""
    out = config.copy_and_resolve_references()

    def put(node, tree, path: str) -> None:
        for key, value in tree.items():
            name = f"{path}.{key}" if path else key
            if key not in node:
                raise UserError(f"config.{where}: {name!r} is not a config key")
            nested = isinstance(value, Mapping | ml_collections.ConfigDict)
            if isinstance(node[key], ml_collections.ConfigDict) and nested:
                put(node[key], value, name)
                continue
            try:
                node[key] = value
            except TypeError:
                raise UserError(
                    f"config.{where}: {name}={value!r} does not fit the field's type "
                    f"({type(node[key]).__name__})"
                ) from None

    put(out, overrides, "")
    return out


def complete(section: str, partial) -> ml_collections.ConfigDict:
    """The ``base`` section ``section`` with the fields of ``partial`` (a section that may
    omit some, as hand-made ones in tests and benchmarks do)."""
    out = base("", "")[section]
    out.update(dict(partial))
    return out


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class Rule:
    """A check of one config value: ``problem(value, config)`` says what is wrong (what is
    allowed), or None; ``modes`` are the --mode values in which it applies."""

    problem: Callable[[Any, Any], str | None]
    modes: tuple[str, ...] = MODES


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: Callable[[Any, Any], bool], allowed: str, modes=MODES) -> Rule:
    return Rule(lambda v, c: None if ok(v, c) else allowed, modes)


def at_least(low: float) -> Rule:
    """A number >= ``low``."""
    return _check(lambda v, c: _number(v) and v >= low, f"must be >= {low}")


def above(low: float) -> Rule:
    """A number > ``low``."""
    return _check(lambda v, c: _number(v) and v > low, f"must be > {low}")


def interval(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Rule:
    """A number between ``low`` and ``high`` (by default ``[low, high)``)."""

    def ok(v, c) -> bool:
        if not _number(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    shown = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return _check(ok, f"must be in {shown}")


def fraction() -> Rule:
    """A number in [0, 1)."""
    return interval(0, 1)


def one_of(*choices: Any) -> Rule:
    """One of ``choices``."""
    return _check(lambda v, c: v in choices, f"choose one of {', '.join(map(str, choices))}")


def data_file(*, optional: bool = False, modes=DATA_MODES) -> Rule:
    """An existing file (``optional``: or empty), checked where the data is read."""
    return _check(lambda v, c: (optional and not v) or os.path.isfile(str(v)),
                  "no such file" + (" (empty: none)" if optional else ""), modes)


def directory(*, optional: bool = True, modes=MODES) -> Rule:
    """An existing directory (``optional``: or empty)."""
    return _check(lambda v, c: (optional and not v) or os.path.isdir(str(v)),
                  "no such directory", modes)


def _workdir_problem(value: Any, config) -> str | None:
    """A run directory: not a file, and creatable (its nearest existing ancestor is a
    writable directory). Empty is allowed (a config used in-process, without a run dir)."""
    if not value:
        return None
    path = Path(str(value)).absolute()
    if path.exists() and not path.is_dir():
        return "is a file; --workdir must name a directory"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"cannot create it: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing}"
    return None


def _family_problem(value: Any, config) -> str | None:
    from lib import models

    return None if value in models.PORTS else f"choose one of {', '.join(models.PORTS)}"


def _sweep_runs_problem(runs, config) -> str | None:
    for name in runs:
        if not name or name != Path(name).name or name in ("untrained", ".", ".."):
            return f"run name {name!r} must be a plain directory name (not 'untrained')"
    return None


BASE_RULES: dict[str, Rule] = {
    "workdir": Rule(_workdir_problem),
    "init_from": directory(modes=("train",)),
    "model.path": directory(),
    "model.family": Rule(_family_problem),
    "model.dtype": one_of("float32", "bfloat16"),
    "model.hidden_size": at_least(1),
    "model.num_hidden_layers": at_least(1),
    "model.num_attention_heads": at_least(1),
    "model.num_key_value_heads": at_least(1),
    "model.intermediate_size": at_least(1),
    "model.dropout": fraction(),
    "model.min_char_freq": at_least(1),
    "model.lora.rank": at_least(0),
    "model.lora.alpha": above(0),
    "model.lora.dropout": fraction(),
    "model.lora.export": one_of("adapter", "merged"),
    "model.prefix.length": at_least(0),
    "model.prefix.hidden_size": at_least(0),
    "model.prefix.dropout": fraction(),
    "data.train": data_file(),
    "data.eval": data_file(),
    "train.steps": _check(lambda v, c: _number(v) and (v >= 1 or c.train.epochs >= 1),
                          "must be >= 1 (or train.epochs >= 1)"),
    "train.epochs": at_least(0),
    "train.batch_size": at_least(1),
    "train.grad_accum": at_least(1),
    # 0 is allowed: a run that must leave the params as they are.
    "train.lr": at_least(0),
    "train.schedule": one_of("linear", "cosine", "constant"),
    "train.warmup_steps": at_least(0),
    "train.warmup_ratio": fraction(),
    "train.weight_decay": at_least(0),
    "train.grad_clip": at_least(0),
    "train.b1": fraction(),
    "train.b2": fraction(),
    "train.eps": above(0),
    "train.seed": at_least(0),
    "mesh.data": _check(lambda v, c: v == -1 or (_number(v) and v >= 1),
                        "must be >= 1, or -1 (the devices left over)"),
    "mesh.fsdp": _check(lambda v, c: v == -1 or (_number(v) and v >= 1),
                        "must be >= 1, or -1 (the devices left over)"),
    "mesh.tensor": _check(lambda v, c: v == -1 or (_number(v) and v >= 1),
                          "must be >= 1, or -1 (the devices left over)"),
    "checkpoint.every": at_least(0),
    "checkpoint.keep": at_least(1),
    "eval.every": at_least(0),
    "eval.count": at_least(0),
    "eval.batch_size": at_least(1),
    "eval.best_mode": one_of("max", "min"),
    "log.every": at_least(0),
    "sweep.runs": Rule(_sweep_runs_problem),
    "sweep.metrics": _check(lambda v, c: bool(v) or not c.sweep.runs,
                            "name the metrics that compare the runs of sweep.runs"),
    "sweep.repeats": at_least(1),
    "sweep.untrained_repeats": at_least(0),
}


def lookup(config, key: str) -> Any:
    """The value of a dotted ``key``; a ``KeyError`` naming it if the config lacks it."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict | Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def validate(config, rules: Mapping[str, Rule], mode: str = "train") -> None:
    """Check ``config`` against ``rules`` for ``mode``; the first bad value is a ``UserError``:
    ``config.<key>=<value>: <what is allowed>``."""
    for key, rule in rules.items():
        if mode not in rule.modes:
            continue
        try:
            value = lookup(config, key)
        except KeyError:
            raise UserError(f"config.{key} is missing (the config file must define it)") from None
        problem = rule.problem(value, config)
        if problem:
            raise UserError(f"config.{key}={value!r}: {problem}")
