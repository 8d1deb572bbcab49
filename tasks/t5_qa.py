"""Generative question answering with an encoder-decoder (the PLM suite's T5 QA on
DuReaderQG-style records), on ``tasks.seq2seq``.

Data: JSONL records ``{"context", "answer", "question", "id"}`` (DuReaderQG's fields;
``data/t5_qa`` holds People's Daily sentences whose answer is a tagged span of the sentence).
Source ``问题：{question}[SEP]原文：{context}``, target ``答案：{answer}`` then the tokenizer's
EOS (``[SEP]`` for UER's T5), as the original. A tokenizer with ``[SEP]`` in its vocabulary
(UER's T5, t5-pegasus) reads it as one token; a scratch character vocabulary spells it out.

Metrics: corpus BLEU-1..4 x100 on the answers' characters (``lib.metrics.corpus_bleu_n``) and
exact match, on **text**: the decoded output without its ``答案：`` cue against the record's
answer. The original computed BLEU on token ids with the padding left in the references
(padding ids counted as n-grams) and on the whole ``答案：...`` string (the fixed cue inflates
every score); both are fixed here. Best checkpoint by BLEU-4.

``--mode=predict`` reads lines ``question<TAB>context`` or JSON objects ``{"question",
"context"}`` and prints ``{"Q": question, "C": context, "A": answer}``, the original's
``Q: / C: / A:`` lines as one JSON object.
"""

from __future__ import annotations

from lib import metrics as metrics_lib
from lib.data import json_object_or_none
from lib.errors import UserError
from tasks import seq2seq

# What the target says before the answer.
ANSWER_CUE = "答案："


def qa_source(question: str, context: str) -> str:
    """The source text of a question about a context."""
    return f"问题：{question}[SEP]原文：{context}"


def answer_of(output: str) -> str:
    """The answer in a decoded output: the text after the ``答案：`` cue (all of it when the
    cue is missing)."""
    return output[len(ANSWER_CUE):] if output.startswith(ANSWER_CUE) else output


class Task(seq2seq.Task):
    """Question + context -> answer."""

    FIELDS = {"context": str, "answer": str, "question": str}
    TARGET_FIELD = "answer"

    def source_text(self, record: dict) -> str:
        """``问题：{question}[SEP]原文：{context}``."""
        return qa_source(str(record["question"]), str(record["context"]))

    def target_text(self, record: dict) -> str:
        """``答案：{answer}`` (the EOS follows)."""
        return ANSWER_CUE + str(record["answer"])

    def score(self, outputs: list[str], records: list[dict]) -> dict[str, float]:
        """Corpus BLEU-1..4 on answer characters and exact match (x100)."""
        answers = [answer_of(o) for o in outputs]
        references = [str(r["answer"]) for r in records]
        exact = sum(a == r for a, r in zip(answers, references)) / max(len(answers), 1)
        return {**metrics_lib.corpus_bleu_n(answers, references), "exact_match": 100.0 * exact}

    def predict_source(self, line: str) -> dict:
        """``question<TAB>context``, or a JSON object with both."""
        record = json_object_or_none(line)
        if record is None:
            question, tab, context = line.partition("\t")
            record = {"question": question, "context": context} if tab else {}
        if not isinstance(record.get("question"), str) or not isinstance(
                record.get("context"), str):
            raise UserError(f"predict input {line[:40]!r}: expected question<TAB>context or a "
                            'JSON object {"question": ..., "context": ...}')
        return record

    def predict_output(self, record: dict, output: str) -> dict:
        """``{"Q", "C", "A"}``: the question, the context and the answer."""
        return {"Q": record["question"], "C": record["context"], "A": answer_of(output)}
