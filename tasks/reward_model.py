"""A reward model: a BERT-family encoder that scores a text, trained on ranked lists.

Data: TSV lines of ``LIST_SIZE`` (4) texts ranked best to worst. Model: the registry's
``reward`` head (``lib.models.build``): the encoder, its pooler and a Linear to one score, an
encoder checkpoint of ``config.model.path`` or a scratch ``model.family`` encoder with a
character vocabulary of the training data. A batch of lists ``[b, 4, seq]`` is scored as
``[4b, seq]`` and reshaped to rewards ``[b, 4]``.
Loss: ``-mean over pairs i < j of log sigmoid(r_i - r_j)`` (``lib.rl.rank_loss``).
Metrics: ranking accuracy (the fraction of lists whose four scores are in the right order;
chance 1/24) and pairwise accuracy (chance 1/2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import config as config_lib
from lib import metrics as metrics_lib
from lib import rl
from lib.data import ArrayDataset, read_tsv
from tasks import base, classification

LIST_SIZE = 4
COLUMNS = tuple(f"text{i + 1}" for i in range(LIST_SIZE))


def read_lists(path: str, key: str) -> list[list[str]]:
    """The ranked lists of a TSV file (``LIST_SIZE`` texts per line, best first); a line with
    another number of columns, or an empty text, names file:line."""

    def check(row: dict) -> str | None:
        empty = [c for c in COLUMNS if not row[c].strip()]
        return f"column {empty[0]} is empty" if empty else None

    return [[r[c] for c in COLUMNS] for r in read_tsv(path, COLUMNS, key=key, check=check)]


class EvalSet:
    """A split's lists, encoded (``[n, LIST_SIZE, seq]`` arrays), and their texts."""

    def __init__(self, data: ArrayDataset, lists: list[list[str]]):
        self.data = data
        self.lists = lists


class Task(base.Task):
    """Reward model on ranked lists."""

    RULES = {
        **base.Task.RULES,
        "data.max_length": config_lib.at_least(3),
    }

    def __init__(self, config):
        """The sequence length and eval batch size (lists) of ``config``."""
        super().__init__(config)
        self.max_length = int(config.data.max_length)
        self.truncation = "head"  # read by classification.Task.encode
        self.eval_batch_size = int(config.eval.batch_size)

    def build(self):
        """``(model, tokenizer)``: the ``reward`` head (one score per text) on the encoder
        checkpoint of ``model.path``, else on a scratch encoder with a character vocabulary of
        the training lists."""
        built = self.build_model("reward", num_labels=1,
                                 max_length=self.max_length)
        return built.model, built.tokenizer

    def vocab_texts(self) -> list[str]:
        """Every text of the training lists (a scratch model's character vocabulary)."""
        return [t for texts in read_lists(self.config.data.train, "data.train") for t in texts]

    def encode(self, tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and segment ids ``[n, max_length]`` (as classification)."""
        return classification.Task.encode(self, tokenizer, texts)

    def _dataset(self, tokenizer, key: str) -> EvalSet:
        path = config_lib.lookup(self.config, key)
        lists = read_lists(path, key)
        flat = self.encode(tokenizer, [t for texts in lists for t in texts])
        arrays = {k: v.reshape(len(lists), LIST_SIZE, -1) for k, v in flat.items()}
        return EvalSet(ArrayDataset(arrays, name=path), lists)

    def datasets(self, tokenizer):
        """Train lists (``data.train``) as an ``ArrayDataset`` and an ``EvalSet`` of
        ``data.eval``."""
        return self._dataset(tokenizer, "data.train").data, self._dataset(tokenizer, "data.eval")

    def scores(self, model, batch, rngs=None) -> jax.Array:
        """One score per text: ``[..., seq]`` inputs -> ``[...]`` fp32 scores."""
        lead = batch["input_ids"].shape[:-1]
        flat = {k: batch[k].reshape(-1, batch[k].shape[-1])
                for k in ("input_ids", "attention_mask", "token_type_ids")}
        out = model(flat["input_ids"], attention_mask=flat["attention_mask"],
                    token_type_ids=flat["token_type_ids"], rngs=rngs)
        return out[:, 0].astype(jnp.float32).reshape(lead)

    def loss(self, model, batch, rng):
        """The pairwise ranking loss of the batch's lists, with the batch's pairwise and
        full-order accuracies; ``rng=None`` turns dropout off."""
        rngs = None if rng is None else nnx.Rngs(dropout=rng)
        rewards = self.scores(model, batch, rngs)
        ordered = jnp.all(rewards[:, :-1] > rewards[:, 1:], axis=-1)
        return rl.rank_loss(rewards), {
            "pairwise_accuracy": rl.pairwise_accuracy(rewards),
            "ranking_accuracy": jnp.mean(ordered.astype(jnp.float32)),
        }

    def _score_batches(self, model, data: ArrayDataset) -> np.ndarray:
        forward = nnx.jit(lambda m, b: self.scores(m, b))
        return data.map_eval(lambda b: forward(model, b), self.eval_batch_size)

    def evaluate(self, model, eval_data: EvalSet, repeat: int = 0):
        """Ranking and pairwise accuracy and the mean loss on ``eval_data``; prints
        ``Evaluation acc: X`` (the ranking accuracy). Deterministic: ``repeat`` changes
        nothing."""
        rewards = self._score_batches(model, eval_data.data)
        acc = metrics_lib.ranking_accuracy(rewards)
        r = jnp.asarray(rewards)
        metrics = {
            "ranking_accuracy": acc,
            "pairwise_accuracy": float(rl.pairwise_accuracy(r)),
            "loss": float(rl.rank_loss(r)),
        }
        print(f"Evaluation acc: {acc:.4f}", flush=True)
        samples = [
            {"texts": [t[:40] for t in texts], "scores": [round(float(s), 4) for s in row]}
            for texts, row in zip(eval_data.lists[:8], rewards[:8])
        ]
        return metrics, samples

    def predict(self, model, tokenizer, texts: list[str]) -> list[dict]:
        """The score of each text."""
        scores = self._score_batches(model, ArrayDataset(self.encode(tokenizer, texts),
                                                         name="predict"))
        return [{"text": t, "score": float(s)} for t, s in zip(texts, scores)]

    def export(self, model, tokenizer, out_dir: str) -> None:
        """An HF directory that ``transformers`` loads as a sequence classifier with one
        label: its logit is the score."""
        if self.built is not None:
            self.built.config.hf_extra["id2label"] = {0: "score"}
        self.export_model(model, out_dir)
