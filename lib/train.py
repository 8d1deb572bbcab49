"""The trainer: one loop for every task, sharded over a device mesh.

Sections, in order: optimizer, the pure train step, state and shardings, the run's files
(config, evaluations, checkpoints), the loop and restoring a checkpoint. The state is a plain
pytree ``{"params": ..., "train": {"step", "opt_state"}}`` of pure dicts; the model is rebuilt
inside the step with ``nnx.merge(graphdef, params, frozen)``.
Everything random is a pure function of ``(seed, step)`` (the batch order and the dropout
key), so a run resumed from a checkpoint at step N continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lib import config as config_lib
from lib import sharding
from lib.checkpoint import Checkpoints
from lib.errors import Preempted, UserError
from lib.monitor import Monitor

# Metric-name words printed as acronyms ("best F1 performance updated", "ROUGE-L").
_ACRONYMS = ("f1", "rouge", "bleu", "l")


def metric_title(name: str) -> str:
    """``name`` as the console prints it: ``f1`` -> ``F1``, ``weighted_f1`` -> ``weighted_F1``,
    ``rouge-l`` -> ``ROUGE-L``, ``bleu-4`` -> ``BLEU-4``; other words unchanged."""
    return re.sub(r"[a-z0-9]+", lambda m: m[0].upper() if m[0] in _ACRONYMS else m[0], name)


# ----------------------------------------------------------------------------- optimizer


def make_schedule(train_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then ``linear`` / ``cosine`` decay to 0 or ``constant``.
    ``train_cfg`` is ``config.train``; fields it lacks take the defaults of ``lib.config``."""
    t = config_lib.complete("train", train_cfg)
    warmup = int(t.warmup_steps)
    if t.warmup_ratio > 0:
        warmup = int(round(float(t.warmup_ratio) * total_steps))
    warmup = min(warmup, total_steps)
    lr = float(t.lr)
    decay_steps = max(total_steps - warmup, 1)
    if t.schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    elif t.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise UserError(
            f"config.train.schedule={t.schedule!r}: choose one of linear, cosine, constant"
        )
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but biases and norm scales."""

    def leaf(path, _):
        return _key(path[-1]) not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(train_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with the decay mask, after global-norm clipping when ``grad_clip > 0``
    (``train_cfg`` as for ``make_schedule``)."""
    t = config_lib.complete("train", train_cfg)
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
    parts.append(
        optax.adamw(
            schedule, b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
            weight_decay=float(t.weight_decay), mask=decay_mask,
        )
    )
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- train step


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum: int,
    seed: int,
) -> Callable:
    """The pure step ``(state, frozen, batch) -> (state, metrics)``.

    ``loss_fn(model, batch, rng) -> (loss, aux)``; an ``aux["weight"]`` (e.g. the number of
    target tokens) makes the loss a weighted mean across micro-batches, so accumulating k
    micro-batches is exactly one k-times larger batch.
    """
    base_key = jax.random.key(seed)

    def weighted_loss(params, frozen, batch, rng):
        model = nnx.merge(graphdef, params, frozen)
        loss, aux = loss_fn(model, batch, rng)
        aux = dict(aux)
        weight = jnp.asarray(aux.pop("weight", 1.0), jnp.float32)
        return loss * weight, (aux, weight)

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)

    def step(state, frozen, batch):
        params = state["params"]
        step_no = state["train"]["step"]
        rng = jax.random.fold_in(base_key, step_no)
        if grad_accum == 1:
            (total, (aux, weight)), grads = grad_fn(params, frozen, batch, rng)
            aux = jax.tree.map(lambda a: a * weight, aux)
        else:
            # Micro-batch i takes rows i, i+k, i+2k, ...: every micro-batch is spread over
            # all batch shards, so no device idles.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
                .swapaxes(0, 1),
                batch,
            )

            def body(carry, inputs):
                mb, i = inputs
                (lw, (aux, w)), g = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
                aux = jax.tree.map(lambda a: a * w, aux)
                return jax.tree.map(jnp.add, carry, (lw, w, g, aux)), None

            aux_shape = jax.eval_shape(
                lambda: grad_fn(params, frozen, jax.tree.map(lambda x: x[0], micro), rng)
            )[0][1][0]
            zeros = (
                jnp.zeros((), jnp.float32),
                jnp.zeros((), jnp.float32),
                jax.tree.map(jnp.zeros_like, params),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
            )
            (total, weight, grads, aux), _ = jax.lax.scan(
                body, zeros, (micro, jnp.arange(grad_accum))
            )
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = total / weight
        updates, opt_state = tx.update(grads, state["train"]["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(step_no),
            **jax.tree.map(lambda a: a / weight, aux),
        }
        new_state = {"params": params, "train": {"step": step_no + 1, "opt_state": opt_state}}
        return new_state, metrics

    return step


# ----------------------------------------------------------------------------- state


def split_model(model: nnx.Module, trainable=nnx.Param):
    """``(graphdef, params, frozen)`` as pure dicts: trainable parameters vs everything else."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    return graphdef, params, frozen


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def place(state: nnx.State, mesh, rules) -> tuple[dict, dict]:
    """Put an ``nnx.State`` on the mesh per its logical axes: ``(arrays, shardings)``."""
    shardings = sharding.param_shardings(state, mesh, rules)
    arrays = jax.device_put(_pure(state), shardings)
    return arrays, shardings


def opt_state_shardings(tx, params, param_sh, mesh):
    """Optimizer-state shardings: moments follow their parameter, the rest is replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        abstract,
        param_sh,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
    )


def init_state(model: nnx.Module, tx, mesh, rules=sharding.DEFAULT_RULES, trainable=nnx.Param):
    """Shard ``model`` on ``mesh`` and build the optimizer state.

    Returns ``(graphdef, state, state_shardings, frozen, frozen_shardings)`` where ``state`` is
    ``{"params", "train": {"step", "opt_state"}}`` and ``frozen`` holds the non-trainable
    variables (e.g. a LoRA base).
    """
    graphdef, params_state, frozen_state = split_model(model, trainable)
    params, param_sh = place(params_state, mesh, rules)
    frozen, frozen_sh = place(frozen_state, mesh, rules)
    opt_sh = opt_state_shardings(tx, params, param_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    rep = sharding.replicated(mesh)
    state = {"params": params, "train": {"step": jnp.zeros((), jnp.int32), "opt_state": opt_state}}
    state_sh = {"params": param_sh, "train": {"step": rep, "opt_state": opt_sh}}
    return graphdef, state, state_sh, frozen, frozen_sh


def compile_step(
    graphdef, loss_fn, tx, schedule, state_sh, frozen_sh, mesh, *, grad_accum: int, seed: int
) -> Callable:
    """The train step jitted with explicit in/out shardings (pjit) and a donated state."""
    return jax.jit(
        make_train_step(graphdef, loss_fn, tx, schedule, grad_accum=grad_accum, seed=seed),
        in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=_compiler_options(mesh.devices.flat[0].platform),
    )


# XLA:CPU runs matmuls with YNNPACK by default; for the fp32 matmuls of a train step its Eigen
# kernels are ~25% faster per core on x86 (about 5-8% of a BERT step). Its YNNPACK reductions
# are kept: without them XLA splits reductions into slower reduce-window passes.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _compiler_options(platform: str) -> dict | None:
    """XLA options for the train step on ``platform``, if this jaxlib knows them (the CPU
    option is experimental and may go away)."""
    if platform != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception:  # an unknown option: keep XLA's defaults
        return None
    return _CPU_COMPILER_OPTIONS


# ----------------------------------------------------------------------------- run files


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_eval(
    workdir: Path, step: int, metrics: dict, samples: list | None, name: str = ""
) -> Path:
    """Write ``workdir/eval/step_N.json`` (``NAME_step_N.json`` for another split than the
    training run's eval split) atomically and return its path."""
    out = Path(workdir) / "eval" / (f"{name}_step_{step}.json" if name else f"step_{step}.json")
    return write_json(out, {"step": step, "metrics": metrics, "samples": samples or []})


def read_evals(workdir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """step -> metrics of every ``eval/step_N.json`` of a run (its own eval split)."""
    out = {}
    for path in sorted((Path(workdir) / "eval").glob("step_*.json")):
        payload = json.loads(path.read_text(encoding="utf-8"))
        out[int(payload["step"])] = payload["metrics"]
    return out


def checkpoints(config, workdir: str | os.PathLike) -> Checkpoints:
    """The run's checkpoints: ``checkpoint.keep`` latest, and the best by ``eval.best_metric``."""
    return Checkpoints(
        Path(workdir) / "checkpoints", keep=int(config.checkpoint.keep),
        best_metric=config.eval.best_metric or None, best_mode=config.eval.best_mode,
    )


# ----------------------------------------------------------------------------- the loop


class Preemption:
    """Turns a signal (SIGTERM by default) into a flag, ``requested``, checked after each step
    (save, then exit cleanly); the previous handler is back on exit."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(self.signum, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(self.signum, self._previous)


def _tokens(batch: dict[str, np.ndarray]) -> int:
    if "attention_mask" in batch:
        return int(np.asarray(batch["attention_mask"]).sum())
    return int(np.asarray(batch["input_ids"]).size) if "input_ids" in batch else 0


def total_steps(config, steps_per_epoch: int) -> int:
    """The run's step count: ``train.epochs`` passes of ``steps_per_epoch``, else
    ``train.steps``."""
    if config.train.epochs > 0:
        return int(config.train.epochs) * steps_per_epoch
    return int(config.train.steps)


def train(config, workdir: str | os.PathLike, task) -> dict[str, float]:
    """Train ``task`` as ``config`` says, resuming from ``workdir`` if it has checkpoints.

    Returns the last evaluation's metrics (of a finished run: read back from its eval file).
    On SIGTERM it saves a checkpoint and raises ``Preempted``.
    """
    workdir = Path(workdir)
    tcfg = config.train
    rules = tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES

    # --- mesh
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    global_batch = int(tcfg.batch_size) * int(tcfg.grad_accum)
    sharding.check_batch_size(int(tcfg.batch_size), mesh)

    # --- model and input
    model, tokenizer = task.build()
    train_data, eval_data = task.datasets(tokenizer)
    # Written once the data has loaded: a data error leaves the workdir untouched.
    if jax.process_index() == 0:
        write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    task.save_assets(tokenizer, workdir)
    steps_per_epoch = max(train_data.steps_per_epoch(global_batch), 1)
    total = total_steps(config, steps_per_epoch)
    eval_every = int(config.eval.every) or total
    if config.eval.count > 0:
        eval_every = max(1, math.ceil(total / int(config.eval.count)))
    ckpt_every = int(config.checkpoint.every) or total
    log_every = int(config.log.every) or total

    # --- shard
    schedule = make_schedule(tcfg, total)
    tx = make_optimizer(tcfg, schedule)
    graphdef, state, state_sh, frozen, frozen_sh = init_state(
        model, tx, mesh, rules, task.trainable()
    )
    del model

    # --- checkpoint: resume, or start from another run's params
    ckpt = checkpoints(config, workdir)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, {"params": state["params"], "train": state["train"]})
        print(f"resumed from {ckpt.directory}/{start}", flush=True)
    elif config.init_from:
        src = Checkpoints(Path(config.init_from) / "checkpoints")
        src_step = src.best_step() or src.latest_step()
        if src_step is None:
            raise UserError(f"config.init_from={config.init_from!r} has no checkpoints")
        state["params"] = src.restore(src_step, {"params": state["params"]})["params"]
        src.close()
        print(f"initialized params from {src.directory}/{src_step}", flush=True)
    start = int(state["train"]["step"])
    print(f"training: {total} steps ({steps_per_epoch} per epoch) of {global_batch} examples, "
          f"evaluation every {eval_every}" + (" (done)" if start >= total else ""), flush=True)

    # --- step
    train_step = compile_step(
        graphdef, task.loss, tx, schedule, state_sh, frozen_sh, mesh,
        grad_accum=int(tcfg.grad_accum), seed=int(tcfg.seed),
    )

    def score(params, data) -> tuple[dict[str, float], list]:
        metrics, samples = task.evaluate(nnx.merge(graphdef, params, frozen), data)
        return {k: float(v) for k, v in metrics.items()}, samples

    best_name, best_max = config.eval.best_metric, config.eval.best_mode == "max"
    # The best so far (a resumed run's earlier evaluations), for the "performance updated" line.
    earlier = [m[best_name] for s, m in read_evals(workdir).items()
               if s <= start and best_name in m]
    best_value = (max if best_max else min)(earlier) if earlier else None

    def evaluate(step: int) -> dict[str, float]:
        nonlocal best_value
        metrics, samples = score(state["params"], eval_data)
        write_eval(workdir, step, metrics, samples)
        monitor.log_eval(step, metrics, samples)
        value = metrics.get(best_name)
        if value is not None and (best_value is None or (value > best_value if best_max
                                                          else value < best_value)):
            shown = "-" if best_value is None else f"{best_value:.4f}"
            if jax.process_index() == 0:
                print(f"best {metric_title(best_name)} performance updated: {shown} --> "
                      f"{value:.4f}",
                      flush=True)
            best_value = value
        return metrics

    # --- loop
    monitor = Monitor(
        str(workdir), total, steps_per_epoch, log_every, enabled=jax.process_index() == 0
    )
    monitor.truncate_after(start)
    pending: list[tuple[int, dict, int]] = []
    last_good = ckpt.latest_step()
    last_eval: dict[str, float] = {}
    t_last, steps_since = time.perf_counter(), 0

    def flush() -> None:
        """Log pending step metrics; stop on a non-finite loss before anything is saved."""
        nonlocal t_last, steps_since
        if not pending:
            return
        host = jax.device_get([m for _, m, _ in pending])
        elapsed = max(time.perf_counter() - t_last, 1e-9)
        for (s, _, _), m in zip(pending, host):
            if not math.isfinite(float(m["loss"])):
                kept = f"the last good checkpoint (step {last_good}) is kept" if last_good \
                    else "no checkpoint was written"
                raise UserError(
                    f"loss is {float(m['loss'])} at step {s}: training stopped; {kept}. "
                    "Lower --config.train.lr or enable --config.train.grad_clip"
                )
        # Metrics are means over the steps since the last log line; the learning rate is the
        # current one.
        values = {k: float(np.mean([float(m[k]) for m in host])) for k in host[-1]}
        values["learning_rate"] = float(host[-1]["learning_rate"])
        tokens = sum(t for _, _, t in pending)
        values["steps_per_sec"] = steps_since / elapsed
        values["tokens_per_sec"] = tokens / elapsed
        monitor.log_train(pending[-1][0], values)
        pending.clear()
        t_last, steps_since = time.perf_counter(), 0

    try:
        with Preemption() as preempt:
            for step in range(start, total):
                batch = train_data.batch(step, global_batch, int(tcfg.seed))
                state, metrics = train_step(state, frozen, sharding.shard_batch(batch, mesh))
                done = step + 1
                pending.append((done, metrics, _tokens(batch)))
                steps_since += 1
                is_eval = done % eval_every == 0 or done == total
                is_ckpt = done % ckpt_every == 0 or done == total
                if done % log_every == 0 or is_eval or is_ckpt or preempt.requested:
                    flush()
                if is_eval:
                    last_eval = evaluate(done)
                if is_ckpt or is_eval or preempt.requested:
                    ckpt.save(done, {"params": state["params"], "train": state["train"]},
                              metrics=last_eval if is_eval else None)
                    last_good = done
                    t_last = time.perf_counter()
                if preempt.requested:
                    print(f"SIGTERM: saved step {done} to {ckpt.directory}; exiting", flush=True)
                    raise Preempted(f"stopped at step {done} of {total}: run the same command "
                                    "again to resume")
        if total == start and start > 0 and not last_eval:
            # A finished run: its last evaluation is on disk (else evaluate it now).
            last_eval = read_evals(workdir).get(start) or evaluate(start)
        best = ckpt.best_step()
        if best is not None:
            print(f"best checkpoint: step {best} by {config.eval.best_metric}", flush=True)
        test_data = task.test_dataset(tokenizer)
        if test_data is not None and jax.process_index() == 0:
            # The held-out number: the checkpoint chosen on the eval split, on the test split.
            step = best or ckpt.latest_step()
            params = ckpt.restore(step, {"params": state["params"]})["params"]
            metrics, samples = score(params, test_data)
            write_eval(workdir, step, metrics, samples, name=Path(config.data.test).stem)
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            print(f"test on {config.data.test} (step {step}): {shown}", flush=True)
    finally:
        ckpt.close()
        monitor.close()
    return last_eval


def _key(entry: Any) -> str:
    """The name of a pytree path entry (a dict key, an attribute or a sequence index)."""
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    return str(entry)


def load_params(task, model: nnx.Module, workdir: str | os.PathLike, step: int) -> nnx.Module:
    """``model`` (as ``task.build`` made it; left unchanged) with the trainable params of
    ``workdir``'s checkpoint ``step``."""
    graphdef, params, frozen = split_model(model, task.trainable())
    ckpt = checkpoints(task.config, workdir)
    # Every param comes back on the default device, where the frozen ones (host or fresh
    # arrays) are computed: a model built on a checkpoint mixes host arrays with device ones
    # (a fresh head, LoRA adapters), which restored as they are could not meet in one jit.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=device),
                           _pure(params))
    restored = ckpt.restore(step, {"params": targets})["params"]
    ckpt.close()
    return nnx.merge(graphdef, restored, frozen)


def restore_model(task, workdir: str | os.PathLike, which: str | int = "best"):
    """Build the task's model and load a checkpoint's params from ``workdir``:
    ``(model, tokenizer, step)``. ``which`` is ``"best"`` (else latest), ``"latest"`` or a
    step number."""
    model, tokenizer = task.build()
    ckpt = checkpoints(task.config, workdir)
    steps = ckpt.all_steps()
    best = ckpt.best_step() if which == "best" else None
    ckpt.close()
    if isinstance(which, int):
        if which not in steps:
            raise UserError(f"{ckpt.directory} has no checkpoint of step {which}")
        step = which
    else:
        step = best or (steps[-1] if steps else None)
    if step is None:
        raise UserError(f"{ckpt.directory} has no checkpoint: train first (--mode=train)")
    return load_params(task, model, workdir, step), tokenizer, step
