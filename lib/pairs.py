"""Text pairs for matching: the ``query \\t doc \\t label`` reader and the two encodings.

- one tower (``encode_joint``): ``[CLS] query [SEP] doc [SEP]`` with segment ids 0 / 1, as a
  BERT pair classifier reads it;
- two towers (``encode_towers``): each side encoded alone, ``[CLS] text [SEP]``, into arrays
  prefixed ``a_`` (query) and ``b_`` (doc), so one ``ArrayDataset`` row holds both sides and
  batches keep them aligned.
"""

from __future__ import annotations

import numpy as np

from lib.data import read_tsv

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
