"""Monitoring for the trainer: TensorBoard events, console progress, PNG curves.

One `Monitor` per run writes, under the workdir:

    tensorboard/events.out.tfevents.*   scalars `train/<name>`, `eval/<name>`, sample tables
    plots/curves.png                    loss, learning rate and every eval metric vs step
    plots/history.json                  every logged point, so a resumed run can redraw them

and prints the console line of the original systems every time the trainer logs:

    global step 120, epoch: 2, loss: 0.41230, speed: 5.12 step/s

Events are written synchronously (tensorboardX's `SummaryWriter` queues them in a background
process-queue that its `flush()` does not drain, so a killed run could lose its last points) and
without TensorFlow. On resume the trainer calls `truncate_after(step)`: the history drops the
points logged after the restored checkpoint, and the new event file starts with a SessionLog
START at `step + 1`, which makes TensorBoard discard the stale points of the killed run. The
resumed run then shows exactly what an uninterrupted run would.
"""

import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import IO, Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from lib.errors import UserError

# Fonts with Chinese glyphs, tried in order (e.g. Debian's fonts-noto-cjk / fonts-wqy-zenhei).
CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "SimHei",
             "Microsoft YaHei", "PingFang SC", "Source Han Sans SC"]


def _import_tensorboardx():
    """Import tensorboardX's event writer without its ``import torch`` (4+ s of start-up for
    every run; we never hand it tensors). Where torch is already loaded nothing changes."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
    finally:
        if blocked:
            del sys.modules["torch"]
    return summary, EventsWriter, Event, SessionLog


tbx_summary, EventsWriter, Event, SessionLog = _import_tensorboardx()

# Indirection so that tests can drive the clock behind speed and ETA.
_clock = time.monotonic

SAMPLES_SHOWN = 5  # sample predictions put in the TensorBoard text table per evaluation
_CELL_CHARS = 200  # longer sample fields are cut in the table
_PLOT_EVERY_S = 60.0  # log_train redraws the PNG at most this often (log_eval always does)


def format_duration(seconds: float) -> str:
    """A short human duration: "45s", "3m12s", "1h02m"; "?" when unknown (NaN or infinite)."""
    if not math.isfinite(seconds):
        return "?"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def epoch_of(step: int, steps_per_epoch: int) -> int:
    """The 1-based epoch that step `step` (1-based: the count of steps done) belongs to.

    The original loops count `global_step += 1` before logging inside
    `for epoch in range(1, epochs + 1)`, so the last step of epoch 1 is step `steps_per_epoch`.
    """
    return (max(step, 1) - 1) // max(steps_per_epoch, 1) + 1


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The real-number entries of `metrics` as floats (strings, lists, dicts are left out)."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
            continue
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through a temp file in the same directory, so readers never see half of it."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the plot is for everyone who can read runs
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _markdown_table(samples: list[dict]) -> str:
    """The first SAMPLES_SHOWN samples as a markdown table, one column per key."""
    shown = samples[:SAMPLES_SHOWN]
    keys: list[str] = []
    for sample in shown:
        keys += [str(k) for k in sample if str(k) not in keys]

    def cell(value: Any) -> str:
        text = str(value)
        if len(text) > _CELL_CHARS:
            text = text[:_CELL_CHARS] + "…"
        return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for sample in shown:
        by_name = {str(k): v for k, v in sample.items()}
        lines.append("| " + " | ".join(cell(by_name.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


class Monitor:
    """TensorBoard events, console lines, a progress bar and PNG curves for one training run.

    Args:
      workdir: the run directory; `tensorboard/` and `plots/` are made under it.
      total_steps: the last step of the run (progress bar and ETA).
      steps_per_epoch: steps in one pass over the training data (the `epoch:` of the line).
      log_every: the trainer's logging interval; the speed of the first line after a (re)start
        is `log_every` steps over the time since construction when the trainer gives none.
      enabled: False on non-zero jax processes; every method is then a no-op.
      plots: the training scalars drawn in the PNG, one panel each (default: the loss and the
        learning rate); the eval metrics follow.
    """

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        steps_per_epoch: int,
        log_every: int,
        enabled: bool = True,
        plots: Sequence[str] = ("loss", "learning_rate"),
    ):
        self.enabled = enabled
        self.plots = tuple(plots)
        self.total_steps = total_steps
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.log_every = max(1, log_every)
        self.history: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self.plot_path = os.path.join(workdir, "plots", "curves.png")
        self.history_path = os.path.join(workdir, "plots", "history.json")
        if not enabled:
            return
        os.makedirs(self.tensorboard_dir, exist_ok=True)
        os.makedirs(os.path.dirname(self.plot_path), exist_ok=True)
        # Opened on the first write, so that a resume (truncate_after) leaves no empty file.
        self._writer: EventsWriter | None = None
        self._purge_step: int | None = None
        self._closed = False
        # Without a terminal the bar would be unreadable control characters in a log file;
        # the console lines then carry the ETA instead.
        self._use_bar = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self._bar: tqdm | None = None
        self._reset_timing()
        self.load_history()

    # -- public API -----------------------------------------------------------------------

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        """Record training scalars `train/<name>` at `step` and print the console line."""
        if not self.enabled:
            return
        values = _scalars(metrics)
        now = _clock()
        speed = values.get("steps_per_sec")
        if speed is None:
            if self._last_log is None:  # first line since (re)start: assume a full interval
                done, elapsed = min(step, self.log_every), now - self._started
            else:
                done, elapsed = step - self._last_log[0], now - self._last_log[1]
            speed = done / elapsed if elapsed > 0 else math.nan
        self._last_log = (step, now)

        self._write_scalars("train", step, values)
        self.history["train"].append({"step": step, **values})
        self._save_history()
        self.advance(step)

        loss = values.get("loss", math.nan)
        line = (
            f"global step {step}, epoch: {epoch_of(step, self.steps_per_epoch)}, "
            f"loss: {loss:.5f}, speed: {speed:.2f} step/s"
        )
        if self._bar is None:
            eta = (self.total_steps - step) / speed if speed > 0 else math.nan
            line += f", eta: {format_duration(eta)}"
        else:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._print(line)
        if now - self._last_plot >= _PLOT_EVERY_S:
            self._draw()

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (cheap; the trainer may call it every step)."""
        if not self.enabled or not self._use_bar:
            return
        if self._bar is None:
            # Start the bar at the first step seen, so that a resumed run's ETA is not skewed by
            # the steps done before the restart.
            self._bar = tqdm(
                total=self.total_steps, initial=step, file=sys.stderr, unit="step",
                dynamic_ncols=True,
            )
        elif step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def log_eval(
        self, step: int, metrics: dict[str, float], samples: list[dict] | None = None
    ) -> None:
        """Record eval scalars `eval/<name>` (+ a sample table), print them, redraw the PNG."""
        if not self.enabled:
            return
        values = _scalars(metrics)
        self._write_scalars("eval", step, values, flush=False)
        if samples:
            text = tbx_summary.text("eval/samples", _markdown_table(samples))
            self._events().write_event(Event(wall_time=time.time(), step=step, summary=text))
        self._events().flush()
        self.history["eval"].append({"step": step, **values})
        self._save_history()
        shown = ", ".join(f"{name}={value:.4f}" for name, value in values.items())
        self._print(f"eval at step {step}: {shown}")
        self._draw()

    def load_history(self) -> dict[str, list[dict[str, float]]]:
        """(Re)load `plots/history.json` into the monitor and return it ({"train", "eval"})."""
        if not self.enabled or not os.path.exists(self.history_path):
            return self.history
        try:
            with open(self.history_path, encoding="utf-8") as f:
                history = json.load(f)
            if not (isinstance(history.get("train"), list) and isinstance(history["eval"], list)):
                raise ValueError('expected an object with lists "train" and "eval"')
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(
                f"{self.history_path}: not a training history written by this toolkit ({e}); "
                "delete the file to start the curves afresh"
            ) from e
        self.history = {"train": history["train"], "eval": history["eval"]}
        return self.history

    def truncate_after(self, step: int) -> None:
        """Forget every point logged after `step` (the trainer calls it on resume)."""
        if not self.enabled:
            return
        for kind in ("train", "eval"):
            self.history[kind] = [p for p in self.history[kind] if p["step"] <= step]
        self._save_history()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._reset_timing()
        self._draw()

    def close(self) -> None:
        """Redraw the PNG, flush and close the event file and the progress bar."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._drawn != self._history_size():  # points logged since the last redraw
            self._draw()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _reset_timing(self) -> None:
        self._started = _clock()
        self._last_log: tuple[int, float] | None = None
        self._last_plot = self._started
        self._drawn: tuple[int, int] | None = None  # history size at the last redraw

    def _events(self) -> EventsWriter:
        """The open event file; a new one (after a resume: starting with the purge) if none."""
        if self._writer is None:
            self._writer = self._open_writer(self._purge_step)
            self._purge_step = None
        return self._writer

    def _open_writer(self, purge_step: int | None) -> EventsWriter:
        # tensorboardX names the file by the second it was opened; the nanoseconds keep a
        # resumed run's file (opened in the same second) sorted after, and distinct from, the
        # previous one, since readers apply the files in name order.
        suffix = f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
        writer = EventsWriter(os.path.join(self.tensorboard_dir, "events"), suffix)
        if purge_step is not None:
            # A SessionLog START at step S drops every point read so far with step >= S. The
            # legacy reader purges on any START; TensorBoard's plugin reader takes the first START
            # of a run as its beginning and purges only on later ones, hence two.
            start = SessionLog(status=SessionLog.START)
            for _ in range(2):
                writer.write_event(
                    Event(wall_time=time.time(), step=purge_step, session_log=start)
                )
        writer.flush()
        return writer

    def _write_scalars(
        self, prefix: str, step: int, values: dict[str, float], flush: bool = True
    ) -> None:
        wall = time.time()
        for name, value in values.items():
            summary = tbx_summary.scalar(f"{prefix}/{name}", value)
            self._events().write_event(Event(wall_time=wall, step=step, summary=summary))
        if flush:
            self._events().flush()

    def _history_size(self) -> tuple[int, int]:
        return len(self.history["train"]), len(self.history["eval"])

    def _save_history(self) -> None:
        data = json.dumps(self.history, ensure_ascii=False).encode("utf-8")
        _atomic_write(self.history_path, lambda f: f.write(data))

    def _print(self, line: str) -> None:
        if self._bar is not None:
            tqdm.write(line, file=sys.stdout)  # clears and redraws the bar around the line
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def _draw(self) -> None:
        """Redraw plots/curves.png: train loss, learning rate, then one panel per eval metric."""
        self._last_plot = _clock()
        self._drawn = self._history_size()
        panels = []  # (title, kind, metric)
        titles = {"loss": "train loss", "learning_rate": "learning rate"}
        for name in self.plots:
            if any(name in p for p in self.history["train"]):
                panels.append((titles.get(name, name.replace("_", " ")), "train", name))
        eval_names: list[str] = []
        for point in self.history["eval"]:
            eval_names += [k for k in point if k != "step" and k not in eval_names]
        panels += [(f"eval {name}", "eval", name) for name in eval_names]
        if not panels:
            return

        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), dpi=100)
        # Chinese metric names (per-class F1) need a CJK font; use one where installed.
        with_cjk = {"font.sans-serif": [*CJK_FONTS, *matplotlib.rcParams["font.sans-serif"]]}
        canvas = FigureCanvasAgg(fig)
        with matplotlib.rc_context(with_cjk), warnings.catch_warnings():
            # Without a CJK font the names render as boxes; BUILD.md says which to install.
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            self._draw_panels(fig, panels, nrows, ncols)
            _atomic_write(self.plot_path, lambda f: canvas.print_png(f))

    def _draw_panels(self, fig, panels, nrows: int, ncols: int) -> None:
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (title, kind, name) in zip(axes, panels):
            points = [p for p in self.history[kind] if name in p]
            steps = [p["step"] for p in points]
            values = [p[name] for p in points]
            if kind == "train":
                ax.plot(steps, values, linewidth=1.0)
            else:
                ax.plot(steps, values, marker="o", markersize=3, linewidth=1.0)
            if name == "learning_rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        # Fixed margins: constrained layout costs seconds per redraw on a slow CPU.
        fig.subplots_adjust(left=0.06, right=0.98, top=0.93, bottom=0.09, wspace=0.25,
                            hspace=0.45)
