"""Human feedback in a terminal: rate samples for PPO, or rank samples for a reward model.

``rate``: the policy continues a prompt, a person types a reward in [-2, 2], and that one
rated sample is one PPO step. Every rating is appended to a JSON-lines file (with the sample's
tokens) before the step, and flushed to disk, so nothing typed is lost: ``q``, Ctrl-C or the
end of the input save the policy (a checkpoint) and stop; after a kill, the next start replays
the ratings made since the last checkpoint and carries on from there.

``rank``: the policy writes ``k`` continuations of a prompt, a person orders them best to
worst (``2 1 4 3``), and the list is appended to a TSV file in the reward model's format (the
``k`` texts, best first, tab-separated). A list is written in one write and flushed when it is
complete, never part of one; a file whose last line a kill cut short is repaired on the next
start.

Bad input (not a number, out of range, empty, not an order of the samples) asks again.
``ask`` is the prompt function (``input`` by default; tests pass their own).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lib import ppo
from lib import train as train_lib

QUIT = ("q", "quit", "exit")
# Ratings a person may give.
LOW, HIGH = -2.0, 2.0

Ask = Callable[[str], str]


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (one record, newline-terminated) in a single write, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def repair_tail(path: Path) -> bool:
    """Cut a last line that has no newline (a write a kill interrupted); True if it did."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True


def parse_rating(text: str) -> float | str:
    """A rating in [LOW, HIGH], or the message that asks again."""
    text = text.strip()
    if not text:
        return f"type a number from {LOW:g} to {HIGH:g} (or q to quit)"
    try:
        value = float(text)
    except ValueError:
        return f"{text!r} is not a number: type one from {LOW:g} to {HIGH:g}"
    if not np.isfinite(value) or not LOW <= value <= HIGH:
        return f"{text} is out of range: type a number from {LOW:g} to {HIGH:g}"
    return value


def parse_order(text: str, k: int) -> list[int] | str:
    """An order of samples ``1..k`` best first (``"2 1 4 3"``, ``"2,1,4,3"`` or ``"2143"``) as
    0-based indices, or the message that asks again."""
    text = text.strip()
    parts = text.replace(",", " ").split()
    if len(parts) == 1 and len(parts[0]) == k:
        parts = list(parts[0])
    example = " ".join(str(i) for i in range(k, 0, -1))
    want = f"the numbers 1 to {k}, each once, best first (e.g. {example})"
    if not text:
        return f"type {want}, s to skip or q to quit"
    numbers = sorted(int(p) for p in parts if p.isdigit())
    if len(numbers) != len(parts) or numbers != list(range(1, k + 1)):
        return f"{text!r} is not an order of the samples: type {want}"
    return [int(p) - 1 for p in parts]


def _ask_until(ask: Ask, question: str, parse: Callable[[str], Any]) -> Any:
    """Ask until ``parse`` accepts the answer; None for q/quit/exit or the end of the input."""
    while True:
        try:
            answer = ask(question)
        except EOFError:
            return None
        if answer.strip().lower() in QUIT:
            return None
        parsed = parse(answer)
        if not isinstance(parsed, str):
            return parsed
        print(parsed, flush=True)


def one_line(text: str) -> str:
    """``text`` without tabs or line breaks (a TSV field)."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- rating


def _batch(record: dict) -> dict[str, np.ndarray]:
    return {"input_ids": np.asarray([record["input_ids"]], np.int32),
            "attention_mask": np.asarray([record["attention_mask"]], np.int32),
            "scores": np.asarray([record["reward"]], np.float32)}


def rate(trainer: ppo.Trainer, prompts: Sequence[str], ratings: Path, save: Callable[[], None],
         seed: int, ask: Ask = input) -> int:
    """The rating loop; returns the number of ratings made. ``save()`` checkpoints the
    trainer. Ratings of steps at or after the trainer's (made after the last checkpoint) are
    replayed first."""
    repair_tail(ratings)
    if ratings.is_file():
        lines = ratings.read_text(encoding="utf-8").splitlines()
        pending = [r for r in map(json.loads, lines) if r["step"] >= trainer.step_no]
        for record in pending:
            rng, _ = ppo.step_rng(seed, record["step"])
            trainer.step(_batch(record), rng)
        if pending:
            print(f"replayed {len(pending)} rating(s) made after the last checkpoint", flush=True)
            save()
    made = 0
    print(f"rate each sample from {LOW:g} (bad) to {HIGH:g} (good); q or Ctrl-C saves and "
          "quits", flush=True)
    try:
        while True:
            step = trainer.step_no
            rng, key = ppo.step_rng(seed, step)
            prompt = prompts[int(rng.integers(len(prompts)))]
            sample = trainer.rollout([prompt], key)
            print(f"\n[{step + 1}] {prompt}{sample['responses'][0]}", flush=True)
            value = _ask_until(ask, "reward> ", parse_rating)
            if value is None:
                break
            record = {"step": step, "prompt": prompt, "response": sample["responses"][0],
                      "reward": value,
                      "input_ids": sample["input_ids"][0].tolist(),
                      "attention_mask": sample["attention_mask"][0].tolist()}
            append_line(ratings, json.dumps(record, ensure_ascii=False) + "\n")
            made += 1
            # Ctrl-C during the step is acted on once it is done (never half a step).
            with train_lib.Preemption(signal.SIGINT) as deferred:
                stats = trainer.step(_batch(record), rng)
            print(f"PPO step {trainer.step_no}: policy loss {stats['policy_loss']:.4f}, "
                  f"kl {stats['kl']:.4f}", flush=True)
            if deferred.requested:
                break
    except KeyboardInterrupt:
        print("", flush=True)
    save()
    print(f"saved the policy at step {trainer.step_no}; {made} rating(s) this time in "
          f"{ratings}", flush=True)
    return made


# ----------------------------------------------------------------------------- ranking


def rank(sample: Callable[[list[str], Any], list[str]], prompts: Sequence[str], out: Path,
         k: int, seed: int, ask: Ask = input) -> int:
    """The ranking loop over ``prompts`` in turn; returns the number of lists written to
    ``out``. ``sample(prompts, key)`` continues each prompt (a ``jax.random`` key)."""
    if repair_tail(out):
        print(f"{out}: removed an incomplete last line", flush=True)
    written = 0
    print(f"order the {k} samples best to worst (e.g. {' '.join(map(str, range(k, 0, -1)))}); "
          "s skips, q or Ctrl-C quits", flush=True)
    try:
        for n in range(10**9):
            rng, key = ppo.step_rng(seed, n)
            prompt = prompts[n % len(prompts)]
            samples = sample([prompt] * k, key)
            texts = [one_line(prompt + s) for s in samples]
            print(f"\nprompt: {prompt}", flush=True)
            for i, text in enumerate(texts):
                print(f"  {i + 1}. {text}", flush=True)
            # An empty order is a skip.
            order = _ask_until(ask, "order> ", lambda a: [] if a.strip().lower() == "s"
                               else parse_order(a, k))
            if order is None:
                break
            if not order:
                continue
            append_line(out, "\t".join(texts[i] for i in order) + "\n")
            written += 1
    except KeyboardInterrupt:
        print("", flush=True)
    print(f"{written} ranked list(s) appended to {out}", flush=True)
    return written
