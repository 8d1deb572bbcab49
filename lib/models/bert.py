"""BERT and ERNIE encoders in Flax NNX, with the masked-LM, sequence-classification and UIE
heads.

The module tree mirrors Hugging Face's (``bert.encoder.layer.0.attention.self.query``, LayerNorm
attributes named ``LayerNorm``) so that ``lib.hf`` converts parameter names by its generic rule.
What the rule cannot express is stated in each class's ``hf_to_ours`` / ``ours_to_hf``:

- the encoder prefix: HF's ``bert.`` or ``ernie.``; ours is always ``bert.``, so a task reads
  ``model.bert`` whatever the family;
- old checkpoints: ``LayerNorm.gamma/beta`` names and a saved ``embeddings.position_ids`` buffer;
- heads the checkpoint has but the model does not (the pretraining heads ``cls.*`` when
  fine-tuning a classifier, the pooler when loading a masked LM): dropped by name;
- heads the model has but the checkpoint does not (the pooler and classifier of a classifier
  built on a pretrained encoder): initialized fresh, and logged;
- the masked-LM decoder, tied to the word embeddings: a checkpoint's copy is checked and dropped.

ERNIE (1.0/3.0, model_type ``ernie``) is BERT plus an optional task-type embedding
(``use_task_id``); the same classes serve both, configured by ``BertConfig.model_type``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import hf
from lib.errors import UserError
from lib.models import layers
from lib.models import pooling as pooling_lib

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]

# config.json keys that to_hf rewrites rather than copies from the source checkpoint.
_REWRITTEN_HF_KEYS = (
    "architectures", "id2label", "label2id", "num_labels", "torch_dtype", "dtype",
    "transformers_version",
)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class BertConfig:
    """Architecture of a BERT/ERNIE model (field names as in HF ``config.json``)."""

    vocab_size: int = 21128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    # Dropout before the classifier; None means hidden_dropout_prob (as HF).
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    # "bert" or "ernie": the HF class family and the checkpoint's key prefix.
    model_type: str = "bert"
    # ERNIE only: a task-type embedding added to the input embeddings.
    use_task_id: bool = False
    task_type_vocab_size: int = 3
    # Compute dtype; parameters stay fp32.
    dtype: Any = jnp.float32
    # Recompute each encoder layer in the backward pass (less memory, ~1/3 more compute).
    remat: bool = False
    # What the classifier's pooler reads: "cls" (the [CLS] state, as HF) or "mean" (the mean of
    # the last layer over real tokens; converges faster when training from scratch). Not an HF
    # field: only "cls" models export to an HF classifier.
    pooling: str = "cls"
    # The other keys of the source config.json, written back unchanged by to_hf.
    hf_extra: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> BertConfig:
        """Build from an HF ``config.json`` dict; ``overrides`` replace fields by name."""
        model_type = cfg.get("model_type", "bert")
        if model_type not in ("bert", "ernie"):
            raise UserError(
                f"config.json has model_type {model_type!r}; lib.models.bert handles 'bert' and "
                "'ernie' checkpoints (point --config.model.path at one, or use the matching port)"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(
                f"config.json has position_embedding_type {cfg['position_embedding_type']!r}; "
                "only 'absolute' position embeddings are supported"
            )
        ours_only = {"hf_extra", "dtype", "remat", "pooling"}
        names = {f.name for f in dataclasses.fields(cls)} - ours_only
        kwargs = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        kwargs["model_type"] = model_type
        if "id2label" in cfg and "num_labels" not in cfg:
            kwargs["num_labels"] = len(cfg["id2label"])
        kwargs["hf_extra"] = {
            k: v for k, v in cfg.items() if k not in names and k not in _REWRITTEN_HF_KEYS
        }
        if "id2label" in cfg:  # label names survive export when num_labels is unchanged
            kwargs["hf_extra"]["id2label"] = cfg["id2label"]
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(
                f"unknown BERT config field(s) {unknown}; valid: "
                f"{sorted(f.name for f in dataclasses.fields(cls))}"
            )
        kwargs.update(overrides)
        out = cls(**kwargs)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise a UserError for values the model cannot run with."""
        if self.hidden_act not in layers.ACTIVATIONS:
            raise UserError(
                f"hidden_act {self.hidden_act!r} is not supported; one of "
                f"{sorted(layers.ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.model_type not in ("bert", "ernie"):
            raise UserError(f"model_type {self.model_type!r}: expected 'bert' or 'ernie'")

    @property
    def hf_prefix(self) -> str:
        """The encoder's attribute name in HF head classes: ``bert`` or ``ernie``."""
        return self.model_type

    def to_hf(self, head: str = "ForSequenceClassification") -> dict:
        """A ``config.json`` dict that ``transformers`` loads; ``architectures`` is the HF class
        ``Bert<head>`` / ``Ernie<head>`` (head: ``Model``, ``ForMaskedLM``, ...)."""
        out = {k: v for k, v in self.hf_extra.items() if k not in _REWRITTEN_HF_KEYS}
        for f in dataclasses.fields(self):
            if f.name not in ("hf_extra", "dtype", "remat", "pooling", "num_labels", "use_task_id",
                              "task_type_vocab_size"):
                out[f.name] = getattr(self, f.name)
        if self.model_type == "ernie":
            out["use_task_id"] = self.use_task_id
            out["task_type_vocab_size"] = self.task_type_vocab_size
        family = {"bert": "Bert", "ernie": "Ernie"}[self.model_type]
        # UIE has no transformers class: its config.json names the PyTorch class, "UIE".
        out["architectures"] = [head if head == "UIE" else family + head]
        old = self.hf_extra.get("id2label")
        if old is not None and len(old) == self.num_labels:
            out["id2label"] = {str(k): v for k, v in old.items()}
        else:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        out["label2id"] = {v: int(k) for k, v in out["id2label"].items()}
        out["dtype"] = "float32"
        return out


# ----------------------------------------------------------------------------- modules


class _Group(nnx.Module):
    """A named group of submodules; it exists only so parameter paths match the HF tree."""

    def __init__(self, children: dict[str, Any]):
        for name, child in children.items():
            setattr(self, name, child)


def _group(**children) -> _Group:
    return _Group(children)


class BertEmbeddings(nnx.Module):
    """Word + position + token-type (+ ERNIE task-type) embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h, dt = cfg.hidden_size, cfg.dtype
        self.word_embeddings = layers.embedding(cfg.vocab_size, h, rngs=rngs, dtype=dt)
        # The small tables (positions, types) stay replicated: splitting them saves nothing.
        small = (None, "embed")
        self.position_embeddings = layers.embedding(
            cfg.max_position_embeddings, h, rngs=rngs, axes=small, dtype=dt
        )
        self.token_type_embeddings = layers.embedding(
            cfg.type_vocab_size, h, rngs=rngs, axes=small, dtype=dt
        )
        if cfg.use_task_id:
            self.task_type_embeddings = layers.embedding(
                cfg.task_type_vocab_size, h, rngs=rngs, axes=small, dtype=dt
            )
        self.LayerNorm = layers.layer_norm(h, cfg.layer_norm_eps, rngs=rngs, dtype=dt)
        self.use_task_id = cfg.use_task_id
        self.max_positions = cfg.max_position_embeddings
        self.dropout_rate = cfg.hidden_dropout_prob

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        task_type_ids: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """``input_ids [b, t]`` -> ``[b, t, H]``; missing type ids mean type 0."""
        t = input_ids.shape[1]
        if t > self.max_positions:
            raise UserError(
                f"sequence length {t} exceeds max_position_embeddings {self.max_positions}: "
                "lower the task's max length"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.word_embeddings(input_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(jnp.arange(t))[None]
        if self.use_task_id:
            if task_type_ids is None:
                task_type_ids = jnp.zeros_like(input_ids)
            x = x + self.task_type_embeddings(task_type_ids)
        return layers.dropout(self.LayerNorm(x), self.dropout_rate, rngs)


class BertLayer(nnx.Module):
    """One post-LayerNorm transformer encoder layer."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h, m, dt = cfg.hidden_size, cfg.intermediate_size, cfg.dtype
        eps = cfg.layer_norm_eps
        qkv = ("embed", "heads")
        # HF names the attention's inner module "self", which cannot be a keyword argument.
        self_attention = _group(
            query=layers.dense(h, h, qkv, rngs=rngs, dtype=dt),
            key=layers.dense(h, h, qkv, rngs=rngs, dtype=dt),
            value=layers.dense(h, h, qkv, rngs=rngs, dtype=dt),
        )
        self_output = _group(
            dense=layers.dense(h, h, ("heads", "embed"), rngs=rngs, dtype=dt),
            LayerNorm=layers.layer_norm(h, eps, rngs=rngs, dtype=dt),
        )
        self.attention = _Group({"self": self_attention, "output": self_output})
        self.intermediate = _group(dense=layers.dense(h, m, ("embed", "mlp"), rngs=rngs, dtype=dt))
        self.output = _group(
            dense=layers.dense(m, h, ("mlp", "embed"), rngs=rngs, dtype=dt),
            LayerNorm=layers.layer_norm(h, eps, rngs=rngs, dtype=dt),
        )
        self.heads = cfg.num_attention_heads
        self.act = cfg.hidden_act
        self.hidden_dropout = cfg.hidden_dropout_prob
        self.attention_dropout = cfg.attention_probs_dropout_prob

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        *,
        rngs: nnx.Rngs | None = None,
        queries: int | None = None,
    ) -> jax.Array:
        """``x [b, t, H]``, boolean ``mask`` broadcastable to ``[b, heads, t, t]``.

        ``queries=n`` computes the outputs of the first ``n`` positions only (attending to
        all ``t``): ``[b, n, H]``, equal to the first ``n`` rows of the full output.
        """
        b, t, hidden = x.shape
        split = lambda y: y.reshape(b, y.shape[1], self.heads, hidden // self.heads)
        sa = self.attention.self
        keys = x
        if queries is not None:
            x = x[:, :queries]
            if mask is not None and mask.shape[2] > 1:
                mask = mask[:, :, :queries]
        ctx = layers.attention(
            split(sa.query(x)), split(sa.key(keys)), split(sa.value(keys)), mask,
            dropout_rate=self.attention_dropout, rngs=rngs,
        ).reshape(x.shape)
        out = self.attention.output
        x = out.LayerNorm(x + layers.dropout(out.dense(ctx), self.hidden_dropout, rngs))
        y = layers.ACTIVATIONS[self.act](self.intermediate.dense(x))
        y = layers.dropout(self.output.dense(y), self.hidden_dropout, rngs)
        return self.output.LayerNorm(x + y)


def _run_layer(layer: BertLayer, x, mask, rngs):
    return layer(x, mask, rngs=rngs)


_run_layer_remat = nnx.remat(_run_layer)


def _attention_mask(attention_mask: jax.Array | None) -> jax.Array | None:
    """``[b, s]`` padding mask or ``[b, t, s]`` per-query mask -> boolean ``[b, 1, t|1, s]``."""
    if attention_mask is None:
        return None
    mask = attention_mask.astype(bool)
    return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :, :]


class BertModel(nnx.Module):
    """The encoder: embeddings, ``num_hidden_layers`` layers and (optionally) the pooler."""

    hf_head = "Model"

    def __init__(self, cfg: BertConfig, *, add_pooling_layer: bool = True, rngs: nnx.Rngs):
        cfg.validate()
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.encoder = _group(
            layer=nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        )
        if add_pooling_layer:
            self.pooler = _group(
                dense=layers.dense(cfg.hidden_size, cfg.hidden_size, ("embed", None),
                                   rngs=rngs, dtype=cfg.dtype)
            )
        self.has_pooler = add_pooling_layer
        self.remat = cfg.remat
        self.hf_prefix = cfg.hf_prefix

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        task_type_ids: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        first_only: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Encode ``input_ids [b, t]``.

        ``attention_mask``: ``[b, t]`` (1 = real token, 0 = padding) or ``[b, t, t]`` (which
        keys each query sees, e.g. a UniLM seq2seq mask). ``rngs=None`` is deterministic
        (evaluation); with ``rngs`` dropout is on. Returns ``(sequence_output [b, t, H],
        pooled [b, H])``; pooled is None for a model built without a pooler.
        ``first_only=True`` runs the last layer for the first position only (all that the
        pooler reads): the same pooled output for a fraction of the last layer's work, and
        sequence_output ``[b, 1, H]``.
        """
        mask = _attention_mask(attention_mask)
        x = self.embeddings(input_ids, token_type_ids, task_type_ids, rngs=rngs)
        run = _run_layer_remat if self.remat else _run_layer
        stack = list(self.encoder.layer)
        for layer in stack[:-1] if first_only else stack:
            x = run(layer, x, mask, rngs)
        if first_only:
            # Not rematerialized even with remat: one query row has little to keep.
            x = stack[-1](x, mask, rngs=rngs, queries=1)
        pooled = jnp.tanh(self.pooler.dense(x[:, 0])) if self.has_pooler else None
        return x, pooled

    # --------------------------------------------------------------- conversion

    def hf_to_ours(self, state: StateDict) -> StateDict:
        """HF keys of a BERT/ERNIE checkpoint (any head) -> this model's HF-style names."""
        state = _encoder_keys(_clean(state), self.hf_prefix, "")
        for key in [k for k in state if k.startswith(_FOREIGN_HEADS)]:
            del state[key]
        return state

    def ours_to_hf(self, state: StateDict) -> StateDict:
        """Our HF-style names -> the keys of HF ``BertModel`` / ``ErnieModel`` (no prefix)."""
        return dict(state)


class BertForMaskedLM(nnx.Module):
    """BERT + masked-LM head; the decoder is the transposed word embedding plus a bias."""

    hf_head = "ForMaskedLM"

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h, dt = cfg.hidden_size, cfg.dtype
        self.bert = BertModel(cfg, add_pooling_layer=False, rngs=rngs)
        self.cls = _group(
            predictions=_group(
                transform=_group(
                    dense=layers.dense(h, h, ("embed", None), rngs=rngs, dtype=dt),
                    LayerNorm=layers.layer_norm(h, cfg.layer_norm_eps, rngs=rngs, dtype=dt),
                ),
                bias=nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32),
                               out_sharding=("vocab",)),
            )
        )
        self.act = cfg.hidden_act
        self.hf_prefix = cfg.hf_prefix

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        task_type_ids: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        logits_at: jax.Array | None = None,
    ) -> jax.Array:
        """Vocabulary logits ``[b, t, vocab]`` (fp32) at every position; ``logits_at [b, k]``
        (positions within ``t``) gives ``[b, k, vocab]`` at those positions only (the head's
        work and memory for k positions instead of t: a prompt's ``[MASK]`` slots)."""
        x, _ = self.bert(input_ids, attention_mask, token_type_ids, task_type_ids, rngs=rngs)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        tr = self.cls.predictions.transform
        x = tr.LayerNorm(layers.ACTIVATIONS[self.act](tr.dense(x)))
        logits = layers.tied_logits(x, self.bert.embeddings.word_embeddings)
        return logits.astype(jnp.float32) + self.cls.predictions.bias[...]

    def hf_to_ours(self, state: StateDict) -> StateDict:
        """HF ``*ForMaskedLM`` / ``*ForPreTraining`` keys -> ours (tied decoder dropped)."""
        state = _encoder_keys(_clean(state), self.hf_prefix, "bert.")
        # A pretraining checkpoint also has the pooler and the next-sentence head.
        for key in [k for k in state if k.startswith(("bert.pooler.", "cls.seq_relationship."))]:
            del state[key]
        emb = "bert.embeddings.word_embeddings.weight"
        decoder = state.pop("cls.predictions.decoder.weight", None)
        if decoder is not None and emb in state and not np.array_equal(decoder, state[emb]):
            raise UserError(
                "checkpoint key 'cls.predictions.decoder.weight' differs from the word "
                "embeddings: the masked-LM decoder must be tied to them (untied heads are not "
                "supported)"
            )
        bias = state.pop("cls.predictions.decoder.bias", None)
        if bias is not None:
            if "cls.predictions.bias" not in state:
                state["cls.predictions.bias"] = bias
            elif not np.array_equal(bias, state["cls.predictions.bias"]):
                raise UserError(
                    "checkpoint keys 'cls.predictions.decoder.bias' and 'cls.predictions.bias' "
                    "differ: the decoder bias must be the tied prediction bias"
                )
        return state

    def ours_to_hf(self, state: StateDict) -> StateDict:
        """Ours -> HF keys; the tied decoder is left out, as ``transformers`` saves it."""
        return _with_prefix(state, self.hf_prefix)


class BertForSequenceClassification(nnx.Module):
    """BERT + dropout + Linear on the pooled output: the classifier head of the project."""

    hf_head = "ForSequenceClassification"

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.bert = BertModel(cfg, rngs=rngs)
        self.classifier = layers.dense(
            cfg.hidden_size, cfg.num_labels, ("embed", None), rngs=rngs, dtype=cfg.dtype
        )
        self.dropout_rate = (
            cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        )
        self.hf_prefix = cfg.hf_prefix
        if cfg.pooling not in ("cls", "mean"):
            raise UserError(f"pooling must be 'cls' or 'mean', got {cfg.pooling!r}")
        self.pooling = cfg.pooling

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        task_type_ids: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Class logits ``[b, num_labels]`` (fp32)."""
        if self.pooling == "mean":
            x, _ = self.bert(input_ids, attention_mask, token_type_ids, task_type_ids, rngs=rngs)
            pooled = jnp.tanh(self.bert.pooler.dense(pooling_lib.mean_pool(x, attention_mask)))
        else:
            _, pooled = self.bert(
                input_ids, attention_mask, token_type_ids, task_type_ids, rngs=rngs,
                first_only=True,
            )
        pooled = layers.dropout(pooled, self.dropout_rate, rngs)
        return self.classifier(pooled).astype(jnp.float32)

    def hf_to_ours(self, state: StateDict) -> StateDict:
        """HF keys -> ours. From a pretraining checkpoint the ``cls.*`` heads are dropped and
        a missing pooler or classifier is initialized fresh (as HF does)."""
        state = _encoder_keys(_clean(state), self.hf_prefix, "bert.")
        for key in [k for k in state if k.startswith("cls.")]:
            del state[key]
        hidden, labels = self.classifier.kernel.shape
        if "classifier.weight" in state and state["classifier.weight"].shape[0] != labels:
            raise UserError(
                f"the checkpoint's classifier has {state['classifier.weight'].shape[0]} labels, "
                f"the model {labels}: set num_labels to match, or start from a checkpoint "
                "without a classifier (its encoder gets a fresh one)"
            )
        for i, (name, out) in enumerate((("bert.pooler.dense", hidden), ("classifier", labels))):
            if not any(k.startswith(name + ".") for k in state):
                log.warning("checkpoint has no %s: initialized randomly", name)
                state.update(_fresh_dense(name, hidden, out, seed=i))
        return state

    def ours_to_hf(self, state: StateDict) -> StateDict:
        """Ours -> HF ``BertForSequenceClassification`` / ``ErnieFor...`` keys."""
        return _with_prefix(state, self.hf_prefix)


class BertForUIE(nnx.Module):
    """UIE (universal information extraction): the encoder plus two pointer heads, each a
    ``Linear(hidden, 1)`` on every token whose sigmoid is the probability that an answer span
    starts (``linear_start``) / ends (``linear_end``) there.

    Checkpoints are the PyTorch conversions of PaddleNLP's ``uie-base`` (``Pky/uie-base-zh``):
    ``encoder.*`` (an ``ErnieModel`` with its pooler, ``encoder.embeddings...``) plus
    ``linear_start.*`` / ``linear_end.*``, ``architectures: ["UIE"]``; PaddleNLP's later
    ``ernie.*`` naming loads too. A plain BERT/ERNIE checkpoint (no pointer heads) gets fresh
    heads, logged. Export writes the ``encoder.*`` layout back.
    """

    hf_head = "UIE"
    # Fresh heads start at the log-odds of a 1% span boundary, about the share of tokens that
    # start or end an answer, instead of 0 (p = 0.5): the first steps then learn where spans
    # are rather than pushing every token down (a scratch demo finds spans by step 300 instead
    # of step 900). A loaded checkpoint's heads keep their own bias.
    prior_logit = float(np.log(0.01 / 0.99))

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h, dt = cfg.hidden_size, cfg.dtype
        # The pooler is unused by the heads but part of the checkpoint layout (kept for export).
        self.bert = BertModel(cfg, rngs=rngs)
        self.linear_start = layers.dense(h, 1, ("embed", None), rngs=rngs, dtype=dt)
        self.linear_end = layers.dense(h, 1, ("embed", None), rngs=rngs, dtype=dt)
        for head in (self.linear_start, self.linear_end):
            head.bias[...] = jnp.full_like(head.bias[...], self.prior_logit)
        self.hf_prefix = cfg.hf_prefix

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        task_type_ids: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Start and end logits ``[b, t]`` (fp32); their sigmoids are the probabilities."""
        x, _ = self.bert(input_ids, attention_mask, token_type_ids, task_type_ids, rngs=rngs)
        start = self.linear_start(x)[..., 0].astype(jnp.float32)
        end = self.linear_end(x)[..., 0].astype(jnp.float32)
        return start, end

    def hf_to_ours(self, state: StateDict) -> StateDict:
        """UIE keys (``encoder.embeddings...``, ``ernie.*`` or a bare/headed BERT/ERNIE) ->
        ours. Pretraining heads (``cls.*``) are dropped; a checkpoint with neither pointer head
        (an encoder to fine-tune) gets fresh ones, and one without a pooler a fresh pooler.
        Anything else missing or left over is an error (``hf.load_into``)."""
        state = _clean(state)
        if any(k.startswith("encoder.embeddings.") for k in state):
            state = {("bert." + k[len("encoder."):] if k.startswith("encoder.") else k): v
                     for k, v in state.items()}
        else:
            state = _encoder_keys(state, self.hf_prefix, "bert.")
            for key in [k for k in state if k.startswith("cls.")]:
                del state[key]
        hidden = self.linear_start.kernel.shape[0]
        fresh = [("bert.pooler.dense", hidden)]
        if not any(k.startswith(("linear_start.", "linear_end.")) for k in state):
            fresh += [("linear_start", 1), ("linear_end", 1)]  # an encoder without UIE heads
        for i, (name, out) in enumerate(fresh):
            if not any(k.startswith(name + ".") for k in state):
                log.warning("checkpoint has no %s: initialized randomly", name)
                state.update(_fresh_dense(name, hidden, out, seed=i))
                if name.startswith("linear_"):
                    state[name + ".bias"][:] = self.prior_logit
        return state

    def ours_to_hf(self, state: StateDict) -> StateDict:
        """Ours -> the PyTorch UIE keys: the encoder under ``encoder.``."""
        return {("encoder." + k[len("bert."):] if k.startswith("bert.") else k): v
                for k, v in state.items()}


# ----------------------------------------------------------------------------- key helpers

# Heads that a bare encoder drops when loaded from a checkpoint with a task head.
_FOREIGN_HEADS = ("cls.", "classifier.")
_ENCODER_PARTS = ("embeddings.", "encoder.", "pooler.")


def _clean(state: StateDict) -> StateDict:
    """Undo old-checkpoint quirks: TF-era LayerNorm names and a saved position_ids buffer."""
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key.endswith("LayerNorm.gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith("LayerNorm.beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = value
    return out


def _encoder_keys(state: StateDict, hf_prefix: str, ours: str) -> StateDict:
    """Put the encoder's keys under ``ours`` (``""`` or ``"bert."``), whether the checkpoint
    has them under ``hf_prefix.`` (a head model) or at the top (a bare encoder)."""
    out = {}
    for key, value in state.items():
        if key.startswith(hf_prefix + "."):
            key = ours + key[len(hf_prefix) + 1 :]
        elif key.startswith(_ENCODER_PARTS):
            key = ours + key
        out[key] = value
    return out


def _fresh_dense(name: str, d_in: int, d_out: int, seed: int) -> StateDict:
    """HF-layout weights of a new Linear: N(0, 0.02) weight (as HF and ``layers.dense``
    initialize), zero bias. numpy with a fixed seed, because the model may be shapes only."""
    rng = np.random.default_rng(seed)
    return {
        name + ".weight": rng.normal(0.0, 0.02, (d_out, d_in)).astype(np.float32),
        name + ".bias": np.zeros((d_out,), np.float32),
    }


def _with_prefix(state: StateDict, hf_prefix: str) -> StateDict:
    return {
        (hf_prefix + k[len("bert") :] if k.startswith("bert.") else k): v for k, v in state.items()
    }


# ----------------------------------------------------------------------------- load / export

BertClass = (type[BertModel] | type[BertForMaskedLM] | type[BertForSequenceClassification]
             | type[BertForUIE])


def load_pretrained(
    model_dir: str | os.PathLike,
    cls: BertClass = BertForSequenceClassification,
    *,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    **overrides,
) -> tuple[nnx.Module, BertConfig]:
    """Build ``cls`` from an HF BERT/ERNIE directory and load its weights strictly.

    ``num_labels`` sets the classifier size (a checkpoint's own classifier must match it);
    ``overrides`` replace config fields (e.g. ``remat=True``, ``hidden_dropout_prob=0.0``).
    """
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    cfg = BertConfig.from_hf(hf.read_config(model_dir), dtype=dtype, **overrides)
    # Shapes only: every weight comes from the checkpoint, so random init would be wasted work
    # (and compiling the random number generator for every shape is slow on CPU).
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    hf.load_into(model, hf.load_state_dict(model_dir), model.hf_to_ours, where=str(model_dir))
    return model, cfg


def export_pretrained(
    model: nnx.Module,
    cfg: BertConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write ``model`` as an HF directory that ``transformers`` ``from_pretrained`` loads."""
    if getattr(model, "pooling", "cls") != "cls":
        raise UserError(
            f"this classifier pools with {model.pooling!r}; HF's BertForSequenceClassification "
            "reads [CLS], so exporting it would change its predictions (train with "
            "--config.model.pooling=cls to export)"
        )
    state = hf.state_of(model, model.ours_to_hf)
    return hf.save_pretrained(
        state, cfg.to_hf(model.hf_head), out_dir, tokenizer=tokenizer,
        max_shard_bytes=max_shard_bytes,
    )


# ----------------------------------------------------------------------------- PEFT


def _uie_classifier(model: BertForUIE) -> StateDict:
    """UIE's two pointer heads as one 2-label token classifier (label 0: start, 1: end)."""
    heads = (model.linear_start, model.linear_end)
    return {
        "classifier.weight": np.concatenate([np.asarray(h.kernel[...], np.float32).T
                                             for h in heads]),
        "classifier.bias": np.concatenate([np.asarray(h.bias[...], np.float32) for h in heads]),
    }


def peft_head(head: str, cfg: BertConfig, base_config: dict | None):
    """What a LoRA model of ``head`` is in PEFT (``lib.models.lora.PeftHead``):

    - ``sequence_classification`` / ``reward``: ``SEQ_CLS`` on
      ``Bert/ErnieForSequenceClassification``; the classifier is trained whole and saved as
      ``classifier``;
    - ``encoder``: ``FEATURE_EXTRACTION`` on ``BertModel`` / ``ErnieModel`` (a head a task puts
      on top, e.g. ``pooling.TwoTower``'s, is the task's to write);
    - ``masked_lm``: the plain ``PeftModel`` (PEFT has no masked-LM task type) on
      ``Bert/ErnieForMaskedLM``;
    - ``uie``: ``TOKEN_CLS`` on ``Bert/ErnieForTokenClassification`` with ``num_labels=2``: the
      two pointer heads are trained whole and saved as its ``classifier`` (row 0 start, row 1
      end), so ``logits[..., 0]`` / ``[..., 1]`` are the start / end logits.
    """
    from lib.models import lora

    def hf_path(path: str) -> str:
        return cfg.hf_prefix + path[len("bert"):] if path.startswith("bert.") else path

    if head in ("sequence_classification", "reward"):
        unsupported = ""
        if cfg.pooling != "cls":
            unsupported = (f"config.model.pooling={cfg.pooling!r} with a LoRA adapter: PEFT "
                           "loads it onto HF's sequence classifier, which pools [CLS]; use "
                           "--config.model.pooling=cls")
        return lora.PeftHead("SEQ_CLS", ("classifier",), hf_path, unsupported=unsupported)
    if head == "encoder":
        return lora.PeftHead("FEATURE_EXTRACTION", hf_path=hf_path)
    if head == "masked_lm":
        return lora.PeftHead(None, hf_path=hf_path)
    if head == "uie":
        unsupported = ""
        if base_config is not None and base_config.get("architectures") == ["UIE"]:
            unsupported = ("config.model.path is a UIE checkpoint (architectures ['UIE']), "
                           "which transformers cannot load as the token classifier a PEFT "
                           "adapter goes on: set --config.model.lora.export=merged (the UIE "
                           "layout with the adapters folded in)")
        return lora.PeftHead("TOKEN_CLS", ("linear_start", "linear_end"), hf_path,
                             saved=_uie_classifier, unsupported=unsupported)
    raise UserError(f"model head {head!r}: choose one of {tuple(HEAD_CLASSES)}")


# ----------------------------------------------------------------------------- registry

# "encoder": the bare encoder with its pooler (sentence vectors, lib.models.pooling).
# "reward": one score per text, the classifier with num_labels=1 (HF exports it as such).
# "uie": start/end pointer heads on every token (universal information extraction).
HEAD_CLASSES = {"sequence_classification": BertForSequenceClassification,
                "masked_lm": BertForMaskedLM, "encoder": BertModel,
                "reward": BertForSequenceClassification, "uie": BertForUIE}


def _load_head(model_dir, head: str, *, dtype, remat: bool, num_labels=None, pooling="cls"):
    return load_pretrained(model_dir, HEAD_CLASSES[head], num_labels=num_labels,
                           dtype=jnp.dtype(dtype), remat=remat, pooling=pooling)


def scratch_config(model_cfg, tokenizer, *, max_length=None, num_labels=None,
                   pooling="cls") -> BertConfig:
    """A BERT to train from scratch, sized by ``config.model`` (HF field names; ``dropout``
    for hidden states and attention), with ``tokenizer``'s vocabulary."""
    m = model_cfg
    return BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size, max_position_embeddings=max(max_length or 512, 8),
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout,
        num_labels=num_labels or 2, dtype=m.dtype, remat=m.remat, pooling=pooling,
    )


def _port():
    from lib.models import Port
    from lib.tokenizer import load_hf_tokenizer

    return Port(
        name="bert", heads=tuple(HEAD_CLASSES), load=_load_head,
        create=lambda cfg, head, rngs: HEAD_CLASSES[head](cfg, rngs=rngs),
        scratch_config=scratch_config, export=export_pretrained, tokenizer=load_hf_tokenizer,
        peft_head=peft_head,
    )


PORT = _port()
