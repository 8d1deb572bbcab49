"""Test setup: 8 simulated CPU devices for the sharding tests, and the repo on sys.path.

XLA_FLAGS must be set before jax is first imported, which is why it happens here.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Reuse compiled XLA programs across test runs and across the CLI tests' subprocesses.
os.environ.setdefault("ZHTUNE_XLA_CACHE", os.path.expanduser("~/.cache/zhtune/xla-tests"))

import jax  # noqa: E402 - after XLA_FLAGS

jax.config.update("jax_compilation_cache_dir", os.environ["ZHTUNE_XLA_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
