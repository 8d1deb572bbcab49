"""zhtune command line: ``python main.py --config=configs/X.py[:variant] [--config.a.b=v ...]``.

Modes: ``train`` (resumes from --workdir), ``eval`` (best checkpoint on config.data.eval),
``predict`` (texts from config.predict.input, one per line, '-' for stdin) and ``export``
(an HF-format directory under workdir/export).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from lib.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<task>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"], "What to do.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host: call jax.distributed.initialize() first (coordinator from the environment).",
)


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk: a rerun or resume of the same config skips
    recompiling (tens of seconds on CPU). ZHTUNE_XLA_CACHE=DIR moves it, '' turns it off."""
    import jax

    cache = os.environ.get("ZHTUNE_XLA_CACHE", os.path.expanduser("~/.cache/zhtune/xla"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def run(config, workdir: Path, mode: str) -> None:
    """Hand the config to the trainer or to the task's inference modes."""
    import tasks
    from lib import train

    task = tasks.get(config.task)
    if mode == "train":
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        # Experiments made of several trainings (LoopCoT's runs) drive the trainer themselves
        # and print their own summary table.
        runner = getattr(task, "run", None)
        if runner:
            runner(config, workdir)
        else:
            metrics = train.train(config, workdir, task)
            print("final eval: " + json.dumps(metrics, ensure_ascii=False), flush=True)
        return
    model, tokenizer, step = train.restore_model(config, workdir, task)
    if mode == "eval":
        _, eval_data = task.datasets(config, tokenizer)
        metrics, samples = task.evaluate(model, eval_data)
        # Named after the split, so that evaluating another file never overwrites the run's own
        # eval/step_N.json.
        train.write_eval(workdir, step, metrics, samples, name=Path(config.data.eval).stem)
        print(f"eval of step {step}: " + json.dumps(metrics, ensure_ascii=False), flush=True)
    elif mode == "predict":
        source = config.predict.input
        lines = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        texts = [t for t in lines.splitlines() if t.strip()]
        for out in task.predict(config, model, tokenizer, texts):
            print(json.dumps(out, ensure_ascii=False), flush=True)
    elif mode == "export":
        # Written beside and then swapped in: a killed export leaves the previous one whole, and
        # no file of an earlier export (say an adapter_config.json) survives into this one.
        out_dir, partial = workdir / "export", workdir / "export.partial"
        shutil.rmtree(partial, ignore_errors=True)
        task.export(model, tokenizer, str(partial))
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)
        print(f"exported step {step} to {out_dir}", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<file>.py[:variant] is required")
    try:
        config.task  # noqa: B018 - a config file that failed to load raises here
    except OSError as e:
        where = next((ln.strip() for ln in str(e).splitlines() if ".py" in ln), "")
        print(f"error: cannot load the config file {where}", file=sys.stderr)
        sys.exit(2)
    # Orbax and JAX log every checkpoint step at INFO; keep the console for our progress.
    logging.set_verbosity(logging.WARNING)
    workdir = Path(_WORKDIR.value or f"workdirs/{config.task}")
    config.workdir = str(workdir)
    enable_compilation_cache()
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize()
    try:
        run(config, workdir, _MODE.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes reported on one line (no traceback)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        # ml_collections reports an unknown override key as AttributeError('key' Did you...).
        lines = str(e).strip("'\"").replace("\\n", "\n").splitlines()
        key = lines[0].strip("'\\")
        hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
        arg = next((a for a in argv if a.startswith("--config.") and f".{key}" in a), key)
        print(f"error: unknown config key in {arg.split('=')[0]}{hint}", file=sys.stderr)
    except flags.Error as e:
        # A config file that raises: its own last line says what is wrong.
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        first = lines[0].split(": Error whilst parsing")[0]
        detail = f" ({lines[-1].strip()})" if len(lines) > 1 else ""
        print(f"error: {first}{detail}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a config file that fails to build
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
