"""zhtune command line: ``python main.py --config=configs/X.py[:variant] [--config.a.b=v ...]``.

Modes: ``train`` (resumes from --workdir; a config that declares a sweep trains and compares
its runs), ``eval`` (best checkpoint on config.data.eval), ``predict`` (texts from
config.predict.input, one per line, '-' for stdin), ``export`` (an HF-format directory under
workdir/export), and the interactive tools of the tasks that have them (``rate`` and ``rank``:
the human feedback of configs/ppo.py). Mistakes in the command line, the config or the data
print one ``error:`` line and exit with status 2 (``lib.cli``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from lib import cli
from lib.errors import Preempted, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<task>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export", *cli.TOOL_MODES],
                          "What to do.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host: call jax.distributed.initialize() first (coordinator from the environment).",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<file>.py[:variant] is required")
    try:
        config.task  # noqa: B018 - a config file that failed to load raises here
    except OSError as e:
        cli.fail(cli.config_load_error(e))
    # Orbax and JAX log every checkpoint step at INFO; keep the console for our progress.
    logging.set_verbosity(logging.WARNING)
    workdir = Path(_WORKDIR.value or f"workdirs/{config.task}")
    config.workdir = str(workdir)
    cli.enable_compilation_cache()
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize()
    try:
        cli.run(config, workdir, _MODE.value)
    except UserError as e:
        cli.fail(str(e))
    except Preempted as e:
        print(str(e), flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes reported on one line (no traceback)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every parse failure is a one-line error
        cli.fail(cli.flag_error(e, argv))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
