"""Build the few-shot sentiment data of PET and p-tuning, data/pet/, from the shipped reviews.

    python scripts/build_pet_data.py [--src data/reviews] [--out data/pet]

Writes ``train.tsv`` (32 reviews per class: few-shot, as the original's 63 training examples),
``dev.tsv`` and ``test.tsv`` (300 per class each) as ``label \\t text`` lines whose label is
the label word itself (``正面`` / ``负面``), and ``labels.txt``. The train reviews are drawn from
data/reviews/train.tsv, dev from dev.tsv and test from test.tsv, so no review is in two splits;
only reviews of ``MIN_CHARS..MAX_CHARS`` characters are drawn (a whole review fits in the
demo's 128 tokens with its template). Deterministic: running it twice gives byte-identical
files. See data/README.md.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

SEED = 20240501
REPO = Path(__file__).resolve().parent.parent

MIN_CHARS, MAX_CHARS = 8, 100
# Reviews per class in each split, and the review file each split draws from.
SPLITS = {"train": (32, "train.tsv"), "dev": (300, "dev.tsv"), "test": (300, "test.tsv")}
# data/reviews label id -> label word; labels.txt lists the words in this order.
WORDS = {"1": "正面", "0": "负面"}


def build(src: Path, out: Path) -> dict[str, int]:
    """Write the splits and labels.txt into ``out``; return the line count of each file."""
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, (per_class, name) in SPLITS.items():
        by_label: dict[str, list[str]] = {label: [] for label in WORDS}
        for line in (src / name).read_text(encoding="utf-8").splitlines():
            label, text = line.split("\t")
            if MIN_CHARS <= len(text) <= MAX_CHARS:
                by_label[label].append(text)
        rows = [f"{WORDS[label]}\t{text}" for label in WORDS
                for text in rng.sample(by_label[label], per_class)]
        rng.shuffle(rows)
        (out / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        counts[f"{split}.tsv"] = len(rows)
    (out / "labels.txt").write_text("\n".join(WORDS.values()) + "\n", encoding="utf-8")
    counts["labels.txt"] = len(WORDS)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO / "data" / "reviews")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "pet")
    args = parser.parse_args(argv)
    for name, n in build(args.src, args.out).items():
        print(f"{args.out / name}: {n} lines")


if __name__ == "__main__":
    main()
