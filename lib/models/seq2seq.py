"""The one encoder-decoder transformer: every sequence-to-sequence port (T5, T5 v1.1 / mT5,
Pegasus) is a ``Seq2SeqConfig`` plus a weight-name map.

What a config chooses:

- positions: T5's relative position buckets (a learned bias per head and bucket, added to the
  attention scores of every layer of a stack; bidirectional in the encoder, past-only in the
  decoder) or Pegasus's fixed sinusoidal table added to the embeddings;
- attention: scaled by ``1 / sqrt(head_dim)`` or not (T5), with or without biases;
- the MLP: ``fc2(act(fc1 x))`` or gated ``fc2(act(fc1_0 x) * fc1_1 x)`` (T5 v1.1 / mT5);
- norms: T5's RMS norm (no mean, no bias) or LayerNorm; blocks are pre-norm and each stack
  ends with a final norm;
- embeddings scaled by ``sqrt(hidden)`` or not; the LM head tied to the shared embedding
  (T5 v1.0 rescales the decoder output by ``hidden**-0.5`` first) or separate, plus
  Pegasus's fixed ``final_logits_bias``.

The module tree uses the HF Pegasus (BART) names (``model.encoder.layers.N.self_attn.q_proj``,
``fc1``/``fc2``; the gated MLP's ``fc1_0``/``fc1_1``, T5's ``relative_attention_bias`` once per
stack); T5 renames in its port (``lib.hf.NameMap``).

``Seq2SeqLM`` is the encoder-decoder interface (``lib.models.Seq2SeqLM``): ``model(input_ids,
attention_mask, decoder_input_ids, decoder_attention_mask)`` is the teacher-forced training
pass; for decoding, ``encode`` runs the encoder once, ``init_cache`` computes every decoder
layer's cross-attention keys/values once and makes room for ``slots`` decoder tokens, and each
``decode`` call appends tokens after the cache's filled slots.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import hf
from lib.errors import UserError
from lib.models.layers import (
    ACTIVATIONS,
    KVCache,
    RMSNorm,
    attention,
    dense,
    dropout,
    embedding,
    layer_norm,
    relative_position_bucket,
    sinusoidal_table,
    tied_logits,
)

_CHOICES = {
    "positions": ("relative", "sinusoidal"),
    "mlp": ("plain", "gated"),
    "norm": ("rms", "layer"),
}


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Architecture and numerics of an encoder-decoder. Frozen (hashable): static metadata of
    the module and part of the jit cache key. ``dtype`` is the compute dtype; params are fp32.
    A family subclasses it, redeclaring the fields whose defaults differ, and adds its
    ``config.json`` mapping (``from_hf`` / ``to_hf``)."""

    family: ClassVar[str] = "encoder-decoder"
    # lib.generate runs the encoder once and starts the decoder at decoder_start_token_id.
    is_encoder_decoder: ClassVar[bool] = True

    # Vocabulary size (the shared embedding and the LM head).
    vocab_size: int = 32128
    # Width of the residual stream.
    hidden_size: int = 512
    # Width of the MLP's inner layer.
    intermediate_size: int = 2048
    # Layers of the encoder stack.
    num_encoder_layers: int = 6
    # Layers of the decoder stack.
    num_decoder_layers: int = 6
    # Attention heads (self- and cross-attention).
    num_attention_heads: int = 8
    # Width of one head; None: hidden_size // num_attention_heads.
    head_dim: int | None = None
    # "relative" (T5's learned buckets) or "sinusoidal" (Pegasus's fixed table).
    positions: str = "relative"
    # Relative positions: buckets per stack (half per direction in the encoder).
    relative_attention_num_buckets: int = 32
    # Relative positions: distances from here on share the last bucket.
    relative_attention_max_distance: int = 128
    # Sinusoidal positions: the longest encoder or decoder sequence.
    max_position_embeddings: int = 512
    # Multiply the token embeddings by sqrt(hidden_size) (Pegasus scale_embedding).
    scale_embedding: bool = False
    # Scale attention scores by 1 / sqrt(head_dim) (T5 does not).
    scale_attention: bool = True
    # Biases on the attention and MLP projections.
    use_bias: bool = False
    # "plain": fc2(act(fc1 x)); "gated": fc2(act(fc1_0 x) * fc1_1 x).
    mlp: str = "plain"
    # MLP activation, a key of lib.models.layers.ACTIVATIONS.
    hidden_act: str = "relu"
    # "rms" (T5: no mean, no bias) or "layer" (LayerNorm).
    norm: str = "rms"
    # Epsilon of every norm.
    norm_eps: float = 1e-6
    # The LM head is the shared embedding (no lm_head weight).
    tie_word_embeddings: bool = True
    # Multiply the decoder's output by hidden_size**-0.5 before the head (T5 v1.0).
    scale_decoder_outputs: bool = False
    # A fixed per-token logit offset read from the checkpoint (Pegasus); not trained.
    final_logits_bias: bool = False
    # Dropout on the embeddings and on every block's output before the residual sum.
    hidden_dropout: float = 0.0
    # Dropout on the attention probabilities.
    attention_dropout: float = 0.0
    # Dropout after the MLP's activation.
    activation_dropout: float = 0.0
    # Dropout (hidden_dropout) also after each stack's final norm (T5).
    dropout_after_final_norm: bool = False
    # Std of the normal initializer of a scratch model.
    initializer_range: float = 0.02
    # Compute dtype (float32 or bfloat16); params stay fp32.
    dtype: str = "float32"
    # Recompute each layer's activations in the backward pass instead of storing them.
    remat: bool = False
    # Padding id (T5: also the decoder start).
    pad_token_id: int | None = 0
    # End-of-sequence id (or ids).
    eos_token_id: int | tuple[int, ...] | None = 1
    # The first decoder input of every target.
    decoder_start_token_id: int | None = 0

    def __post_init__(self):
        name = self.family
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"{name} {key} {getattr(self, key)!r}: choose one of {allowed}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"{name} activation {self.hidden_act!r} is not supported; use one "
                            f"of {sorted(ACTIVATIONS)}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        try:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        except TypeError:
            raise UserError(f"{name} dtype {self.dtype!r} is not a dtype name (use float32 or "
                            "bfloat16)") from None

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a numpy dtype object."""
        return jnp.dtype(self.dtype)

    @classmethod
    def with_overrides(cls, fields: dict, overrides: dict) -> Seq2SeqConfig:
        """``cls(**fields, **overrides)``; an override that is not a field is a UserError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown {cls.family} config override(s) {unknown}; known fields: "
                            f"{sorted(known)}")
        return cls(**{**fields, **overrides})


# ----------------------------------------------------------------------------- modules


def _norm(cfg: Seq2SeqConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.norm == "layer":
        return layer_norm(cfg.hidden_size, cfg.norm_eps, rngs=rngs, dtype=cfg.compute_dtype)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=cfg.compute_dtype)


class LogitsBias(nnx.Variable):
    """A fixed offset added to every logit (Pegasus's ``final_logits_bias`` buffer): loaded
    and exported with the weights, never trained."""


class Attention(nnx.Module):
    """Multi-head attention: ``q`` from the queries' states, ``k``/``v`` from the same states
    (self-attention) or from the encoder output (cross-attention, computed once per input)."""

    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        h, inner = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, std=cfg.initializer_range,
                  use_bias=cfg.use_bias)
        self.q_proj = dense(h, inner, ("embed", "heads"), **kw)
        self.k_proj = dense(h, inner, ("embed", "heads"), **kw)
        self.v_proj = dense(h, inner, ("embed", "heads"), **kw)
        self.out_proj = dense(inner, h, ("heads", "embed"), **kw)
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.scale = None if cfg.scale_attention else 1.0
        self.dropout_rate = cfg.attention_dropout

    def project_kv(self, x: jax.Array, rngs: nnx.Rngs | None = None):
        """Keys and values ``[b, s, heads, head_dim]`` of states ``x [b, s, hidden]``."""
        shape = (*x.shape[:2], self.heads, self.head_dim)
        return (self.k_proj(x, rngs=rngs).reshape(shape),
                self.v_proj(x, rngs=rngs).reshape(shape))

    def __call__(self, x, k, v, mask, bias, rngs, copies: int = 1):
        """``copies``: every ``copies`` consecutive rows of ``x [b, t, hidden]`` share one row
        of ``k, v [b / copies, s, heads, head_dim]`` (the beams or samples of one encoded
        input): their queries attend together, as ``copies * t`` queries of that row."""
        b, t, _ = x.shape
        q = self.q_proj(x, rngs=rngs).reshape(b // copies, copies * t, self.heads,
                                              self.head_dim)
        out = attention(q, k, v, mask, dropout_rate=self.dropout_rate, rngs=rngs, bias=bias,
                        scale=self.scale)
        return self.out_proj(out.reshape(b, t, -1), rngs=rngs)


class _Block(nnx.Module):
    """What encoder and decoder layers share: the MLP (``fc1``/``fc2`` or gated ``fc1_0``,
    ``fc1_1``, ``fc2``, with its pre-norm ``final_layer_norm``) and the self-attention."""

    def _init_common(self, cfg: Seq2SeqConfig, rngs: nnx.Rngs):
        self.self_attn_layer_norm = _norm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs=rngs)
        h, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, std=cfg.initializer_range,
                  use_bias=cfg.use_bias)
        if cfg.mlp == "gated":
            self.fc1_0 = dense(h, m, ("embed", "mlp"), **kw)
            self.fc1_1 = dense(h, m, ("embed", "mlp"), **kw)
        else:
            self.fc1 = dense(h, m, ("embed", "mlp"), **kw)
        self.fc2 = dense(m, h, ("mlp", "embed"), **kw)
        self.final_layer_norm = _norm(cfg, rngs)
        self.gated = cfg.mlp == "gated"
        self.act = cfg.hidden_act
        self.dropout_rate = cfg.hidden_dropout
        self.activation_dropout = cfg.activation_dropout

    def _self_attention(self, x, mask, bias, cache: KVCache | None, layer: int, rngs):
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h, rngs)
        if cache is not None:
            cache, k, v = cache.update(layer, k, v)
        h = self.self_attn(h, k, v, mask, bias, rngs)
        return x + dropout(h, self.dropout_rate, rngs), cache

    def _mlp(self, x, rngs):
        act = ACTIVATIONS[self.act]
        h = self.final_layer_norm(x)
        if self.gated:
            h = act(self.fc1_0(h, rngs=rngs)) * self.fc1_1(h, rngs=rngs)
        else:
            h = act(self.fc1(h, rngs=rngs))
        h = self.fc2(dropout(h, self.activation_dropout, rngs), rngs=rngs)
        return x + dropout(h, self.dropout_rate, rngs)


class EncoderLayer(_Block):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self._init_common(cfg, rngs)

    def __call__(self, x, mask, bias, rngs):
        x, _ = self._self_attention(x, mask, bias, None, 0, rngs)
        return self._mlp(x, rngs)


class DecoderLayer(_Block):
    """Causal self-attention, cross-attention over the encoder output, the MLP; pre-norm."""

    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int, *, rngs: nnx.Rngs):
        self._init_common(cfg, rngs)
        self.encoder_attn_layer_norm = _norm(cfg, rngs)
        self.encoder_attn = Attention(cfg, rngs=rngs)
        self.layer_idx = layer_idx

    def __call__(self, x, mask, bias, cache: KVCache | None, cross_k, cross_v, cross_mask,
                 rngs, copies: int = 1):
        x, cache = self._self_attention(x, mask, bias, cache, self.layer_idx, rngs)
        h = self.encoder_attn(self.encoder_attn_layer_norm(x), cross_k, cross_v, cross_mask,
                              None, rngs, copies)
        x = x + dropout(h, self.dropout_rate, rngs)
        return self._mlp(x, rngs), cache


def _run_encoder_layer(layer: EncoderLayer, x, mask, bias, rngs):
    return layer(x, mask, bias, rngs)


def _run_decoder_layer(layer: DecoderLayer, x, mask, bias, encoded, cross_mask, rngs):
    # The cross-attention keys/values are computed inside, so remat recomputes them too.
    k, v = layer.encoder_attn.project_kv(encoded, rngs)
    return layer(x, mask, bias, None, k, v, cross_mask, rngs)[0]


# Recompute a layer's activations in the backward pass instead of storing them (training
# only: decoding has no backward pass).
_run_encoder_layer_remat = nnx.remat(_run_encoder_layer)
_run_decoder_layer_remat = nnx.remat(_run_decoder_layer)


class Stack(nnx.Module):
    """The layers of the encoder or the decoder, their final norm and, with relative
    positions, the stack's one bias table ``[buckets, heads]`` shared by all its layers."""

    def __init__(self, cfg: Seq2SeqConfig, decoder: bool, *, rngs: nnx.Rngs):
        if cfg.positions == "relative":
            self.relative_attention_bias = embedding(
                cfg.relative_attention_num_buckets, cfg.num_attention_heads, rngs=rngs,
                axes=(None, "heads"), dtype=jnp.float32, std=cfg.initializer_range,
            )
        n = cfg.num_decoder_layers if decoder else cfg.num_encoder_layers
        self.layers = nnx.List([
            DecoderLayer(cfg, i, rngs=rngs) if decoder else EncoderLayer(cfg, rngs=rngs)
            for i in range(n)
        ])
        self.layer_norm = _norm(cfg, rngs)
        self.decoder = decoder

    def position_bias(self, cfg: Seq2SeqConfig, query: jax.Array, key: jax.Array) -> jax.Array:
        """The relative-position bias ``[1, heads, t, s]`` of query positions ``[t]`` and key
        positions ``[s]``."""
        bucket = relative_position_bucket(
            key[None, :] - query[:, None], bidirectional=not self.decoder,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
        )
        table = self.relative_attention_bias.embedding[...]
        return jnp.transpose(table[bucket], (2, 0, 1))[None]


class Seq2SeqModel(nnx.Module):
    """The shared token embedding, the encoder and the decoder (HF ``PegasusModel``)."""

    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.shared = embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                                dtype=cfg.compute_dtype, std=cfg.initializer_range)
        self.encoder = Stack(cfg, False, rngs=rngs)
        self.decoder = Stack(cfg, True, rngs=rngs)


# A decoding cache stores each layer's cross-attention keys and values ``[b, s, heads,
# head_dim]`` transposed to the layouts XLA:CPU's batched matmuls in ``attention`` read them in:
# keys ``[b, heads, head_dim, s]``, values ``[b, heads, s, head_dim]``. Stored as ``attention``
# takes them, every decoding step copied all of them into those layouts.
_CROSS_K = (0, 2, 3, 1)
_CROSS_V = (0, 2, 1, 3)


@flax.struct.dataclass
class Seq2SeqCache:
    """What decoding keeps between steps: the decoder's self-attention ``KVCache`` of
    ``b * copies`` rows, and once per encoded input every decoder layer's cross-attention
    keys/values (computed once from the encoder output; ``cross`` reads a layer's, stored as
    ``_CROSS_K`` / ``_CROSS_V`` say) and the encoder's padding mask ``[b, s]``. Decoder rows
    ``i * copies`` to ``(i + 1) * copies - 1`` (an input's beams or samples) read input
    ``i``'s: one copy of them, never gathered, however the beams are reordered."""

    self_attn: KVCache
    # One array per decoder layer (a stacked array would be sliced, i.e. copied, every step).
    cross_k: tuple[jax.Array, ...]
    cross_v: tuple[jax.Array, ...]
    cross_mask: jax.Array
    # Decoder rows per encoded input (static: it shapes the cross-attention).
    copies: int = flax.struct.field(pytree_node=False, default=1)

    def cross(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """Decoder layer ``layer``'s cross-attention keys and values ``[b, s, heads,
        head_dim]``, as ``attention`` takes them (views of the stored layouts)."""
        return (jnp.transpose(self.cross_k[layer], np.argsort(_CROSS_K)),
                jnp.transpose(self.cross_v[layer], np.argsort(_CROSS_V)))

    def select(self, rows: jax.Array) -> Seq2SeqCache:
        """The cache of decoder rows ``rows [n]`` (repeats allowed). With one row per input
        (``copies == 1``) any rows: the inputs' keys/values are selected with them. With
        ``copies > 1``, ``n`` is the number of rows and each row stays among its own input's
        rows (beam search's reordering of an input's beams), so only the self-attention cache
        moves."""
        if self.copies > 1:
            return self.replace(self_attn=self.self_attn.select(rows))
        return self.replace(self_attn=self.self_attn.select(rows),
                            cross_k=tuple(k[rows] for k in self.cross_k),
                            cross_v=tuple(v[rows] for v in self.cross_v),
                            cross_mask=self.cross_mask[rows])


class Seq2SeqLM(nnx.Module):
    """An encoder-decoder with its LM head: the interface every seq2seq port implements
    (``lib.models.Seq2SeqLM``).

    ``model(input_ids [b, s], attention_mask [b, s], decoder_input_ids [b, t],
    decoder_attention_mask [b, t] | None, *, rngs)`` returns fp32 logits ``[b, t, vocab]``
    (teacher forcing; the decoder is causal and masks padding). Positions are indices, as in
    HF: pad the encoder and decoder inputs on the right. ``rngs`` turns dropout on.
    """

    config_class: ClassVar[type[Seq2SeqConfig]] = Seq2SeqConfig

    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Seq2SeqModel(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                                 rngs=rngs, use_bias=False, dtype=cfg.compute_dtype,
                                 std=cfg.initializer_range)
        if cfg.final_logits_bias:
            self.final_logits_bias = LogitsBias(jnp.zeros((cfg.vocab_size,), jnp.float32))

    # -- embeddings and head

    def _embed(self, ids: jax.Array, positions: jax.Array, slots: int) -> jax.Array:
        """Token embeddings (scaled) plus sinusoidal positions ``[t]`` from a table of
        ``slots`` rows."""
        cfg = self.config
        x = self.model.shared(ids)
        if cfg.scale_embedding:
            x = x * jnp.asarray(np.sqrt(cfg.hidden_size), x.dtype)
        if cfg.positions == "sinusoidal":
            if slots > cfg.max_position_embeddings:
                raise UserError(
                    f"{cfg.family}: {slots} positions exceed max_position_embeddings "
                    f"({cfg.max_position_embeddings}); shorten the inputs (max length)")
            table = jnp.asarray(sinusoidal_table(slots, cfg.hidden_size))
            x = x + table[positions][None].astype(x.dtype)
        return x

    def logits(self, hidden: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """The LM head: fp32 logits ``[..., vocab]`` of final decoder states."""
        cfg = self.config
        if cfg.scale_decoder_outputs:
            hidden = hidden * jnp.asarray(cfg.hidden_size**-0.5, hidden.dtype)
        if cfg.tie_word_embeddings:
            logits = tied_logits(hidden, self.model.shared)
        else:
            logits = self.lm_head(hidden, rngs=rngs)
        logits = logits.astype(jnp.float32)
        if cfg.final_logits_bias:
            logits = logits + self.final_logits_bias[...]
        return logits

    def _final(self, stack: Stack, x, rngs):
        x = stack.layer_norm(x)
        if self.config.dropout_after_final_norm:
            x = dropout(x, self.config.hidden_dropout, rngs)
        return x

    # -- the interface

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Encoder states ``[b, s, hidden]``; every position attends to the real tokens of
        its row only (``attention_mask [b, s]``)."""
        cfg = self.config
        s = input_ids.shape[1]
        stack = self.model.encoder
        positions = jnp.arange(s)
        x = dropout(self._embed(input_ids, positions, s), cfg.hidden_dropout, rngs)
        bias = stack.position_bias(cfg, positions, positions) if cfg.positions == "relative" \
            else None
        mask = attention_mask.astype(bool)[:, None, None, :]
        run = _run_encoder_layer_remat if cfg.remat else _run_encoder_layer
        for layer in stack.layers:
            x = run(layer, x, mask, bias, rngs)
        return self._final(stack, x, rngs)

    def init_cache(self, encoded: jax.Array, attention_mask: jax.Array, slots: int,
                   dtype=None, *, copies: int = 1) -> Seq2SeqCache:
        """A decoder cache with room for ``slots`` decoder tokens of ``copies`` rows per input
        (its beams or samples) and the cross-attention keys/values of every decoder layer,
        computed here once per input from ``encoded [b, s, hidden]`` (and its padding mask
        ``attention_mask [b, s]``)."""
        cfg = self.config
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        kv = [layer.encoder_attn.project_kv(encoded) for layer in self.model.decoder.layers]
        return Seq2SeqCache(
            self_attn=KVCache.init(cfg.num_decoder_layers, encoded.shape[0] * copies, slots,
                                   cfg.num_attention_heads, cfg.head_dim, dtype),
            # The barrier keeps XLA from moving the transposes back into the steps.
            cross_k=jax.lax.optimization_barrier(
                tuple(jnp.transpose(k, _CROSS_K).astype(dtype) for k, _ in kv)),
            cross_v=jax.lax.optimization_barrier(
                tuple(jnp.transpose(v, _CROSS_V).astype(dtype) for _, v in kv)),
            cross_mask=attention_mask.astype(bool),
            copies=copies,
        )

    def decode(self, decoder_input_ids: jax.Array, cache: Seq2SeqCache, *,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Seq2SeqCache]:
        """``(logits [b, t, vocab] fp32, cache)``: the tokens ``[b, t]`` are appended after
        the cache's filled slots (every row at the same position)."""
        cfg = self.config
        b, t = decoder_input_ids.shape
        self_cache, mask = cache.self_attn.add_tokens(jnp.ones((b, t), bool))
        slots = self_cache.valid.shape[1]
        positions = self_cache.index + jnp.arange(t)
        stack = self.model.decoder
        x = dropout(self._embed(decoder_input_ids, positions, slots), cfg.hidden_dropout, rngs)
        bias = stack.position_bias(cfg, positions, jnp.arange(slots)) \
            if cfg.positions == "relative" else None
        cross_mask = cache.cross_mask[:, None, None, :]
        for i, layer in enumerate(stack.layers):
            x, self_cache = layer(x, mask, bias, self_cache, *cache.cross(i), cross_mask, rngs,
                                  cache.copies)
        logits = self.logits(self._final(stack, x, rngs), rngs=rngs)
        return logits, cache.replace(self_attn=self_cache.advance(t))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Teacher-forced logits ``[b, t, vocab]`` (fp32) of ``decoder_input_ids``."""
        cfg = self.config
        encoded = self.encode(input_ids, attention_mask, rngs=rngs)
        b, t = decoder_input_ids.shape
        token_mask = (jnp.ones((b, t), bool) if decoder_attention_mask is None
                      else decoder_attention_mask.astype(bool))
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & token_mask[:, None, None, :]
        positions = jnp.arange(t)
        stack = self.model.decoder
        x = dropout(self._embed(decoder_input_ids, positions, t), cfg.hidden_dropout, rngs)
        bias = stack.position_bias(cfg, positions, positions) if cfg.positions == "relative" \
            else None
        cross_mask = attention_mask.astype(bool)[:, None, None, :]
        run = _run_decoder_layer_remat if cfg.remat else _run_decoder_layer
        for layer in stack.layers:
            x = run(layer, x, mask, bias, encoded, cross_mask, rngs)
        return self.logits(self._final(stack, x, rngs), rngs=rngs)


# ----------------------------------------------------------------------------- checkpoints


def pop_alias(state: hf.StateDict, alias: str, key: str) -> None:
    """Drop ``alias``, a stored copy of ``key`` (a tied embedding), from ``state``; a copy
    that differs from ``key`` is a UserError (the model would not be the checkpoint's)."""
    if alias not in state:
        return
    copy = state.pop(alias)
    if key not in state:
        state[key] = copy
    elif not np.array_equal(np.asarray(copy), np.asarray(state[key])):
        raise UserError(f"{alias} differs from {key}, but the model ties them (one shared "
                        "embedding)")


def stores_separate_head(state: hf.StateDict, head: str, embedding_key: str) -> bool:
    """Whether a checkpoint has its own LM head: ``head`` is stored and is not a copy of the
    shared embedding (the rule HF applies when it loads a tied family)."""
    if head not in state:
        return False
    return embedding_key not in state or not np.array_equal(np.asarray(state[head]),
                                                            np.asarray(state[embedding_key]))


def load_pretrained(
    model_cls: type[Seq2SeqLM], model_dir: str | os.PathLike, *,
    hf_to_ours: Callable[[hf.StateDict, Seq2SeqConfig], hf.StateDict],
    config_of: Callable[[dict, hf.StateDict], dict], dtype: str = "float32", **overrides: Any,
) -> tuple[Seq2SeqLM, Seq2SeqConfig]:
    """``(model, cfg)``: a ``model_cls`` with the weights of an HF directory (fp32 params,
    ``dtype`` compute). ``config_of(config.json, state)`` gives the config fields (the state
    says whether the head is tied); ``hf_to_ours(state, cfg)`` renames the checkpoint's keys to
    ours. Loading is strict (``lib.hf``); ``final_logits_bias`` (not a parameter) is set from
    the state, zeros when the checkpoint has none."""
    state = dict(hf.load_state_dict(model_dir))
    fields = config_of(hf.read_config(model_dir), state)
    cfg = model_cls.config_class.with_overrides(fields, {"dtype": dtype, **overrides})
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    try:
        state = hf_to_ours(state, cfg)
    except UserError as e:
        raise UserError(f"checkpoint {model_dir}: {e}") from None
    logits_bias = state.pop("final_logits_bias", None)
    hf.load_into(model, state, where=str(model_dir))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(var.get_value()))
    if cfg.final_logits_bias:
        value = np.zeros(cfg.vocab_size, np.float32) if logits_bias is None else \
            np.asarray(logits_bias, np.float32).reshape(-1)
        if value.shape != (cfg.vocab_size,):
            raise UserError(f"checkpoint {model_dir}: final_logits_bias has {value.size} "
                            f"entries, vocab_size is {cfg.vocab_size}")
        model.final_logits_bias.set_value(jnp.asarray(value))
    return model, cfg


def state_of(model: Seq2SeqLM) -> hf.StateDict:
    """Our parameters (HF-style names) plus ``final_logits_bias [1, vocab]`` as HF stores it."""
    state = hf.state_of(model)
    if model.config.final_logits_bias:
        state["final_logits_bias"] = np.asarray(model.final_logits_bias[...], np.float32)[None]
    return state


def export_pretrained(model: Seq2SeqLM, cfg, out_dir: str | os.PathLike, tokenizer=None,
                      ours_to_hf: hf.Transform | None = None) -> Path:
    """Write ``model`` as an HF directory (``config.json`` = ``cfg.to_hf()``, weights renamed
    by ``ours_to_hf``) that ``transformers`` loads directly."""
    state = state_of(model)
    state = ours_to_hf(state) if ours_to_hf is not None else state
    return hf.save_pretrained(state, cfg.to_hf(), out_dir, tokenizer=tokenizer)


def scratch_fields(model_cfg: Any, tokenizer: Any, max_length: int | None) -> dict:
    """Config fields of a scratch model: the sizes of ``config.model`` (``hidden_size``,
    ``num_hidden_layers`` for each stack, ``num_attention_heads``, ``intermediate_size``;
    ``dropout`` for every dropout), the vocabulary and special ids of ``tokenizer`` (the
    decoder starts at its ``bos_token_id``, else at padding as T5 does) and a position range
    of ``max_length`` + 256."""
    m = model_cfg
    pad = getattr(tokenizer, "pad_token_id", None)
    start = getattr(tokenizer, "bos_token_id", None)
    fields = dict(
        vocab_size=int(tokenizer.vocab_size), hidden_size=int(m.hidden_size),
        num_encoder_layers=int(m.num_hidden_layers), num_decoder_layers=int(m.num_hidden_layers),
        num_attention_heads=int(m.num_attention_heads),
        intermediate_size=int(m.intermediate_size), hidden_dropout=float(m.dropout),
        attention_dropout=float(m.dropout), activation_dropout=float(m.dropout),
        dtype=str(m.dtype), remat=bool(m.remat), pad_token_id=pad,
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        decoder_start_token_id=pad if start is None else start,
    )
    if max_length:
        fields["max_position_embeddings"] = int(max_length) + 256
    return fields


def seq2seq_port(name: str, model_cls: type[Seq2SeqLM], *, load: Callable, export: Callable,
                 scratch: Callable, **extra: Any):
    """The ``Port`` of an encoder-decoder family: head ``seq2seq_lm``; ``load(model_dir,
    dtype=..., remat=...)``, ``scratch(config.model, tokenizer, max_length) -> cfg``;
    ``export(model, cfg, out_dir, tokenizer)``; the checkpoint's tokenizer by
    ``lib.word_tokenizer.load_seq2seq_tokenizer`` (t5-pegasus, Randeng-Pegasus and UER's T5
    read their ``vocab.txt``); PEFT adapters of task type ``SEQ_2_SEQ_LM``."""
    from lib.models import Port
    from lib.word_tokenizer import load_seq2seq_tokenizer

    def load_head(model_dir, head, *, dtype, remat, num_labels=None, pooling=None):
        return load(model_dir, dtype=dtype, remat=remat)

    def scratch_config(model_cfg, tok, *, max_length=None, num_labels=None, pooling=None):
        return scratch(model_cfg, tok, max_length)

    peft_config = {"task_type": "SEQ_2_SEQ_LM", **extra.pop("peft_config", {})}
    return Port(
        name=name, heads=("seq2seq_lm",), load=load_head,
        create=lambda cfg, head, rngs: model_cls(cfg, rngs=rngs),
        scratch_config=scratch_config, export=export, tokenizer=load_seq2seq_tokenizer,
        peft_config=peft_config, **extra,
    )
