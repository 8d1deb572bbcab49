"""What ``main.py`` does besides parsing flags: the four modes, the compilation cache, and
one-line messages for mistakes in the command line or the config file."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from lib.errors import UserError


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk: a rerun or resume of the same config skips
    recompiling (tens of seconds on CPU). ZHTUNE_XLA_CACHE=DIR moves it, '' turns it off."""
    import jax

    cache = os.environ.get("ZHTUNE_XLA_CACHE", os.path.expanduser("~/.cache/zhtune/xla"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# Interactive modes some tasks offer (``Task.tools``).
TOOL_MODES = ("rate", "rank")


def run(config, workdir: Path, mode: str) -> None:
    """Run ``mode`` (train, eval, predict, export, or a tool of ``TOOL_MODES``) of
    ``config``'s task in ``workdir``."""
    import tasks
    from lib import sweep, train

    if mode != "train" and workdir.name in config.sweep.runs:
        # One run of a sweep (--workdir=<sweep workdir>/<run>): the config with its overrides.
        config = sweep.run_config(config, workdir.parent, workdir.name)
    task = tasks.create(config, mode)
    if mode == "train":
        task.run(workdir)
        return
    if mode in TOOL_MODES:
        tools = task.tools()
        if mode not in tools:
            has = f"its tools: {', '.join(tools)}" if tools else "it has none"
            raise UserError(f"--mode={mode} is a tool that task {config.task} lacks ({has})")
        tools[mode](workdir)
        return
    model, tokenizer, step = train.restore_model(task, workdir)
    if mode == "eval":
        _, eval_data = task.datasets(tokenizer)
        metrics, samples = task.evaluate(model, eval_data)
        # Named after the split, so that evaluating another file never overwrites the run's own
        # eval/step_N.json.
        train.write_eval(workdir, step, metrics, samples, name=Path(config.data.eval).stem)
        print(f"eval of step {step}: " + json.dumps(metrics, ensure_ascii=False), flush=True)
    elif mode == "predict":
        source = config.predict.input
        lines = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        texts = [t for t in lines.splitlines() if t.strip()]
        for out in task.predict(model, tokenizer, texts):
            print(json.dumps(out, ensure_ascii=False), flush=True)
    elif mode == "export":
        out_dir = export(task, model, tokenizer, workdir)
        print(f"exported step {step} to {out_dir}", flush=True)


def export(task, model, tokenizer, workdir: Path) -> Path:
    """``task.export`` of ``model`` into ``workdir/export``, written beside and then swapped in:
    a killed export leaves the previous one whole, and no file of an earlier export (say an
    adapter_config.json) survives into this one."""
    out_dir, partial = workdir / "export", workdir / "export.partial"
    shutil.rmtree(partial, ignore_errors=True)
    task.export(model, tokenizer, str(partial))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def config_load_error(error: OSError) -> str:
    """The message of a config file that failed to load (ml_collections raises it lazily)."""
    where = next((ln.strip() for ln in str(error).splitlines() if ".py" in ln), "")
    return f"cannot load the config file {where}"


def flag_error(error: Exception, argv: list[str]) -> str:
    """One line for an exception of absl's flag parsing: an unknown config key (with
    ml_collections' suggestion), a config file that raises, or one that fails to build."""
    from absl import flags

    if isinstance(error, AttributeError | KeyError):
        # ml_collections reports an unknown override key as AttributeError('key' Did you...).
        lines = str(error).strip("'\"").replace("\\n", "\n").splitlines()
        key = lines[0].strip("'\\")
        hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
        arg = next((a for a in argv if a.startswith("--config.") and f".{key}" in a), key)
        return f"unknown config key in {arg.split('=')[0]}{hint}"
    if isinstance(error, flags.Error):
        # A config file that raises: its own last line says what is wrong.
        lines = [ln for ln in str(error).splitlines() if ln.strip()]
        first = lines[0].split(": Error whilst parsing")[0]
        detail = f" ({lines[-1].strip()})" if len(lines) > 1 else ""
        return first + detail
    return f"{type(error).__name__}: {error}"


def fail(message: str, status: int = 2) -> None:
    """Print ``error: message`` on stderr and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)
