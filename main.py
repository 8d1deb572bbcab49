"""zhtune command line: ``python main.py --config=configs/X.py[:variant] [--config.a.b=v ...]``.

Modes: ``train`` (resumes from --workdir), ``eval`` (best checkpoint on config.data.eval),
``predict`` (texts from config.predict.input, one per line, '-' for stdin) and ``export``
(an HF-format directory under workdir/export).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from lib.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<task>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"], "What to do.")


def run(config, workdir: Path, mode: str) -> None:
    """Hand the config to the trainer or to the task's inference modes."""
    import tasks
    from lib import train

    task = tasks.get(config.task)
    if mode == "train":
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        metrics = train.train(config, workdir, task)
        print("final eval: " + json.dumps(metrics, ensure_ascii=False), flush=True)
        return
    model, tokenizer, step = train.restore_model(config, workdir, task)
    if mode == "eval":
        _, eval_data = task.datasets(config, tokenizer)
        metrics, samples = task.evaluate(model, eval_data)
        train.write_eval(workdir, step, metrics, samples)
        print(f"eval of step {step}: " + json.dumps(metrics, ensure_ascii=False), flush=True)
    elif mode == "predict":
        source = config.predict.input
        lines = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        texts = [t for t in lines.splitlines() if t.strip()]
        for out in task.predict(config, model, tokenizer, texts):
            print(json.dumps(out, ensure_ascii=False), flush=True)
    elif mode == "export":
        out_dir = workdir / "export"
        task.export(model, tokenizer, str(out_dir))
        print(f"exported step {step} to {out_dir}", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<file>.py[:variant] is required")
    # Orbax and JAX log every checkpoint step at INFO; keep the console for our progress.
    logging.set_verbosity(logging.WARNING)
    workdir = Path(_WORKDIR.value or f"workdirs/{config.task}")
    config.workdir = str(workdir)
    try:
        run(config, workdir, _MODE.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main)
