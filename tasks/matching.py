"""Text matching of ``query \\t doc \\t label`` pairs with a BERT-family encoder, three ways.

``config.model.matching``:

- ``pointwise`` (one tower): ``[CLS] query [SEP] doc [SEP]`` -> pooler -> dropout -> Linear(2),
  cross-entropy. Exports to an HF ``BertForSequenceClassification``.
- ``dssm`` (two towers): each side encoded alone, the cosine of their sentence vectors
  (``model.sentence_pooling``; empty: the BERT pooler output, as the original) regressed on
  the label (MSE); a pair is positive when the cosine is at least ``eval.threshold``.
- ``sentence_transformer`` (two towers): sentence vectors (empty ``model.sentence_pooling``:
  masked mean pooling, as the original), ``[u; v; |u - v|]`` -> Linear(2), cross-entropy.

Metrics: accuracy and macro precision / recall / F1 (+ Spearman of the cosine for DSSM). The
model is built through the registry (``lib.models.build``): the checkpoint of
``model.path``, or a scratch ``model.family`` encoder with a character vocabulary of the
training data; the towers wrap it in ``lib.models.pooling.TwoTower``.
"""

from __future__ import annotations

import itertools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lib import config as config_lib
from lib import pairs
from lib.data import json_object_or_none
from lib.errors import UserError
from lib.models.pooling import POOLINGS, TwoTower, cosine
from tasks import base

MATCHINGS = ("pointwise", "dssm", "sentence_transformer")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _towers_problem(value, config) -> str | None:
    if config.model.matching == "pointwise" or value:
        return None
    return "the two-tower models rank these texts in --mode=predict; give at least one"


class Task(base.Task):
    """Pointwise, DSSM or Sentence-Transformer matching (``config.model.matching``)."""

    RULES = {
        **base.Task.RULES,
        "model.matching": config_lib.one_of(*MATCHINGS),
        "model.pooling": config_lib.one_of("cls", "mean"),
        "model.sentence_pooling": config_lib.one_of("", *POOLINGS),
        "data.test": config_lib.data_file(optional=True, modes=("train",)),
        "data.max_length": config_lib.at_least(4),
        "eval.threshold": config_lib.interval(-1, 1, high_open=False),
        "predict.candidates": config_lib.Rule(_towers_problem, ("predict",)),
    }

    def __init__(self, config):
        super().__init__(config)
        self.matching = config.model.matching
        self.towers = self.matching != "pointwise"
        self.max_length = int(config.data.max_length)
        self.threshold = float(config.eval.threshold)
        self.eval_batch_size = int(config.eval.batch_size)

    # --- model and data -------------------------------------------------------------------

    def build(self):
        """``(model, tokenizer)``: a pair classifier (pointwise) or a ``TwoTower`` around the
        bare encoder, from ``model.path`` or from scratch with a character vocabulary."""
        head = "encoder" if self.towers else "sequence_classification"
        built = self.build_model(head, num_labels=2, max_length=self.max_length)
        if not self.towers:
            return built.model, built.tokenizer
        labels = 2 if self.matching == "sentence_transformer" else 0
        original = "pooler" if self.matching == "dssm" else "mean"
        model = TwoTower(built.model, self.config.model.sentence_pooling or original,
                         built.config.hidden_size, labels,
                         rngs=nnx.Rngs(int(self.config.train.seed) + 3))
        return model, built.tokenizer

    def vocab_texts(self) -> list[str]:
        """Both sides of the training pairs (a scratch model's character vocabulary)."""
        rows = pairs.read_pairs(self.config.data.train, key="data.train")
        return list(itertools.chain.from_iterable((r["query"], r["doc"]) for r in rows))

    def encode(self, tokenizer, queries: list[str], docs: list[str]) -> dict[str, np.ndarray]:
        """The model inputs of the pairs: joint (pointwise) or one side per tower."""
        encode = pairs.encode_towers if self.towers else pairs.encode_joint
        return encode(tokenizer, queries, docs, self.max_length)

    def _dataset(self, tokenizer, key: str) -> pairs.PairSet:
        return pairs.read_pair_set(config_lib.lookup(self.config, key), key, tokenizer,
                                   self.max_length, self.towers)

    def datasets(self, tokenizer):
        """A train ``ArrayDataset`` (``data.train``) and a ``PairSet`` (``data.eval``)."""
        return self._dataset(tokenizer, "data.train").data, self._dataset(tokenizer, "data.eval")

    def test_dataset(self, tokenizer) -> pairs.PairSet | None:
        """``data.test`` (empty: none), scored on the best checkpoint after training."""
        return self._dataset(tokenizer, "data.test") if self.config.data.test else None

    # --- training and evaluation ----------------------------------------------------------

    def outputs(self, model, batch, rngs=None) -> jax.Array:
        """Logits ``[b, 2]`` (pointwise, Sentence-Transformer) or the cosine ``[b]`` (DSSM)."""
        if not self.towers:
            return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"], rngs=rngs).astype(jnp.float32)
        u, v = (model.embed(**pairs.side(batch, p), rngs=rngs) for p in pairs.SIDES)
        return cosine(u, v) if self.matching == "dssm" else model.classify(u, v)

    def loss(self, model, batch, rng):
        """Cross-entropy, or MSE of the cosine (DSSM); ``aux``: the batch accuracy."""
        rngs = None if rng is None else nnx.Rngs(dropout=rng)
        out = self.outputs(model, batch, rngs)
        labels = batch["labels"]
        if self.matching == "dssm":
            loss = jnp.mean((out - labels.astype(out.dtype)) ** 2)
            pred = (out >= self.threshold).astype(labels.dtype)
        else:
            loss = cross_entropy(out, labels)
            pred = jnp.argmax(out, -1)
        return loss, {"accuracy": jnp.mean((pred == labels).astype(jnp.float32))}

    def scores(self, model, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """``outputs`` of every row of ``arrays`` (no labels needed), batched and jitted."""
        forward = nnx.jit(lambda m, b: self.outputs(m, b))
        return pairs.run_batched(forward, model, arrays, self.eval_batch_size)

    def decide(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predicted label, score of label 1)``: cosine >= threshold (DSSM), else argmax
        and the softmax probability."""
        if self.matching == "dssm":
            return (out >= self.threshold).astype(np.int32), out
        probs = np.asarray(jax.nn.softmax(out, -1))
        return out.argmax(-1), probs[:, 1]

    def evaluate(self, model, eval_data: pairs.PairSet, repeat: int = 0):
        """Accuracy, macro P/R/F1 (+ Spearman for DSSM) and 8 samples (deterministic)."""
        pred, score = self.decide(self.scores(model, eval_data.data.arrays))
        gold = eval_data.data.arrays["labels"]
        out = pairs.match_report(gold, pred, score if self.matching == "dssm" else None)
        samples = [{"query": r["query"], "doc": r["doc"][:60], "label": r["label"],
                    "pred": int(p), "score": round(float(s), 4)}
                   for r, p, s in zip(eval_data.rows[:8], pred[:8], score[:8])]
        return out, samples

    # --- inference ------------------------------------------------------------------------

    def predict(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        """Pointwise: ``query \\t doc`` lines (or ``{"query", "doc"}``) -> the two logits.
        Towers: each line a query, ranked against ``predict.candidates``."""
        if not self.towers:
            return self._predict_pairs(model, tokenizer, inputs)
        candidates = [str(c) for c in self.config.predict.candidates]
        out = []
        for text in inputs:
            start = time.perf_counter()
            arrays = self.encode(tokenizer, [text] * len(candidates), candidates)
            pred, score = self.decide(self.scores(model, arrays))
            print(f"Used {time.perf_counter() - start:.3f}s.", file=sys.stderr, flush=True)
            if self.matching == "dssm":
                out.append({"text": text, "ranking": pairs.ranked(candidates, score)})
            else:
                out.append({"text": text, "matches": pairs.ranked(candidates, score, pred == 1)})
        return out

    def _predict_pairs(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        queries, docs = [], []
        for number, line in enumerate(inputs, start=1):
            record = json_object_or_none(line)
            if record is not None and isinstance(record.get("query"), str) \
                    and isinstance(record.get("doc"), str):
                query, doc = record["query"], record["doc"]
            elif line.count("\t") == 1:
                query, doc = line.split("\t")
            else:
                raise UserError(f"predict input line {number}: expected query<TAB>doc or "
                                '{"query": ..., "doc": ...}')
            queries.append(query)
            docs.append(doc)
        logits = self.scores(model, self.encode(tokenizer, queries, docs))
        return [{"query": q, "doc": d, "logits": [round(float(x), 4) for x in row],
                 "label": int(row.argmax())} for q, d, row in zip(queries, docs, logits)]

    def export(self, model, tokenizer, out_dir: str) -> None:
        """Pointwise: an HF sequence classifier. Towers: the shared encoder as an HF
        ``BertModel`` plus the pooling and the Sentence-Transformer's pair classifier
        (``TwoTower.export_head``). With LoRA the HF model is a PEFT adapter."""
        if not self.towers:
            self.export_model(model, out_dir)
            return
        self.export_model(model.encoder, out_dir)
        model.export_head(out_dir)
