"""Summarization with an encoder-decoder: an article's text -> its headline (t5-pegasus,
Randeng-Pegasus, or a small scratch T5), on ``tasks.seq2seq``.

Data: JSONL records ``{"text", "summary"}`` (``data/summarization``: People's Daily articles'
first sentences and their headlines). The source is the text as it is (the originals add no
prompt); the target is the summary. Metrics: ROUGE-1/2/L F x100 on jieba words
(``lib.metrics.rouge_zh``, as the originals), best checkpoint by ROUGE-L. Decoding: beam search
with ``eval.num_beams`` beams (3 in the originals), spaces removed.

``--mode=predict`` reads one article per line (plain text, or a JSON object with ``text``)
and prints ``{"text": ..., "summary": ...}``.
"""

from __future__ import annotations

from lib import metrics as metrics_lib
from tasks import seq2seq


class Task(seq2seq.Task):
    """Article -> headline."""

    FIELDS = {"text": str, "summary": str}
    TARGET_FIELD = "summary"

    def source_text(self, record: dict) -> str:
        """The article's text."""
        return str(record["text"])

    def target_text(self, record: dict) -> str:
        """The headline."""
        return str(record["summary"])

    def score(self, outputs: list[str], records: list[dict]) -> dict[str, float]:
        """ROUGE-1/2/L (jieba words, F x100)."""
        return metrics_lib.rouge_zh(outputs, [r["summary"] for r in records])

    def predict_source(self, line: str) -> dict:
        """A plain article, or a JSON object with ``text``."""
        return seq2seq.record_of_line(line, "text")

    def predict_output(self, record: dict, output: str) -> dict:
        """``{"text", "summary"}``."""
        return {"text": self.source_text(record), "summary": output}
