"""Text classification with a BERT-family encoder.

Data: TSV lines ``label_id \\t text``; label names one per line in ``config.data.labels``.
Model: a sequence classifier through the model registry (``lib.models.build``): an encoder
checkpoint of ``config.model.path`` (BERT/ERNIE), or a scratch ``model.family`` encoder with a
character vocabulary built from the training data (``model.path = ""``).
Loss: cross-entropy, optionally focal (``config.loss.focal_gamma > 0``) and class-weighted
(``config.loss.class_weights``). Metrics: accuracy, weighted and macro P/R/F1, per-class F1.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lib import config as config_lib
from lib import metrics as metrics_lib
from lib.data import ArrayDataset, read_tsv
from lib.errors import UserError
from tasks import base

TRUNCATIONS = ("head", "head_tail")


def clip_text(text: str, max_length: int, truncation: str) -> str:
    """A text to encode in ``max_length`` tokens ([CLS] and [SEP] included).

    ``head`` leaves it to the tokenizer, which keeps the beginning. ``head_tail`` keeps the
    first quarter and the last three quarters of the character budget of a long text: reviews
    often end with their verdict (one character per token, exact for character vocabularies
    and for Chinese text under BERT tokenizers; the tokenizer still truncates what is left).
    """
    budget = max_length - 2
    if truncation == "head" or len(text) <= budget:
        return text
    head = budget // 4
    return text[:head] + text[len(text) - (budget - head):]


def read_labels(path: str) -> list[str]:
    """Label names, one per line; line i names label id i."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"label file {path!r} not found (--config.data.labels)")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: label names repeat")
    return names


def read_examples(path: str, num_labels: int, key: str) -> list[dict]:
    """``label_id \\t text`` records; a label outside ``[0, num_labels)`` names file:line."""

    def check(row: dict) -> str | None:
        if not 0 <= row["label"] < num_labels:
            return (f"label {row['label']} is outside the label set 0..{num_labels - 1} "
                    "(see --config.data.labels)")
        return None

    return read_tsv(path, ["label", "text"], {"label": int}, key=key, check=check)


class EvalSet:
    """What ``evaluate`` needs of a split: its examples as arrays, and their texts (samples)."""

    def __init__(self, data: ArrayDataset, texts: list[str]):
        self.data = data
        self.texts = texts


class Task(base.Task):
    """Sequence classification."""

    RULES = {
        **base.Task.RULES,
        "data.test": config_lib.data_file(optional=True, modes=("train",)),
        "data.labels": config_lib.data_file(modes=config_lib.MODES),
        "data.max_length": config_lib.at_least(3),
        "data.truncation": config_lib.one_of(*TRUNCATIONS),
        "loss.focal_gamma": config_lib.at_least(0),
    }

    def __init__(self, config):
        """The labels (``data.labels``) and the loss settings of ``config.loss``."""
        super().__init__(config)
        self.labels = read_labels(config.data.labels)
        self.max_length = int(config.data.max_length)
        self.truncation = config.data.truncation
        self.eval_batch_size = int(config.eval.batch_size)
        self.focal_gamma = float(config.loss.focal_gamma)
        weights = list(config.loss.class_weights or [])
        if weights and len(weights) != len(self.labels):
            raise UserError(
                f"config.loss.class_weights has {len(weights)} values for "
                f"{len(self.labels)} labels"
            )
        self.class_weights = jnp.asarray(weights, jnp.float32) if weights else None

    def build(self):
        """``(model, tokenizer)``: the encoder checkpoint of ``model.path`` (BERT/ERNIE) with
        a classifier of the label set, else a scratch ``model.family`` encoder with a character
        vocabulary of the training data."""
        built = self.build_model("sequence_classification", num_labels=len(self.labels),
                                 max_length=int(self.config.data.max_length))
        return built.model, built.tokenizer

    def vocab_texts(self) -> list[str]:
        """The training texts (a scratch model's character vocabulary)."""
        rows = read_tsv(self.config.data.train, ["label", "text"], {"label": int},
                        key="data.train")
        return [r["text"] for r in rows]

    def encode(self, tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and segment ids, padded to ``data.max_length``."""
        texts = [clip_text(t, self.max_length, self.truncation) for t in texts]
        enc = tokenizer(
            texts, max_length=self.max_length, truncation=True, padding="max_length",
            return_tensors="np",
        )
        out = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask")}
        out["token_type_ids"] = np.asarray(
            enc.get("token_type_ids", np.zeros_like(out["input_ids"])), np.int32
        )
        return out

    def _dataset(self, tokenizer, key: str) -> EvalSet:
        """The examples of ``config.<key>``, encoded, and their texts."""
        path = config_lib.lookup(self.config, key)
        rows = read_examples(path, len(self.labels), key)
        texts = [r["text"] for r in rows]
        arrays = self.encode(tokenizer, texts)
        arrays["labels"] = np.asarray([r["label"] for r in rows], np.int32)
        return EvalSet(ArrayDataset(arrays, name=path), texts)

    def datasets(self, tokenizer):
        """A train ``ArrayDataset`` (``data.train``) and an ``EvalSet`` (``data.eval``)."""
        return self._dataset(tokenizer, "data.train").data, self._dataset(tokenizer, "data.eval")

    def test_dataset(self, tokenizer) -> EvalSet | None:
        """``data.test`` (empty: none): the trainer evaluates the best checkpoint on it."""
        return self._dataset(tokenizer, "data.test") if self.config.data.test else None

    def logits(self, model, batch, rngs=None) -> jax.Array:
        """Classifier logits ``[b, num_labels]``."""
        return model(
            batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], rngs=rngs,
        )

    def loss(self, model, batch, rng):
        """Mean (focal, class-weighted) cross-entropy and the batch accuracy; ``rng=None``
        turns dropout off."""
        rngs = None if rng is None else nnx.Rngs(dropout=rng)
        logits = self.logits(model, batch, rngs).astype(jnp.float32)
        labels = batch["labels"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        if self.focal_gamma > 0:
            p_true = jnp.exp(-ce)
            ce = (1.0 - p_true) ** self.focal_gamma * ce
        if self.class_weights is not None:
            w = self.class_weights[labels]
            loss = jnp.sum(ce * w) / jnp.sum(w)
        else:
            loss = jnp.mean(ce)
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"accuracy": acc}

    def _predict_batches(self, model, data: ArrayDataset):
        forward = nnx.jit(lambda m, b: jax.nn.softmax(self.logits(m, b).astype(jnp.float32)))
        return data.map_eval(
            lambda b: forward(model, {k: v for k, v in b.items() if k != "labels"}),
            self.eval_batch_size)

    def evaluate(self, model, eval_data: EvalSet, repeat: int = 0):
        """Metrics on ``eval_data`` and a few sample predictions (deterministic: ``repeat``
        changes nothing)."""
        probs = self._predict_batches(model, eval_data.data)
        pred = probs.argmax(-1)
        gold = eval_data.data.arrays["labels"]
        report = metrics_lib.classification_report(gold, pred, self.labels)
        out = {k: v for k, v in report.items() if k != "per_class"}
        for name, m in report["per_class"].items():
            out[f"f1/{name}"] = m["f1"]
        samples = [
            {"text": t[:80], "label": self.labels[g], "pred": self.labels[p]}
            for t, g, p in zip(eval_data.texts[:8], gold[:8], pred[:8])
        ]
        return out, samples

    def predict(self, model, tokenizer, texts: list[str]) -> list[dict]:
        """Label and probability for each text."""
        arrays = self.encode(tokenizer, texts)
        probs = self._predict_batches(model, ArrayDataset(arrays, name="predict"))
        return [
            {"text": t, "label": self.labels[int(p.argmax())], "prob": float(p.max())}
            for t, p in zip(texts, probs)
        ]

    def export(self, model, tokenizer, out_dir: str) -> None:
        """An HF directory that ``transformers`` loads as a sequence classifier."""
        if self.built is not None:
            self.built.config.hf_extra["id2label"] = dict(enumerate(self.labels))
        self.export_model(model, out_dir)
