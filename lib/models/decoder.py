"""The one decoder-only transformer: every causal-LM port (Qwen2, Llama, GLM/ChatGLM2/3, GPT-2)
is a ``DecoderConfig`` plus a weight-name map.

What a config chooses:

- attention: grouped-query (``num_key_value_heads`` from 1 = multi-query to ``heads``), q/k/v as
  separate projections or one fused ``qkv_proj`` (rows ``[q | k | v]``), optional biases on
  q/k/v (``attention_bias``) and on the output (``o_bias``);
- positions: rotary on the first ``partial_rotary_factor`` of each head, on halves
  (``rotate_half``, Llama/Qwen2) or interleaved pairs (GLM), or a learned absolute table
  (``position_embedding="learned"``, GPT-2);
- the MLP: SwiGLU with separate ``gate_proj``/``up_proj`` (``"gated"``), with GLM's fused
  ``gate_up_proj`` holding ``[gate | up]`` (``"gated_fused"``), or ``up -> act -> down``
  (``"plain"``, GPT-2), with or without biases;
- RMSNorm or LayerNorm, pre-norm blocks, a final norm, and a tied or separate LM head.

The module tree uses the Llama/Qwen2 HF names (``model.layers.N.self_attn.q_proj``), so those
checkpoints convert by ``lib.hf``'s generic rule; other families rename in their port.

``CausalLM.__call__`` is the decoder interface (``lib.models.DecoderLM``): without a cache a
causal, padding-masked pass over ``[b, t]``; with a ``KVCache`` the new tokens are appended to it
(how ``lib.generate`` prefills and decodes). ``prefix`` (p-tuning v2, ``lib.models.prefix``)
puts learned keys/values in front of every layer's; ``logits_at`` computes the LM head at the
given positions only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lib import hf
from lib.errors import UserError
from lib.models.layers import (
    ACTIVATIONS,
    KVCache,
    RMSNorm,
    apply_rotary,
    attention,
    dense,
    dropout,
    embedding,
    layer_norm,
    rotary_cos_sin,
    tied_logits,
)
from lib.models.prefix import Prefix, prepend

_CHOICES = {
    "position_embedding": ("rotary", "learned"),
    "mlp": ("gated", "gated_fused", "plain"),
    "norm": ("rms", "layer"),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture and numerics of a decoder. Frozen (hashable): it is static metadata of the
    module and part of the jit cache key. ``dtype`` is the compute dtype; params are fp32.
    A family subclasses it with its own defaults and its ``config.json`` mapping."""

    family: ClassVar[str] = "decoder"
    # lib.generate decodes a decoder-only model (no encoder, no decoder start token).
    is_encoder_decoder: ClassVar[bool] = False

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    # None: as many as attention heads (multi-head attention).
    num_key_value_heads: int | None = None
    # None: hidden_size // num_attention_heads.
    head_dim: int | None = None
    position_embedding: str = "rotary"
    rotary_interleaved: bool = False
    partial_rotary_factor: float = 1.0
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    fused_qkv: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    mlp: str = "gated"
    mlp_bias: bool = False
    norm: str = "rms"
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    # Dropout on the attention and MLP outputs (GPT-2's resid_pdrop) and on the embeddings.
    hidden_dropout: float = 0.0
    embedding_dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: str = "float32"
    # Recompute each layer's activations in the backward pass instead of storing them.
    remat: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __init_subclass__(cls, defaults: dict[str, Any] | None = None, **kwargs: Any):
        """A family's config, ``class Qwen2Config(DecoderConfig, defaults={...})``, redeclares
        those fields with the family's defaults (then ``@dataclasses.dataclass`` as usual)."""
        super().__init_subclass__(**kwargs)
        types = {f.name: f.type for f in dataclasses.fields(DecoderConfig)}
        own = cls.__dict__.get("__annotations__", {})
        cls.__annotations__ = {**{key: types[key] for key in defaults or {}}, **own}
        for key, value in (defaults or {}).items():
            setattr(cls, key, value)

    def __post_init__(self):
        name = self.family
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"{name} {key} {getattr(self, key)!r}: choose one of {allowed}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"{name} hidden_act {self.hidden_act!r} is not supported; use one "
                            f"of {sorted(ACTIVATIONS)}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"{name} num_attention_heads ({self.num_attention_heads}) must be a "
                            f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        try:
            # Stored by name: a string is hashable and JSON-friendly whatever was passed.
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        except TypeError:
            raise UserError(f"{name} dtype {self.dtype!r} is not a dtype name (use float32 or "
                            "bfloat16)") from None

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a numpy dtype object."""
        return jnp.dtype(self.dtype)

    @property
    def rotary_dim(self) -> int:
        """How many features of each head are rotated."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def with_overrides(cls, fields: dict, overrides: dict) -> DecoderConfig:
        """``cls(**fields, **overrides)``; an override that is not a field is a UserError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown {cls.family} config override(s) {unknown}; known fields: "
                            f"{sorted(known)}")
        cfg = cls(**{**fields, **overrides})
        if cfg.position_embedding == "rotary" and cfg.rotary_dim % 2:
            raise UserError(f"{cls.family} config.json: rotary dim {cfg.rotary_dim} must be even")
        return cfg


def hf_keys(hf_config: dict, renames: dict[str, str]) -> dict:
    """The ``config.json`` values of ``renames`` (HF key -> our field) that are present."""
    return {ours: hf_config[key] for key, ours in renames.items() if key in hf_config}


def ids(value):
    """Token id lists become tuples so that a config stays hashable."""
    return tuple(value) if isinstance(value, list) else value


def hf_ids(cfg: DecoderConfig) -> dict:
    """The special-token ids of a config as ``config.json`` writes them."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos,
            "pad_token_id": cfg.pad_token_id}


# ----------------------------------------------------------------------------- modules


def _norm(cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.norm == "layer":
        return layer_norm(cfg.hidden_size, cfg.norm_eps, rngs=rngs, dtype=cfg.compute_dtype)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=cfg.compute_dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with the config's projections and rotary embedding."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        q_out, kv_out = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, std=cfg.initializer_range)
        if cfg.fused_qkv:
            self.qkv_proj = dense(h, q_out + 2 * kv_out, ("embed", "heads"),
                                  use_bias=cfg.attention_bias, **kw)
        else:
            self.q_proj = dense(h, q_out, ("embed", "heads"), use_bias=cfg.attention_bias, **kw)
            self.k_proj = dense(h, kv_out, ("embed", "kv"), use_bias=cfg.attention_bias, **kw)
            self.v_proj = dense(h, kv_out, ("embed", "kv"), use_bias=cfg.attention_bias, **kw)
        self.o_proj = dense(q_out, h, ("heads", "embed"), use_bias=cfg.o_bias, **kw)
        self.fused = cfg.fused_qkv
        self.layer_idx = layer_idx
        self.shape = (cfg.num_attention_heads, cfg.num_key_value_heads, d)
        self.interleaved = cfg.rotary_interleaved
        self.dropout_rate = cfg.attention_dropout

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, prefix_kv, rngs):
        b, t, _ = x.shape
        heads, kv_heads, d = self.shape
        if self.fused:
            qkv = self.qkv_proj(x, rngs=rngs)
            q, k, v = jnp.split(qkv, [heads * d, (heads + kv_heads) * d], axis=-1)
        else:
            q, k, v = (p(x, rngs=rngs) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(b, t, heads, d)
        k = k.reshape(b, t, kv_heads, d)
        v = v.reshape(b, t, kv_heads, d)
        if cos is not None:
            q = apply_rotary(q, cos, sin, interleaved=self.interleaved)
            k = apply_rotary(k, cos, sin, interleaved=self.interleaved)
        if cache is not None:
            cache, k, v = cache.update(self.layer_idx, k, v)
        if prefix_kv is not None:
            k, v = prepend(prefix_kv, k, v)
        out = attention(q, k, v, mask, dropout_rate=self.dropout_rate, rngs=rngs)
        return self.o_proj(out.reshape(b, t, heads * d), rngs=rngs), cache


class MLP(nnx.Module):
    """SwiGLU (``down(act(gate) * up)``, separate or fused ``[gate | up]``) or plain
    ``down(act(up))``."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, std=cfg.initializer_range,
                  use_bias=cfg.mlp_bias)
        if cfg.mlp == "gated":
            self.gate_proj = dense(h, m, ("embed", "mlp"), **kw)
            self.up_proj = dense(h, m, ("embed", "mlp"), **kw)
        elif cfg.mlp == "gated_fused":
            self.gate_up_proj = dense(h, 2 * m, ("embed", "mlp"), **kw)
        else:
            self.up_proj = dense(h, m, ("embed", "mlp"), **kw)
        self.down_proj = dense(m, h, ("mlp", "embed"), **kw)
        self.kind = cfg.mlp
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        act = ACTIVATIONS[self.act]
        if self.kind == "gated":
            h = act(self.gate_proj(x, rngs=rngs)) * self.up_proj(x, rngs=rngs)
        elif self.kind == "gated_fused":
            gate, up = jnp.split(self.gate_up_proj(x, rngs=rngs), 2, axis=-1)
            h = act(gate) * up
        else:
            h = act(self.up_proj(x, rngs=rngs))
        return self.down_proj(h, rngs=rngs)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, rngs: nnx.Rngs):
        self.input_layernorm = _norm(cfg, rngs)
        self.self_attn = Attention(cfg, layer_idx, rngs=rngs)
        self.post_attention_layernorm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dropout_rate = cfg.hidden_dropout

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, prefix_kv, rngs):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, prefix_kv, rngs)
        x = x + dropout(h, self.dropout_rate, rngs)
        h = self.mlp(self.post_attention_layernorm(x), rngs)
        return x + dropout(h, self.dropout_rate, rngs), cache


def _run_layer(layer: DecoderLayer, x, cos, sin, mask, prefix_kv, rngs):
    return layer(x, cos, sin, mask, None, prefix_kv, rngs)[0]


# Recomputes a layer's activations in the backward pass instead of storing them (no cache:
# decoding has no backward pass).
_run_layer_remat = nnx.remat(_run_layer)


class DecoderModel(nnx.Module):
    """Embeddings, decoder layers and the final norm (HF ``LlamaModel`` and kin)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, std=cfg.initializer_range)
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        if cfg.position_embedding == "learned":
            self.embed_positions = embedding(
                cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"), **kw
            )
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = _norm(cfg, rngs)


class CausalLM(nnx.Module):
    """A decoder with its LM head: the decoder interface every causal-LM port implements.

    ``model(input_ids [b, t], attention_mask [b, t] | None, positions [b, t] | None, cache,
    *, prefix, rngs, logits_at)`` returns ``(logits fp32, cache)``. Without a cache the pass is
    causal and masks padding; ``positions`` default to ``cumsum(mask) - 1`` (clipped at 0), so
    left padding gets the positions HF ``generate`` uses. With a cache the new tokens are written
    after its filled slots and positions continue from the real tokens already cached.
    ``prefix`` (a ``Prefix``, keys/values ``[layers, b|1, N, kv, d]``) goes in front of every
    layer's keys/values, always attended, without rotary and without shifting positions.
    ``rngs`` turns dropout on (training). ``logits_at [b, k]`` (positions within ``t``) gives
    the logits of those positions only, ``[b, k, vocab]``.
    """

    config_class: ClassVar[type[DecoderConfig]] = DecoderConfig

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = DecoderModel(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                                 rngs=rngs, use_bias=False, dtype=cfg.compute_dtype,
                                 std=cfg.initializer_range)

    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``slots`` tokens."""
        c = self.config
        return KVCache.init(c.num_hidden_layers, batch, slots, c.num_key_value_heads,
                            c.head_dim, jnp.dtype(dtype or c.compute_dtype))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        prefix: Prefix | None = None,
        rngs: nnx.Rngs | None = None,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits ``[b, t, vocab]`` (fp32) and the updated cache (None without one)."""
        x, cache = self.hidden_states(input_ids, attention_mask, positions, cache,
                                      prefix=prefix, rngs=rngs)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        return self.logits(x, rngs=rngs), cache

    def logits(self, hidden: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """The LM head: fp32 logits ``[..., vocab]`` of final hidden states ``[..., hidden]``."""
        if self.config.tie_word_embeddings:
            logits = tied_logits(hidden, self.model.embed_tokens)
        else:
            logits = self.lm_head(hidden, rngs=rngs)
        return logits.astype(jnp.float32)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        prefix: Prefix | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The final hidden states ``[b, t, hidden]`` (after the last norm: what the LM head
        and a value head read) and the updated cache; arguments as ``__call__``."""
        cfg = self.config
        b, t = input_ids.shape
        token_mask = (
            jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        )
        if positions is None:
            positions = jnp.cumsum(token_mask, axis=-1, dtype=jnp.int32) - 1
            if cache is not None:
                positions = positions + jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)[:, None]
            positions = jnp.maximum(positions, 0)
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None, None] & token_mask[:, None, None, :]
        else:
            cache, mask = cache.add_tokens(token_mask)
        if prefix is not None:
            mask = prefix.extend_mask(mask)

        x = self.model.embed_tokens(input_ids)
        cos = sin = None
        if cfg.position_embedding == "learned":
            x = x + self.model.embed_positions(positions)
        else:
            cos, sin = rotary_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta)
        x = dropout(x, cfg.embedding_dropout, rngs)
        for i, layer in enumerate(self.model.layers):
            prefix_kv = None if prefix is None else prefix.layer(i)
            if cache is not None:
                x, cache = layer(x, cos, sin, mask, cache, prefix_kv, rngs)
            elif cfg.remat:
                x = _run_layer_remat(layer, x, cos, sin, mask, prefix_kv, rngs)
            else:
                x = _run_layer(layer, x, cos, sin, mask, prefix_kv, rngs)
        x = self.model.norm(x)
        if cache is not None:
            cache = cache.advance(t)
        return x, cache


# ----------------------------------------------------------------------------- checkpoints


def drop_tied_head(state: hf.StateDict, cfg: DecoderConfig) -> hf.StateDict:
    """A tied model owns no ``lm_head``; some tied checkpoints still store a copy of the
    embedding there, which is dropped."""
    state = dict(state)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_pretrained(
    model_cls: type[CausalLM], model_dir: str | os.PathLike, *, dtype: str = "float32",
    hf_to_ours: Callable[[hf.StateDict, Any], hf.StateDict] | None = None, **overrides: Any,
) -> tuple[CausalLM, DecoderConfig]:
    """``(model, cfg)``: a ``model_cls`` with the config (``model_cls.config_class.from_hf``,
    ``overrides`` by our field names) and the weights of an HF directory, fp32 params and
    ``dtype`` compute. ``hf_to_ours(state, cfg)`` renames the checkpoint's keys to ours
    (default: ours already, less a tied ``lm_head``); loading is strict (``lib.hf``)."""
    hf_config = hf.read_config(model_dir)
    cfg = model_cls.config_class.from_hf(hf_config, dtype=dtype, **overrides)
    # Build the parameter tree abstractly: random init of a large model is wasted work.
    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    rename = hf_to_ours or drop_tied_head
    hf.load_into(model, hf.load_state_dict(model_dir), lambda state: rename(state, cfg),
                 where=str(model_dir))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(var.get_value()))
    return model, cfg


def export_pretrained(
    model: CausalLM, cfg: DecoderConfig, out_dir: str | os.PathLike, tokenizer=None,
    ours_to_hf: hf.Transform | None = None,
) -> Path:
    """Write ``model`` as an HF directory (``config.json`` = ``cfg.to_hf()``, weights renamed
    by ``ours_to_hf``) that ``transformers`` loads directly."""
    return hf.save_pretrained(hf.state_of(model, ours_to_hf), cfg.to_hf(), out_dir,
                              tokenizer=tokenizer)


def scratch(cls: type[DecoderConfig], model_cfg: Any, tokenizer: Any, *,
            max_length: int | None = None, **fields: Any) -> DecoderConfig:
    """A config of ``cls`` for training from scratch: the sizes of ``config.model``
    (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size``; ``dropout`` for attention), the vocabulary and special ids of
    ``tokenizer``, a tied head, and a position range of ``max_length`` + 256; ``fields``
    override the rest."""
    m = model_cfg
    sizes = dict(
        vocab_size=int(tokenizer.vocab_size), hidden_size=int(m.hidden_size),
        num_hidden_layers=int(m.num_hidden_layers),
        num_attention_heads=int(m.num_attention_heads),
        num_key_value_heads=int(m.num_key_value_heads),
        intermediate_size=int(m.intermediate_size), attention_dropout=float(m.dropout),
        tie_word_embeddings=True, rope_theta=10000.0, dtype=str(m.dtype), remat=bool(m.remat),
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )
    if max_length:
        sizes["max_position_embeddings"] = int(max_length) + 256
    return cls.with_overrides(sizes, fields)

