"""Evaluation metrics: classification P/R/F1, Spearman, ROUGE (zh), BLEU, EM/F1, spans, ranking.

Classification, correlation, EM/F1, span and ranking metrics are plain numpy/python, written to
give the same numbers as scikit-learn (`precision_recall_fscore_support`, zero_division=0) and
scipy (`spearmanr`) without importing either. ROUGE and BLEU *are* defined by the packages the
original experiments used (`rouge_chinese`, `nltk`), so they call those packages with the exact
pre-processing of the originals. jieba, rouge_chinese and nltk are imported on first use: nltk
alone costs seconds to import and most tasks never need it.

Conventions: ROUGE and BLEU are reported x100 (as in the original reports); P/R/F1, accuracy,
EM/F1 and ranking accuracy are fractions in [0, 1]. Divisions by zero give 0.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from lib.errors import UserError

_AVERAGES = (None, "micro", "macro", "weighted", "binary")


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _as_label_arrays(y_true: Sequence[Any], y_pred: Sequence[Any]) -> tuple[np.ndarray, ...]:
    """1-D arrays of true and predicted labels, checked to have the same length."""
    true = np.asarray(y_true)
    pred = np.asarray(y_pred)
    if true.ndim != 1 or pred.ndim != 1 or true.shape != pred.shape:
        raise UserError(
            f"metrics: y_true and y_pred must be 1-D sequences of the same length, got shapes "
            f"{true.shape} and {pred.shape}; pass one label per example"
        )
    return true, pred


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den is 0 (sklearn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Fraction of examples whose predicted label equals the true one (0.0 for no examples)."""
    true, pred = _as_label_arrays(y_true, y_pred)
    if true.size == 0:
        return 0.0
    return float(np.mean(true == pred))


def precision_recall_f1(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    average: str | None = "macro",
    labels: Sequence[Any] | None = None,
    pos_label: Any = 1,
) -> dict[str, Any]:
    """Precision, recall and F1 of single-label predictions, as sklearn computes them.

    Matches `sklearn.metrics.precision_recall_fscore_support(..., zero_division=0)`:
    - `labels=None` uses the sorted union of the labels seen in `y_true` and `y_pred`; given
      labels are used in that order, including ones that never occur (they score 0).
    - `average`: "macro" (plain mean over labels), "weighted" (mean weighted by true support;
      a plain mean if every support is 0), "micro" (pooled counts over `labels`), "binary"
      (only `pos_label`; the data must hold at most two distinct labels and `labels` is
      ignored), or None (per-label scores).
    - A 0/0 precision, recall or F1 is 0. F1 is 2·tp / (2·tp + fp + fn).

    Returns {"precision", "recall", "f1", "support"}: floats and the total true count of the
    scored labels; for `average=None` the values are numpy arrays in the order of
    `result["labels"]` (support is then per label).
    """
    if average not in _AVERAGES:
        raise UserError(
            f"metrics: unknown average={average!r}; use one of {', '.join(map(str, _AVERAGES))}"
        )
    true, pred = _as_label_arrays(y_true, y_pred)
    present = np.unique(np.concatenate([true, pred])) if true.size else np.asarray([])
    if average == "binary":
        if len(present) > 2:
            raise UserError(
                f"metrics: average='binary' needs at most 2 distinct labels, found "
                f"{len(present)} ({present.tolist()}); use average='macro', 'weighted' or "
                f"'micro', or labels=[pos_label]"
            )
        if pos_label not in present.tolist() and len(present) == 2:
            raise UserError(
                f"metrics: pos_label={pos_label!r} is not one of the labels "
                f"{present.tolist()}; set pos_label to the positive class"
            )
        labels = [pos_label]
    label_list = list(present.tolist() if labels is None else labels)

    # Per-label counts: true positives, predicted count, true count.
    tp = np.array([np.sum((pred == lab) & (true == lab)) for lab in label_list], np.int64)
    n_pred = np.array([np.sum(pred == lab) for lab in label_list], np.int64)
    n_true = np.array([np.sum(true == lab) for lab in label_list], np.int64)
    if average == "micro":
        tp, n_pred, n_true = (c.sum(keepdims=True) for c in (tp, n_pred, n_true))

    precision = _safe_divide(tp, n_pred)
    recall = _safe_divide(tp, n_true)
    f1 = _safe_divide(2 * tp, n_pred + n_true)

    if average is None:
        return {
            "labels": label_list,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": n_true,
        }
    if len(label_list) == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    weights = n_true if average == "weighted" and n_true.sum() > 0 else None
    return {
        "precision": float(np.average(precision, weights=weights)),
        "recall": float(np.average(recall, weights=weights)),
        "f1": float(np.average(f1, weights=weights)),
        "support": int(n_true.sum()),
    }


def classification_report(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    label_names: Sequence[str] | Mapping[Hashable, str],
) -> dict[str, Any]:
    """Accuracy, weighted and macro P/R/F1 and per-class metrics over every named class.

    `label_names` is either a sequence (label id i is named `label_names[i]`) or a mapping
    {label: name}. Every named class is scored, even one absent from both `y_true` and
    `y_pred` (it scores 0 and counts in the macro average, as with sklearn given `labels=`).
    A label in the data that has no name is an error.

    Returns {"accuracy", "weighted_precision", "weighted_recall", "weighted_f1",
    "macro_precision", "macro_recall", "macro_f1", "per_class": {name: {"precision",
    "recall", "f1", "support"}}}.
    """
    if isinstance(label_names, Mapping):
        names = dict(label_names)
    else:
        names = dict(enumerate(label_names))
    true, pred = _as_label_arrays(y_true, y_pred)
    unnamed = sorted({str(v) for v in np.concatenate([true, pred]).tolist() if v not in names})
    if unnamed:
        raise UserError(
            f"metrics: labels {unnamed} have no name in label_names "
            f"({len(names)} names given); add them to the task's label list"
        )
    labels = list(names)
    per = precision_recall_f1(true, pred, average=None, labels=labels)
    report: dict[str, Any] = {"accuracy": accuracy(true, pred)}
    for average in ("weighted", "macro"):
        scores = precision_recall_f1(true, pred, average=average, labels=labels)
        for key in ("precision", "recall", "f1"):
            report[f"{average}_{key}"] = scores[key]
    report["per_class"] = {
        names[lab]: {
            "precision": float(per["precision"][i]),
            "recall": float(per["recall"][i]),
            "f1": float(per["f1"][i]),
            "support": int(per["support"][i]),
        }
        for i, lab in enumerate(labels)
    }
    return report


# ---------------------------------------------------------------------------------------------
# Correlation
# ---------------------------------------------------------------------------------------------


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`; tied values all get the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group_of_sorted = np.cumsum(starts_group) - 1
    bounds = np.concatenate([np.flatnonzero(starts_group), [len(values)]])
    # A group covering sorted positions [lo, hi) holds ranks lo+1 .. hi; their mean:
    group_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = group_rank[group_of_sorted]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks), like scipy's spearmanr.

    NaN when it is undefined: fewer than 2 pairs, a NaN in the input, or a constant input.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise UserError(
            f"metrics: spearman needs two 1-D sequences of the same length, got shapes "
            f"{a.shape} and {b.shape}"
        )
    if len(a) < 2 or np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt(np.dot(ra, ra) * np.dot(rb, rb))
    if denom == 0:
        return float("nan")
    # Rounding can push |r| a hair past 1 for perfectly (anti-)correlated ranks.
    return float(np.clip(np.dot(ra, rb) / denom, -1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Generation: ROUGE (jieba words) and BLEU (characters)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _quiet_jieba() -> Any:
    """The jieba module with its logger at WARNING: it otherwise prints to stderr on first use."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def _check_pairs(hypotheses: Sequence[str], references: Sequence[Any], what: str) -> None:
    """Raise unless there is one reference per hypothesis."""
    if len(hypotheses) != len(references):
        raise UserError(
            f"metrics: {what} got {len(hypotheses)} hypotheses but {len(references)} "
            f"references; pass one reference per hypothesis"
        )


def rouge_zh(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-scores x100 on jieba words, averaged over samples (the originals' recipe).

    Each string is segmented with `jieba.cut` (default mode), the words are joined by spaces,
    and `rouge_chinese.Rouge().get_scores(hyp, ref)[0][m]["f"]` is taken per sample. Unlike the
    original scripts the per-sample scores are not rounded to 4 decimals.

    rouge_chinese raises on a hypothesis or reference with no non-space character; such a
    sample scores 0 on every metric (and still counts in the mean). No samples give 0.0.
    Returns {"rouge-1", "rouge-2", "rouge-l"}.
    """
    _check_pairs(hypotheses, references, "rouge_zh")
    keys = ("rouge-1", "rouge-2", "rouge-l")
    if len(hypotheses) == 0:
        return dict.fromkeys(keys, 0.0)
    from rouge_chinese import Rouge

    jieba = _quiet_jieba()
    rouge = Rouge()
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hypotheses, references):
        if not hyp.split() or not ref.split():
            continue
        scores = rouge.get_scores(" ".join(jieba.cut(hyp)), " ".join(jieba.cut(ref)))[0]
        for key in keys:
            totals[key] += scores[key]["f"] * 100.0
    return {key: total / len(hypotheses) for key, total in totals.items()}


def bleu4_chars(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Sentence BLEU-4 on characters x100, averaged over samples (the originals' recipe).

    Per sample: nltk `sentence_bleu([list(ref)], list(hyp), weights=(0.25,)*4,
    smoothing_function=SmoothingFunction().method3)`. An empty hypothesis scores 0; no samples
    give 0.0. Unlike the original scripts the per-sample scores are not rounded.
    """
    _check_pairs(hypotheses, references, "bleu4_chars")
    if len(hypotheses) == 0:
        return 0.0
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method3
    total = 0.0
    for hyp, ref in zip(hypotheses, references):
        if not hyp:
            continue
        total += 100.0 * sentence_bleu(
            [list(ref)], list(hyp), weights=(0.25,) * 4, smoothing_function=smoothing
        )
    return total / len(hypotheses)


def corpus_bleu_n(
    hypotheses: Sequence[str],
    references: Sequence[str | Sequence[str]],
    n_max: int = 4,
    tokenize: Callable[[str], list[str]] = list,
) -> dict[str, float]:
    """Corpus BLEU-1..n_max x100 with nltk `corpus_bleu` (uniform weights 1/n, no smoothing).

    Each reference is a string or a sequence of alternative reference strings; `tokenize` turns
    a string into tokens (default: characters). Returns {"bleu-1": ..., "bleu-<n_max>": ...};
    an n with no matching n-gram in the whole corpus scores 0 (nltk's warning is silenced).
    """
    _check_pairs(hypotheses, references, "corpus_bleu_n")
    if n_max < 1:
        raise UserError(f"metrics: corpus_bleu_n needs n_max >= 1, got {n_max}")
    keys = [f"bleu-{n}" for n in range(1, n_max + 1)]
    if len(hypotheses) == 0:
        return dict.fromkeys(keys, 0.0)
    from nltk.translate.bleu_score import corpus_bleu

    refs = [
        [tokenize(ref)] if isinstance(ref, str) else [tokenize(r) for r in ref]
        for ref in references
    ]
    hyps = [tokenize(hyp) for hyp in hypotheses]
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for n, key in enumerate(keys, start=1):
            scores[key] = 100.0 * float(corpus_bleu(refs, hyps, weights=(1.0 / n,) * n))
    return scores


# ---------------------------------------------------------------------------------------------
# Extractive QA, spans, rankings
# ---------------------------------------------------------------------------------------------


def _normalize_zh(text: str) -> str:
    """Lowercase, with whitespace and punctuation (any Unicode P* character) removed."""
    return "".join(
        ch
        for ch in text.lower()
        if not ch.isspace() and not unicodedata.category(ch).startswith("P")
    )


def em_f1_zh(prediction: str, ground_truths: Sequence[str] | str) -> tuple[float, float]:
    """Character-level exact match and F1 of one answer, CoQA-style, adapted to Chinese.

    Both sides are normalized (lowercase; whitespace and punctuation removed, Chinese and ASCII
    alike); F1 counts common characters as a multiset. If either side normalizes to nothing, F1
    equals EM. With several ground truths the best score over them counts (the SQuAD rule;
    ConvQA_CN has one answer per turn). Returns (em, f1), each in [0, 1].
    """
    golds = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    if not golds:
        raise UserError("metrics: em_f1_zh needs at least one ground-truth answer")
    pred = _normalize_zh(prediction)
    best_em, best_f1 = 0.0, 0.0
    for gold_text in golds:
        gold = _normalize_zh(gold_text)
        em = float(pred == gold)
        if not pred or not gold:
            f1 = em
        else:
            common = sum((Counter(pred) & Counter(gold)).values())
            if common == 0:
                f1 = 0.0
            else:
                precision = common / len(pred)
                recall = common / len(gold)
                f1 = 2 * precision * recall / (precision + recall)
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1


def span_prf(
    pred_spans: Sequence[set[Hashable]], gold_spans: Sequence[set[Hashable]]
) -> dict[str, float]:
    """Micro precision/recall/F1 of exact span matches, pooled over examples (UIE's metric).

    Each example gives a set of spans (any hashable, e.g. (start, end) or the text); a predicted
    span is correct when the same example's gold set holds it. 0/0 gives 0.
    Returns {"precision", "recall", "f1"}.
    """
    if len(pred_spans) != len(gold_spans):
        raise UserError(
            f"metrics: span_prf got {len(pred_spans)} predicted and {len(gold_spans)} gold "
            f"span sets; pass one set per example"
        )
    n_correct = sum(len(set(p) & set(g)) for p, g in zip(pred_spans, gold_spans))
    n_pred = sum(len(set(p)) for p in pred_spans)
    n_gold = sum(len(set(g)) for g in gold_spans)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def ranking_accuracy(scores: Sequence[Sequence[float]]) -> float:
    """Fraction of lists whose scores strictly decrease in the given (best-to-worst) order.

    Used for the reward model: each list holds the predicted rewards of texts ranked best to
    worst by people. A tie counts as a wrong order; a list of 0 or 1 score counts as right.
    No lists give 0.0.
    """
    if len(scores) == 0:
        return 0.0
    right = sum(all(a > b for a, b in zip(row[:-1], row[1:])) for row in map(list, scores))
    return right / len(scores)
