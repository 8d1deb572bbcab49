"""Build the reward-model demo data, data/reward/{train,dev}.tsv, from the shipped reviews.

    python scripts/build_reward_data.py [--src data/reviews] [--out data/reward]

Each line holds 4 texts ranked best to worst, tab-separated. A list is built from three short
positive reviews p1, p2, p3 and three short negative ones n1, n2, n3 (one review per slot,
joined by a space):

    1. p1 p2 p3
    2. the same with one slot's positive review replaced by that slot's negative review
    3. the same with a second slot replaced
    4. n1 n2 n3

The order of the slots to replace is drawn per list. Consecutive texts differ in exactly one
slot, where a positive review became a negative one, so each text holds strictly less praise
and more complaint than the one above it: the order is true by construction, without anyone
labelling it. The train lists come from data/reviews/train.tsv, the dev lists from dev.tsv and
test.tsv, so no review is in both splits. Deterministic: running it twice gives byte-identical
files. See data/README.md.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

SEED = 20240501
REPO = Path(__file__).resolve().parent.parent

# Reviews used as slots: this many characters (so a text of 3 fits in 150 tokens).
MIN_CHARS, MAX_CHARS = 6, 48
SLOTS = 3
# Lists per split and the review files they are drawn from.
SPLITS = {"train": (4000, ("train.tsv",)), "dev": (300, ("dev.tsv", "test.tsv"))}
POSITIVE, NEGATIVE = "1", "0"  # label ids of data/reviews/labels.txt


def read_short_reviews(src: Path, files: tuple[str, ...]) -> dict[str, list[str]]:
    """``{label id: texts}`` of the reviews of ``MIN_CHARS..MAX_CHARS`` characters, in file
    order."""
    out: dict[str, list[str]] = {POSITIVE: [], NEGATIVE: []}
    for name in files:
        for line in (src / name).read_text(encoding="utf-8").splitlines():
            label, text = line.split("\t")
            if MIN_CHARS <= len(text) <= MAX_CHARS:
                out[label].append(text)
    return out


class Pool:
    """Draws reviews without replacement, reshuffling the pool when it runs out (so every
    review is used about equally often); a draw never repeats a review it already holds."""

    def __init__(self, texts: list[str], rng: random.Random):
        self.texts, self.rng, self.queue = texts, rng, []

    def draw(self, k: int) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            if not self.queue:
                self.queue = self.rng.sample(self.texts, len(self.texts))
            text = self.queue.pop()
            if text not in out:
                out.append(text)
        return out


def build_list(pos: list[str], neg: list[str], rng: random.Random) -> list[str]:
    """Four texts, best to worst: all slots positive, then one more slot negative at a time
    (in a random slot order)."""
    slots = list(pos)
    texts = [" ".join(slots)]
    for slot in rng.sample(range(SLOTS), SLOTS):
        slots[slot] = neg[slot]
        texts.append(" ".join(slots))
    return texts


def build(src: Path, out: Path) -> dict[str, int]:
    """Write ``<out>/{train,dev}.tsv``; returns the number of lists per split."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, (n_lists, files) in SPLITS.items():
        rng = random.Random(f"{SEED}-{split}")
        reviews = read_short_reviews(src, files)
        pos, neg = Pool(reviews[POSITIVE], rng), Pool(reviews[NEGATIVE], rng)
        lines = ["\t".join(build_list(pos.draw(SLOTS), neg.draw(SLOTS), rng))
                 for _ in range(n_lists)]
        (out / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[split] = n_lists
    return counts


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO / "data" / "reviews",
                        help="folder with the review splits (label_id<TAB>text)")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "reward",
                        help="output folder")
    args = parser.parse_args(argv)
    for split, n in build(args.src, args.out).items():
        print(f"{args.out / split}.tsv: {n} lists")


if __name__ == "__main__":
    main()
