"""Mask filling with an encoder-decoder (the PLM suite's T5 filling), on ``tasks.seq2seq``.

Data: JSONL records ``{"masked", "target"}`` (``data/t5_filling``: People's Daily sentences
with one span of 10-50% of their words replaced by ``[MASK]``; ``text`` the whole sentence).
Source ``"{masked}"中[MASK]位置的文本是：``, target the removed text, as the original.

Metrics of the filled span: exact match (the decoded span equals the removed text) and
ROUGE-1/2/L F x100 on jieba words (``lib.metrics.rouge_zh``); best checkpoint by ROUGE-L.

``--mode=predict`` reads a sentence with ``[MASK]`` per line (or a JSON object with
``masked``) and prints ``{"masked", "filling", "text"}``, ``text`` the sentence filled in.
"""

from __future__ import annotations

from lib import metrics as metrics_lib
from lib.errors import UserError
from tasks import seq2seq

MASK = "[MASK]"


def filling_source(masked: str) -> str:
    """The source text of a sentence with a ``[MASK]``."""
    return f'"{masked}"中{MASK}位置的文本是：'


class Task(seq2seq.Task):
    """Sentence with a [MASK] -> the masked text."""

    FIELDS = {"masked": str, "target": str}
    TARGET_FIELD = "target"

    def source_text(self, record: dict) -> str:
        """``"{masked}"中[MASK]位置的文本是：``."""
        return filling_source(str(record["masked"]))

    def target_text(self, record: dict) -> str:
        """The removed text."""
        return str(record["target"])

    def score(self, outputs: list[str], records: list[dict]) -> dict[str, float]:
        """Exact match (x100) and ROUGE-1/2/L of the filled spans."""
        references = [str(r["target"]) for r in records]
        exact = sum(o == r for o, r in zip(outputs, references)) / max(len(outputs), 1)
        return {"exact_match": 100.0 * exact, **metrics_lib.rouge_zh(outputs, references)}

    def predict_source(self, line: str) -> dict:
        """A sentence with ``[MASK]``, or a JSON object with ``masked``."""
        record = seq2seq.record_of_line(line, "masked")
        if MASK not in str(record.get("masked", "")):
            raise UserError(f"predict input {line[:40]!r}: expected a sentence with {MASK} "
                            '(or a JSON object {"masked": ...})')
        return record

    def predict_output(self, record: dict, output: str) -> dict:
        """``{"masked", "filling", "text"}``."""
        masked = str(record["masked"])
        return {"masked": masked, "filling": output, "text": masked.replace(MASK, output, 1)}
