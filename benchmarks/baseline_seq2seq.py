"""Simple baselines of the three sequence-to-sequence demos, scored like the tasks.

    .venv/bin/python benchmarks/baseline_seq2seq.py [--untrained]

- summarization: the first 13 characters of the text (13 = the mean headline length), ROUGE-1/
  2/L (``tasks.summarization``'s ``score``: ``lib.metrics.rouge_zh``);
- t5_qa: the empty answer, and for each question (one per entity type) the answer most often
  given to it in the training file; corpus BLEU-1..4 and exact match (``tasks.t5_qa``);
- t5_filling: the most frequent removed text of the training file; exact match and ROUGE
  (``tasks.t5_filling``).

Prints dev and test scores. ``--untrained`` also scores each demo's freshly initialized model
(the demo config's seed) on dev with the task's own evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks  # noqa: E402
from lib.data import read_jsonl  # noqa: E402


def config_of(name: str):
    """The demo config of a task."""
    import importlib

    return importlib.import_module(f"configs.{name}").get_config("demo")


def show(name: str, split: str, what: str, metrics: dict) -> None:
    print(f"{name} {split} {what}: " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--untrained", action="store_true", help="also score untrained models")
    args = parser.parse_args()
    for name in ("summarization", "t5_qa", "t5_filling"):
        config = config_of(name)
        task = tasks.create(config, "eval")
        train = read_jsonl(config.data.train, task.FIELDS)
        if name == "t5_qa":
            by_question: dict[str, Counter] = {}
            for r in train:
                by_question.setdefault(r["question"], Counter())[r["answer"]] += 1
            common = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
        if name == "t5_filling":
            frequent = Counter(r["target"] for r in train).most_common(1)[0][0]
        for split in ("dev", "test"):
            records = read_jsonl(getattr(config.data, "eval" if split == "dev" else "test"),
                                 task.FIELDS)
            if name == "summarization":
                show(name, split, "lead-13", task.score([r["text"][:13] for r in records],
                                                        records))
            elif name == "t5_qa":
                show(name, split, "empty answer", task.score([""] * len(records), records))
                show(name, split, "most frequent answer per question",
                     task.score([common.get(r["question"], "") for r in records], records))
            else:
                show(name, split, f"most frequent span {frequent!r}",
                     task.score([frequent] * len(records), records))
        if args.untrained:
            model, tokenizer = task.build()
            _, dev = task.datasets(tokenizer)
            metrics, samples = task.evaluate(model, dev)
            show(name, "dev", "untrained model", metrics)
            print("  e.g. " + json.dumps(samples[0]["output"], ensure_ascii=False)[:80])


if __name__ == "__main__":
    main()
