"""A character TF-IDF + logistic-regression baseline for the review classification demo.

    .venv/bin/python benchmarks/baseline_tfidf.py

Prints dev and test accuracy / weighted F1 and the wall time, for comparison with
``python main.py --config=configs/classification.py`` (a small BERT trained from scratch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from lib import metrics  # noqa: E402
from lib.data import read_tsv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/reviews", help="directory with train/dev/test.tsv")
    args = parser.parse_args()
    start = time.perf_counter()
    split = {
        name: read_tsv(Path(args.data) / f"{name}.tsv", ["label", "text"], {"label": int})
        for name in ("train", "dev", "test")
    }
    # Character 1-3 grams: no word segmentation, like the character vocabulary of the demo.
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    x_train = vectorizer.fit_transform([r["text"] for r in split["train"]])
    model = LogisticRegression(C=4.0, max_iter=2000)
    model.fit(x_train, [r["label"] for r in split["train"]])
    for name in ("dev", "test"):
        pred = model.predict(vectorizer.transform([r["text"] for r in split[name]]))
        gold = [r["label"] for r in split[name]]
        f1 = metrics.precision_recall_f1(gold, pred, average="weighted")["f1"]
        print(f"{name}: accuracy={metrics.accuracy(gold, pred):.4f} weighted_f1={f1:.4f}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
