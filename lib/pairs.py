"""Text pairs for matching: the ``query \\t doc \\t label`` reader and the two encodings.

- one tower (``encode_joint``): ``[CLS] query [SEP] doc [SEP]`` with segment ids 0 / 1, as a
  BERT pair classifier reads it;
- two towers (``encode_towers``): each side encoded alone, ``[CLS] text [SEP]``, into arrays
  prefixed ``a_`` (query) and ``b_`` (doc), so one ``ArrayDataset`` row holds both sides and
  batches keep them aligned.

Shared by the matching tasks (``tasks/matching.py``, ``tasks/simcse.py``): ``PairSet`` (a
labelled split, read by ``read_pair_set``), ``run_batched`` (a model over every row, in eval
batches), ``match_report`` (accuracy, macro P/R/F1 and Spearman of 0/1 decisions) and
``ranked`` (candidates best first).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from lib import metrics
from lib.data import ArrayDataset, read_tsv

COLUMNS = ("query", "doc", "label")
SIDES = ("a_", "b_")


def read_pairs(path: str, key: str | None = None) -> list[dict]:
    """``query \\t doc \\t label`` records with label 0 or 1; a bad line names file:line."""

    def check(row: dict) -> str | None:
        return None if row["label"] in (0, 1) else f"label {row['label']} must be 0 or 1"

    return read_tsv(path, COLUMNS, {"label": int}, key=key, check=check)


def _arrays(enc) -> dict[str, np.ndarray]:
    out = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask")}
    out["token_type_ids"] = np.asarray(
        enc.get("token_type_ids", np.zeros_like(out["input_ids"])), np.int32)
    return out


def encode_texts(tokenizer, texts: list[str], max_length: int,
                 pairs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Token ids, attention mask and segment ids padded to ``max_length`` (longer inputs are
    truncated, the longer side of a pair first)."""
    enc = tokenizer(texts, pairs, max_length=max_length, truncation=True,
                    padding="max_length", return_tensors="np")
    return _arrays(enc)


def encode_joint(tokenizer, queries: list[str], docs: list[str],
                 max_length: int) -> dict[str, np.ndarray]:
    """One tower: each pair as ``[CLS] query [SEP] doc [SEP]``."""
    return encode_texts(tokenizer, queries, max_length, pairs=docs)


def encode_towers(tokenizer, queries: list[str], docs: list[str],
                  max_length: int) -> dict[str, np.ndarray]:
    """Two towers: ``a_*`` arrays of the queries and ``b_*`` arrays of the docs."""
    out = {}
    for prefix, texts in zip(SIDES, (queries, docs)):
        out.update({prefix + k: v for k, v in encode_texts(tokenizer, texts, max_length).items()})
    return out


def side(batch: dict, prefix: str) -> dict:
    """The model inputs of one side (``a_`` or ``b_``) of a two-tower batch."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


class PairSet:
    """A labelled split: the pairs' model arrays (with ``labels``) and their rows (samples)."""

    def __init__(self, data: ArrayDataset, rows: list[dict]):
        self.data = data
        self.rows = rows


def read_pair_set(path: str, key: str, tokenizer, max_length: int, towers: bool) -> PairSet:
    """The pairs of ``path`` (the config key ``key``), encoded for two towers
    (``encode_towers``) or one (``encode_joint``)."""
    rows = read_pairs(path, key=key)
    encode = encode_towers if towers else encode_joint
    arrays = encode(tokenizer, [r["query"] for r in rows], [r["doc"] for r in rows], max_length)
    arrays["labels"] = np.asarray([r["label"] for r in rows], np.int32)
    return PairSet(ArrayDataset(arrays, name=path), rows)


def run_batched(forward: Callable, model, arrays: dict[str, np.ndarray],
                batch_size: int) -> np.ndarray:
    """``forward(model, batch)`` (jitted) over every row of ``arrays`` in fixed-size eval
    batches, the padding rows dropped: one output row per input row (``labels`` not needed)."""
    data = ArrayDataset({k: v for k, v in arrays.items() if k != "labels"}, name="pairs")
    return data.map_eval(lambda batch: forward(model, batch), batch_size)


def match_report(gold: np.ndarray, pred: np.ndarray,
                 score: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 of 0/1 decisions; with ``score`` (e.g. the
    cosine) also its Spearman correlation with the gold labels (0 when undefined)."""
    prf = metrics.precision_recall_f1(gold, pred, average="macro", labels=[0, 1])
    out = {"accuracy": metrics.accuracy(gold, pred),
           **{k: prf[k] for k in ("precision", "recall", "f1")}}
    if score is not None:
        rho = metrics.spearman(score, gold)
        out["spearman"] = 0.0 if math.isnan(rho) else rho
    return out


def ranked(candidates: list[str], score: np.ndarray, keep: np.ndarray | None = None) -> list:
    """``[[candidate, score], ...]`` best first (ties in the given order), scores rounded to 4
    places; ``keep`` (bool per candidate) leaves out the others."""
    order = np.argsort(-np.asarray(score), kind="stable")
    return [[candidates[i], round(float(score[i]), 4)] for i in order
            if keep is None or keep[i]]
