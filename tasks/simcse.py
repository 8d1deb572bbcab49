"""Unsupervised SimCSE / ESimCSE: sentence vectors learned from unlabelled sentences.

Training reads one sentence per line. Each batch is encoded twice by the same encoder, with
different dropout keys: two *views* of every sentence. With ``loss.word_repetition > 0``
(ESimCSE) each view is first lengthened by duplicating ``k`` random inner tokens,
``k`` drawn from ``0..floor(rate * length)`` per sentence and view, so that a sentence's
length no longer tells its views apart from other sentences. A view's vector is
pooler -> Linear(``model.projection``) -> dropout -> L2 normalisation
(``lib.models.pooling.TwoTower``); the loss is the in-batch contrastive cross-entropy:
row ``i`` of ``scale * (U @ V.T)`` should pick column ``i`` (its other view) among the other
sentences of the batch.

Evaluation scores ``s1 \\t s2 \\t label`` pairs (the matching reader, ``lib.pairs``): the
cosine of the two vectors, a match when it exceeds ``eval.threshold``; accuracy, macro
P/R/F1 and the Spearman correlation of cosine and label. The encoder attends with the
attention mask (the original attended to padding too).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lib import config as config_lib
from lib import pairs
from lib.data import ArrayDataset, read_tsv
from lib.errors import UserError
from lib.models.pooling import POOLINGS, TwoTower, cosine
from tasks import base

# The sentence vector of the original: BERT's pooler output.
ORIGINAL_POOLING = "pooler"


def read_sentences(path: str, key: str | None = None) -> list[str]:
    """The non-blank lines of ``path``, one sentence each; a line with a tab names file:line."""
    return [row["text"] for row in read_tsv(path, ["text"], key=key)]


# ----------------------------------------------------------------------------- the pure parts


def contrastive_loss(u: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """In-batch contrastive cross-entropy of unit vectors ``u, v [b, d]``: the logits of row
    ``i`` are ``scale * u_i . v_j`` over the batch, the target is ``j = i``."""
    logits = scale * (u @ v.T)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.arange(u.shape[0])))


def repeat_tokens(input_ids: jax.Array, attention_mask: jax.Array,
                  repeat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each token ``j`` with ``repeat[b, j] = 1`` written twice in a row; the rows keep their
    width ``t``: a lengthened sequence is cut and its last token (``[SEP]``) written again at
    the end. Returns ``(input_ids, attention_mask)`` ``[b, t]``."""
    t = input_ids.shape[1]
    repeat = repeat.astype(jnp.int32) * attention_mask.astype(jnp.int32)
    # Output position p holds source token j when ends[j-1] <= p < ends[j].
    ends = jnp.cumsum(1 + repeat, axis=1)
    positions = jnp.arange(t)
    source = jax.vmap(lambda e: jnp.searchsorted(e, positions, side="right"))(ends)
    ids = jnp.take_along_axis(input_ids, jnp.minimum(source, t - 1), axis=1)
    length = jnp.sum(attention_mask, axis=1).astype(jnp.int32)
    new_length = jnp.minimum(length + jnp.sum(repeat, axis=1), t)
    last = jnp.take_along_axis(input_ids, (length - 1)[:, None], axis=1)
    ids = jnp.where(positions[None] == new_length[:, None] - 1, last, ids)
    mask = (positions[None] < new_length[:, None]).astype(attention_mask.dtype)
    return jnp.where(mask > 0, ids, 0).astype(input_ids.dtype), mask


def repetition_choice(key: jax.Array, attention_mask: jax.Array, rate: float) -> jax.Array:
    """ESimCSE's choice ``[b, t]`` (1 = write twice): per row of real length ``n`` (``[CLS]``
    and ``[SEP]`` included), ``k`` uniform in ``0..floor(rate * n)`` (at most the ``n - 2``
    inner tokens), then ``k`` distinct inner positions, uniformly."""
    b, t = attention_mask.shape
    k_count, k_pick = jax.random.split(key)
    n = jnp.sum(attention_mask, axis=1).astype(jnp.int32)
    high = jnp.minimum(jnp.floor(rate * n).astype(jnp.int32), jnp.maximum(n - 2, 0))
    k = jnp.floor(jax.random.uniform(k_count, (b,)) * (high + 1)).astype(jnp.int32)
    positions = jnp.arange(t)[None]
    inner = (positions >= 1) & (positions < (n - 1)[:, None])
    # The k inner positions of smallest random priority.
    priority = jnp.where(inner, jax.random.uniform(k_pick, (b, t)), 2.0)
    rank = jnp.argsort(jnp.argsort(priority, axis=1), axis=1)
    return (rank < k[:, None]).astype(jnp.int32)


def word_repetition(key: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                    rate: float) -> tuple[jax.Array, jax.Array]:
    """ESimCSE's augmentation: ``repeat_tokens`` of a ``repetition_choice``."""
    return repeat_tokens(input_ids, attention_mask,
                         repetition_choice(key, attention_mask, rate))


# ----------------------------------------------------------------------------- the task


class Task(base.Task):
    """Unsupervised SimCSE (``loss.word_repetition = 0``) or ESimCSE (> 0)."""

    RULES = {
        **base.Task.RULES,
        "model.sentence_pooling": config_lib.one_of("", *POOLINGS),
        "model.projection": config_lib.at_least(0),
        "model.projection_dropout": config_lib.fraction(),
        "data.test": config_lib.data_file(optional=True, modes=("train",)),
        "data.max_length": config_lib.at_least(4),
        "loss.scale": config_lib.above(0),
        "loss.word_repetition": config_lib.fraction(),
        "eval.threshold": config_lib.interval(-1, 1, high_open=False),
    }

    def __init__(self, config):
        super().__init__(config)
        self.max_length = int(config.data.max_length)
        self.scale = float(config.loss.scale)
        self.repetition = float(config.loss.word_repetition)
        self.threshold = float(config.eval.threshold)
        self.eval_batch_size = int(config.eval.batch_size)

    # --- model and data -------------------------------------------------------------------

    def build(self):
        """``(TwoTower, tokenizer)``: the bare encoder of ``model.path`` (or a scratch one with
        a character vocabulary) with the pooler and the projection head."""
        built = self.build_model("encoder", max_length=self.max_length)
        m = self.config.model
        model = TwoTower(built.model, m.sentence_pooling or ORIGINAL_POOLING,
                         built.config.hidden_size, projection=int(m.projection),
                         projection_dropout=float(m.projection_dropout),
                         rngs=nnx.Rngs(int(self.config.train.seed) + 3))
        return model, built.tokenizer

    def vocab_texts(self) -> list[str]:
        """The training sentences (a scratch model's character vocabulary)."""
        return read_sentences(self.config.data.train, key="data.train")

    def datasets(self, tokenizer):
        """The sentences of ``data.train`` as an ``ArrayDataset`` and the pairs of
        ``data.eval`` as a ``PairSet``."""
        sentences = read_sentences(self.config.data.train, key="data.train")
        arrays = pairs.encode_texts(tokenizer, sentences, self.max_length)
        train = ArrayDataset(arrays, name=self.config.data.train)
        return train, self._pairs(tokenizer, "data.eval")

    def test_dataset(self, tokenizer) -> pairs.PairSet | None:
        """``data.test`` (empty: none), scored on the best checkpoint after training."""
        return self._pairs(tokenizer, "data.test") if self.config.data.test else None

    def _pairs(self, tokenizer, key: str) -> pairs.PairSet:
        return pairs.read_pair_set(config_lib.lookup(self.config, key), key, tokenizer,
                                   self.max_length, towers=True)

    # --- training and evaluation ----------------------------------------------------------

    def views(self, batch: dict, key: jax.Array | None) -> list[dict]:
        """The two inputs of a training batch: the sentences as they are, or (ESimCSE, with a
        ``key``) each lengthened by its own word repetition."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        if not self.repetition or key is None:
            return [inputs, inputs]
        out = []
        for view_key in jax.random.split(key, 2):
            ids, mask = word_repetition(view_key, inputs["input_ids"], inputs["attention_mask"],
                                        self.repetition)
            out.append({"input_ids": ids, "attention_mask": mask,
                        "token_type_ids": jnp.zeros_like(ids)})
        return out

    def loss(self, model, batch, rng):
        """The contrastive loss of two views under different dropout keys; ``aux``: how often
        a sentence's nearest view in the batch is its own (``accuracy``). ``rng=None`` (no
        dropout, no repetition) makes the two views one."""
        keys = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        u, v = (model.embed(**view, rngs=None if key is None else nnx.Rngs(dropout=key))
                for view, key in zip(self.views(batch, keys[2]), keys[:2]))
        loss = contrastive_loss(u, v, self.scale)
        hits = jnp.argmax(u @ v.T, axis=1) == jnp.arange(u.shape[0])
        return loss, {"accuracy": jnp.mean(hits.astype(jnp.float32))}

    def cosines(self, model, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The cosine of each pair (``a_*`` and ``b_*`` arrays), batched and jitted."""
        forward = nnx.jit(lambda m, b: cosine(*(m.embed(**pairs.side(b, p))
                                                 for p in pairs.SIDES)))
        return pairs.run_batched(forward, model, arrays, self.eval_batch_size)

    def evaluate(self, model, eval_data: pairs.PairSet, repeat: int = 0):
        """Accuracy, macro P/R/F1 (cosine > ``eval.threshold``) and Spearman, 8 samples."""
        score = self.cosines(model, eval_data.data.arrays)
        pred = (score > self.threshold).astype(np.int32)
        out = pairs.match_report(eval_data.data.arrays["labels"], pred, score)
        samples = [{"s1": r["query"], "s2": r["doc"][:60], "label": r["label"],
                    "pred": int(p), "cosine": round(float(s), 4)}
                   for r, p, s in zip(eval_data.rows[:8], pred[:8], score[:8])]
        return out, samples

    # --- inference ------------------------------------------------------------------------

    def predict(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        """``s1 \\t s2`` lines: the cosine of the pair. Other lines: ``predict.candidates``
        ranked by cosine (``Used Xs.`` on stderr), as DSSM."""
        candidates = [str(c) for c in self.config.predict.candidates]
        out = []
        for number, line in enumerate(inputs, start=1):
            start = time.perf_counter()
            if "\t" in line:
                parts = line.split("\t")
                if len(parts) != 2:
                    raise UserError(f"predict input line {number}: expected one text, or two "
                                    f"texts separated by one tab; got {len(parts)} fields")
                arrays = pairs.encode_towers(tokenizer, [parts[0]], [parts[1]], self.max_length)
                score = float(self.cosines(model, arrays)[0])
                out.append({"s1": parts[0], "s2": parts[1], "cosine": round(score, 4)})
                continue
            if not candidates:
                raise UserError(f"predict input line {number}: a single text is ranked against "
                                "config.predict.candidates, which is empty; give candidates or "
                                "write text1<TAB>text2")
            arrays = pairs.encode_towers(tokenizer, [line] * len(candidates), candidates,
                                         self.max_length)
            score = self.cosines(model, arrays)
            print(f"Used {time.perf_counter() - start:.3f}s.", file=sys.stderr, flush=True)
            out.append({"text": line, "ranking": pairs.ranked(candidates, score)})
        return out

    def export(self, model, tokenizer, out_dir: str) -> None:
        """The encoder as an HF ``BertModel`` / ``ErnieModel`` (with LoRA: a PEFT adapter),
        and the pooling and projection head, which ``transformers`` has no place for, beside
        it (``TwoTower.export_head``)."""
        self.export_model(model.encoder, out_dir)
        model.export_head(out_dir)
