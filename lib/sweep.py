"""Multi-run experiments: several trainings of one task, compared by repeated evaluation.

A config declares the runs as config overrides, ``config.sweep.runs = {name: overrides}``
(``lib.config.nest({"loss.focal_gamma": 2.0})``). ``run`` then

1. evaluates the untrained model ``sweep.untrained_repeats`` times (0: skipped), built from the
   config with the ``sweep.untrained`` overrides, in ``<workdir>/untrained/``;
2. trains every run in ``<workdir>/<name>/`` through its task's ``run`` (the normal trainer:
   a killed sweep started again resumes where it stopped);
3. evaluates the kept checkpoints of a run that have no evaluation yet, so that the selection
   sees them all, and selects a checkpoint per *part*: a task whose metrics are named
   ``<part>/<metric>`` (LoopCoT's test parts) has one per part, the bare metric names form the
   part ``all``. The selection metric is ``sweep.select_metric`` (empty: ``eval.best_metric``),
   per part, better as ``eval.best_mode`` says;
4. evaluates each selected checkpoint ``sweep.repeats`` times, ``Task.evaluate_repeats``
   (a task that samples draws other keys for each; a deterministic one gives std 0), and writes
   ``<run>/mean_of_<N>_<part>.json``: every repeat's ``sweep.metrics``, their mean and
   population std;
5. draws ``plots/<part>_result.png`` (each metric vs step, one line per run, from the untrained
   model at step 0), prints the table of mean ± std and writes ``summary.json``.

Finished trainings and mean-of-N files of a still selected checkpoint are not redone.
Checkpoints, step counts, evaluation files and JSON writes are the trainer's (``lib.train``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lib import config as config_lib
from lib import train
from lib.errors import UserError

UNTRAINED = "untrained"
# The part of the metrics that are not named "<part>/<metric>".
ALL = "all"


def run_config(config, workdir: str | Path, name: str):
    """The config of run ``name`` (or of ``UNTRAINED``): the sweep's config with the run's
    overrides, the run's own workdir, and no sweep."""
    if name == UNTRAINED:
        overrides, where = config.sweep.untrained, "sweep.untrained"
    else:
        overrides, where = config.sweep.runs[name], f"sweep.runs.{name}"
    c = config_lib.with_overrides(config, overrides, where)
    c.sweep.runs = {}
    c.workdir = str(Path(workdir) / name)
    return c


# ----------------------------------------------------------------------------- statistics


def split_parts(metrics: dict[str, float], names) -> dict[str, dict[str, float]]:
    """``{part: {name: value}}`` of the metrics ``names``: ``<part>/<name>`` keys give one part
    each (in the order the task reports them), bare names the part ``ALL``."""
    out = {}
    if all(n in metrics for n in names):
        out[ALL] = {n: float(metrics[n]) for n in names}
    for part in dict.fromkeys(k.rsplit("/", 1)[0] for k in metrics if "/" in k):
        if all(f"{part}/{n}" in metrics for n in names):
            out[part] = {n: float(metrics[f"{part}/{n}"]) for n in names}
    return out


def part_key(part: str, metric: str) -> str:
    """The task's name of ``metric`` of ``part``."""
    return metric if part == ALL else f"{part}/{metric}"


def aggregate(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (population, ddof 0) standard deviation of each metric over repeats."""
    if not values:
        return {"mean": {}, "std": {}}
    arr = {k: np.asarray([v[k] for v in values], np.float64) for k in values[0]}
    return {
        "mean": {k: float(a.mean()) for k, a in arr.items()},
        "std": {k: float(a.std()) for k, a in arr.items()},
    }


def format_table(rows: list[tuple[str, str, dict]], metrics) -> str:
    """A text table of ``(run, part, {"mean", "std"})`` rows: one "mean ± std" column per
    metric (4 decimals when every mean is at most 1, else 2)."""
    means = [abs(stats["mean"][m]) for _, _, stats in rows for m in metrics]
    digits = 4 if means and max(means) <= 1 else 2
    width = 9 + 3 + digits + 2
    head = f"{'run':<24}{'part':<20}" + "".join(f"{m.upper():>{width}}" for m in metrics)
    lines = [head, "-" * len(head)]
    for run, part, stats in rows:
        cells = "".join(
            f"{stats['mean'][m]:>9.{digits}f} ± {stats['std'][m]:<{digits + 2}.{digits}f}"
            for m in metrics
        )
        lines.append(f"{run:<24}{part:<20}{cells}")
    return "\n".join(lines)


def select_step(history: dict[int, dict], kept: list[int], key: str, mode: str,
                trainer_best: int | None) -> tuple[int, str]:
    """The kept checkpoint with the best ``key`` in its evaluation (of equals: the trainer's
    best, else the earliest), and how it was chosen."""
    scored = [s for s in kept if s in history and key in history[s]]
    if scored:
        sign = 1.0 if mode == "max" else -1.0
        best = max(scored, key=lambda s: (sign * history[s][key], s == trainer_best, -s))
        return best, f"best {key} of {len(scored)} kept checkpoints"
    if trainer_best is not None:
        return trainer_best, "the trainer's best checkpoint"
    return kept[-1], "the latest checkpoint"


# ----------------------------------------------------------------------------- evaluation


def _committed(model: nnx.Module) -> nnx.Module:
    """``model`` with its arrays committed to the first device, as restored checkpoints are:
    jit caches by placement, so the untrained and the restored models then share one
    compiled decoding function instead of compiling it twice."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))


def _repeat(task, model, eval_data, repeats: int, label: str) -> tuple[list[dict], list]:
    """``repeats`` evaluations (``Task.evaluate_repeats``): ``(metrics of each, samples of the
    first)``, printing progress."""
    select = task.config.sweep.select_metric or task.config.eval.best_metric
    values, first_samples = [], []
    t0 = time.perf_counter()
    for r, (metrics, samples) in enumerate(task.evaluate_repeats(model, eval_data, repeats)):
        metrics = {k: float(v) for k, v in metrics.items()}
        values.append(metrics)
        first_samples = first_samples or samples
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if k == select or k.endswith("/" + select))
        print(f"  {label}: repeat {r + 1}/{repeats}, {shown} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return values, first_samples


def _mean_path(run_dir: Path, part: str, repeats: int) -> Path:
    return run_dir / f"mean_of_{repeats}_{part}.json"


def _mean_done(run_dir: Path, part: str, repeats: int, step: int, names) -> dict | None:
    """The mean-of-N file of ``part`` if it is of checkpoint ``step`` and of ``names``."""
    path = _mean_path(run_dir, part, repeats)
    if not path.is_file():
        return None
    payload = json.loads(path.read_text(encoding="utf-8"))
    return payload if payload["step"] == step and list(payload["mean"]) == list(names) else None


def _write_mean(task, run_dir: Path, name: str, part: str, step: int, how: str,
                values: list[dict]) -> dict:
    """Write ``run_dir/mean_of_<N>_<part>.json``: every repeat's scores, mean and std."""
    names = task.config.sweep.metrics
    scores = [split_parts(v, names)[part] for v in values]
    stats = aggregate(scores)
    payload = {
        "run": name, "part": part, "step": step, "selected_by": how, "repeats": len(scores),
        "eval": task.config.eval.to_dict(), "mean": stats["mean"], "std": stats["std"],
        "values": scores,
    }
    train.write_json(_mean_path(run_dir, part, len(scores)), payload)
    return payload


def _parts(task, metrics: dict) -> list[str]:
    names = tuple(task.config.sweep.metrics)
    parts = list(split_parts(metrics, names))
    if not parts:
        raise UserError(f"config.sweep.metrics={names}: the task reports {sorted(metrics)}")
    return parts


def _evaluate_untrained(task, out_dir: Path) -> dict[str, dict]:
    """The untrained model's mean-of-N per part (its first evaluation is ``eval/step_0.json``,
    the plots' starting point): ``{part: mean-of-N JSON}``."""
    s = task.config.sweep
    first = train.read_evals(out_dir).get(0)
    if first is not None:
        done = {p: _mean_done(out_dir, p, s.untrained_repeats, 0, s.metrics)
                for p in _parts(task, first)}
        if all(done.values()):
            return done
    print(f"== untrained model: {s.untrained_repeats} evaluations", flush=True)
    train.write_json(out_dir / "config.json", json.loads(task.config.to_json_best_effort()))
    model, tokenizer = task.build()
    task.save_assets(tokenizer, out_dir)
    _, eval_data = task.datasets(tokenizer)
    values, samples = _repeat(task, _committed(model), eval_data, s.untrained_repeats,
                              UNTRAINED)
    train.write_eval(out_dir, 0, values[0], samples)
    return {p: _write_mean(task, out_dir, UNTRAINED, p, 0, "untrained model", values)
            for p in _parts(task, values[0])}


def _evaluate_run(task, run_dir: Path, name: str) -> tuple[dict[str, dict], dict[int, dict]]:
    """Evaluate the kept checkpoints that have no evaluation, select each part's checkpoint
    and evaluate it ``sweep.repeats`` times: ``({part: mean-of-N JSON}, {step: metrics})``."""
    config, s = task.config, task.config.sweep
    ckpt = train.checkpoints(config, run_dir)
    kept, trainer_best = ckpt.all_steps(), ckpt.best_step()
    ckpt.close()
    if not kept:
        raise UserError(f"{run_dir}: no checkpoints: run {name!r} was not trained")
    history = train.read_evals(run_dir)
    built: list = []

    def restored(step: int):
        """The model at checkpoint ``step`` and the eval data (the model built once)."""
        if not built:
            model, tokenizer = task.build()
            built.extend([model, task.datasets(tokenizer)[1]])
        return _committed(train.load_params(task, built[0], run_dir, step)), built[1]

    for step in [s for s in kept if s not in history]:
        print(f"  {name}: evaluating checkpoint {step} (no evaluation on disk)", flush=True)
        metrics, samples = task.evaluate(*restored(step))
        history[step] = {k: float(v) for k, v in metrics.items()}
        train.write_eval(run_dir, step, history[step], samples)
    select = s.select_metric or config.eval.best_metric
    results: dict[str, Any] = {}
    best = {}
    for part in _parts(task, history[kept[-1]]):
        best[part] = select_step(history, kept, part_key(part, select), config.eval.best_mode,
                                 trainer_best)
        results[part] = _mean_done(run_dir, part, s.repeats, best[part][0], s.metrics)
    for step in sorted({best[p][0] for p, done in results.items() if not done}):
        group = [p for p, done in results.items() if not done and best[p][0] == step]
        for part in group:
            print(f"  {name} {part}: checkpoint {step} ({best[part][1]})", flush=True)
        model, eval_data = restored(step)
        values, _ = _repeat(task, model, eval_data, s.repeats, name)
        for part in group:
            results[part] = _write_mean(task, run_dir, name, part, step, best[part][1], values)
    return results, history


# ----------------------------------------------------------------------------- report


def plot_results(workdir: Path, histories: dict[str, dict[int, dict]], names,
                 start: dict[str, dict]) -> list[Path]:
    """``plots/<part>_result.png``: each metric of ``names`` vs step, one line per run that
    has the part, from the ``start`` point (the untrained model) at step 0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_run = {run: {step: split_parts(m, names) for step, m in sorted(h.items())}
              for run, h in histories.items()}
    parts = dict.fromkeys(p for h in by_run.values() for ps in h.values() for p in ps)
    ncols = min(2, len(names))
    nrows = math.ceil(len(names) / ncols)
    written = []
    for part in parts:
        fig = Figure(figsize=(6 * ncols, 4 * nrows))
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for run, history in by_run.items():
            steps = [step for step, ps in history.items() if part in ps]
            first = start.get(part)
            for ax, metric in zip(axes, names):
                xs = ([0] if first else []) + steps
                ys = ([first[metric]] if first else []) + [history[s][part][metric] for s in steps]
                if steps:
                    ax.plot(xs, ys, marker="o", markersize=3, label=run)
        for ax, metric in zip(axes, names):
            ax.set_title(f"{part}: {metric.upper()}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in axes[len(names):]:
            ax.set_visible(False)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        out = workdir / "plots" / f"{part}_result.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=90)
        written.append(out)
    return written


def _report(config, workdir: Path, untrained: dict, results: dict, histories: dict,
            t_start: float) -> dict[str, float]:
    """Plots, the printed table and ``summary.json``; the flat means ``run/part/metric``."""
    s = config.sweep
    names = tuple(s.metrics)
    select = s.select_metric or config.eval.best_metric
    compared = select if select in names else names[0]
    first = train.read_evals(workdir / UNTRAINED).get(0) if untrained else None
    plots = plot_results(workdir, histories, names, split_parts(first, names) if first else {})
    rows = [(UNTRAINED, p, untrained[p]) for p in untrained]
    rows += [(run, p, results[run][p]) for run in results for p in results[run]]
    table = format_table(rows, names)
    comparison = {
        part: {f"untrained_{compared}": untrained[part]["mean"][compared],
               f"trained_{compared}": {r: results[r][part]["mean"][compared]
                                       for r in results if part in results[r]}}
        for part in untrained
    }
    wall = time.perf_counter() - t_start
    keys = ("step", "selected_by", "repeats", "mean", "std", "values")
    summary = {
        "runs": {r: {p: {k: v[k] for k in keys} for p, v in results[r].items()} for r in results},
        UNTRAINED: {p: {k: v[k] for k in keys[2:]} for p, v in untrained.items()},
        "repeats": int(s.repeats),
        "metrics": list(names),
        "trained_vs_untrained": comparison,
        "table": table.splitlines(),
        "plots": [str(p) for p in plots],
        "wall_seconds_this_invocation": round(wall, 1),
    }
    train.write_json(workdir / "summary.json", summary)
    print(table, flush=True)
    for part, c in comparison.items():
        shown = ", ".join(f"{r} {v:.4g}" for r, v in c[f"trained_{compared}"].items())
        print(f"{part} {compared.upper()}: untrained {c[f'untrained_{compared}']:.4g}; "
              f"trained: {shown}", flush=True)
    print(f"plots: {', '.join(str(p) for p in plots)}; summary: {workdir / 'summary.json'}; "
          f"{wall / 60:.1f} min", flush=True)
    return {f"{r}/{p}/{m}": v["mean"][m] for r in results for p, v in results[r].items()
            for m in names}


def run(task, workdir: str | Path) -> dict[str, float]:
    """The sweep of ``task.config`` (see the module docstring); returns the mean of each
    metric as ``run/part/metric``."""
    t_start = time.perf_counter()
    config, workdir = task.config, Path(workdir)
    s = config.sweep
    # Every run's config is checked before anything runs.
    create = type(task).create
    runs = {name: create(run_config(config, workdir, name)) for name in s.runs}
    untrained_task = None
    if s.untrained_repeats > 0:
        untrained_task = create(run_config(config, workdir, UNTRAINED))
    train.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    print(f"sweep: runs {', '.join(runs)}; each selected checkpoint evaluated {s.repeats} "
          "times", flush=True)
    untrained = _evaluate_untrained(untrained_task, workdir / UNTRAINED) if untrained_task \
        else {}
    for i, (name, run_task) in enumerate(runs.items(), 1):
        print(f"== run {i}/{len(runs)}: {name}", flush=True)
        run_task.run(workdir / name)
    print(f"== mean of {s.repeats} per run and part", flush=True)
    results, histories = {}, {}
    for name, run_task in runs.items():
        results[name], histories[name] = _evaluate_run(run_task, workdir / name, name)
    return _report(config, workdir, untrained, results, histories, t_start)
