"""A character TF-IDF cosine baseline for the text-matching demo.

    .venv/bin/python benchmarks/baseline_matching.py

Character 1-2-gram TF-IDF vectors (fitted on the training pairs' texts); a pair matches when
the cosine of its two vectors reaches a threshold, the one with the best macro F1 on dev.
Prints dev and test accuracy / macro F1, the Spearman correlation of cosine and label, and
the wall time, for comparison with ``python main.py --config=configs/matching.py`` (small BERTs
trained from scratch) and ``configs/simcse.py`` (scored on the same pairs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402

from lib import metrics  # noqa: E402
from lib.pairs import read_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/matching", help="directory with train/dev/test.tsv")
    args = parser.parse_args()
    start = time.perf_counter()
    split = {name: read_pairs(str(Path(args.data) / f"{name}.tsv"))
             for name in ("train", "dev", "test")}
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
    vectorizer.fit([r[k] for r in split["train"] for k in ("query", "doc")])

    def cosines(rows):
        q = vectorizer.transform([r["query"] for r in rows])
        d = vectorizer.transform([r["doc"] for r in rows])
        return np.asarray(q.multiply(d).sum(axis=1)).ravel()  # rows are L2-normalized

    def f1(rows, scores, threshold):
        gold = [r["label"] for r in rows]
        pred = (scores >= threshold).astype(int)
        return metrics.precision_recall_f1(gold, pred, labels=[0, 1])["f1"], gold, pred

    dev = cosines(split["dev"])
    threshold = max(np.unique(dev), key=lambda t: f1(split["dev"], dev, t)[0])
    print(f"threshold (best dev macro F1): {threshold:.4f}")
    for name in ("dev", "test"):
        scores = cosines(split[name])
        value, gold, pred = f1(split[name], scores, threshold)
        print(f"{name}: accuracy={metrics.accuracy(gold, pred):.4f} macro_f1={value:.4f} "
              f"spearman={metrics.spearman(scores, gold):.4f}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
