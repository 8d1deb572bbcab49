"""Qwen2 / Qwen2.5 decoder-only language model (HF ``Qwen2ForCausalLM``) in Flax NNX.

The module tree mirrors HF (``model.layers[i].self_attn.q_proj`` ...), so checkpoints convert
by the generic rule of ``lib.hf``. The only family exception is the tied LM head: with tied
embeddings we own no ``lm_head`` parameter (logits use the embedding's transpose), yet some
checkpoints still store ``lm_head.weight``.

The forward pass is the decoder interface every port implements (see ``Qwen2ForCausalLM``):
without a cache it is a causal, padding-masked pass over ``[b, t]``; with a ``KVCache`` it
appends the new tokens to the cache, which is how ``lib.generate`` prefills and decodes.
``prefix`` (p-tuning v2, ``lib.models.prefix``) puts learned keys/values in front of every
layer's, exactly as the GLM port does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

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
    embedding,
    rotary_cos_sin,
    tied_logits,
)
from lib.models.prefix import Prefix, prepend

# HF config.json keys we read; our fields have the same names. Other keys (bookkeeping,
# generation defaults, torch-only switches) are ignored; those of features we do not implement
# are checked explicitly in ``Qwen2Config.from_hf``.
_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "tie_word_embeddings",
    "max_position_embeddings",
    "hidden_act",
    "attention_dropout",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture and numerics of a Qwen2 model; defaults are Qwen2.5-0.5B.

    Frozen (hashable) because it is static metadata of the NNX module and so part of the jit
    cache key. ``dtype`` is the compute dtype; parameters are always fp32.
    """

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    # None becomes hidden_size // num_attention_heads, as in HF when config.json has none.
    head_dim: int | None = None
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: str = "float32"
    remat: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(
                f"Qwen2 hidden_act {self.hidden_act!r} is not supported; "
                f"use one of {sorted(ACTIVATIONS)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"Qwen2 num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        try:
            # Stored by name: a string is hashable and JSON-friendly whatever was passed.
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        except TypeError:
            raise UserError(
                f"Qwen2 dtype {self.dtype!r} is not a dtype name (use float32 or bfloat16)"
            ) from None

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a numpy dtype object."""
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, hf_config: dict, **overrides: Any) -> Qwen2Config:
        """Build from an HF ``config.json`` dict; ``overrides`` replace fields by our names.

        Sliding-window keys are accepted when the window is off (as in every Qwen2.5
        release); features we do not implement raise a UserError naming the key.
        """
        if hf_config.get("use_sliding_window"):
            raise UserError(
                "Qwen2 config.json sets use_sliding_window: true; sliding-window attention is "
                "not implemented (set it to false to use full attention in every layer)"
            )
        layer_types = hf_config.get("layer_types") or []
        if any(kind != "full_attention" for kind in layer_types):
            raise UserError(
                f"Qwen2 config.json layer_types {sorted(set(layer_types))}: only "
                "'full_attention' is implemented"
            )
        if hf_config.get("rope_scaling") is not None:
            raise UserError(
                f"Qwen2 config.json rope_scaling {hf_config['rope_scaling']!r}: RoPE scaling "
                "is not implemented (set rope_scaling to null)"
            )
        # transformers 5 writes rope_parameters; older releases write rope_theta.
        rope = hf_config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise UserError(
                f"Qwen2 config.json rope_parameters.rope_type {rope['rope_type']!r}: only "
                "'default' RoPE is implemented"
            )
        kwargs: dict[str, Any] = {key: hf_config[key] for key in _HF_KEYS if key in hf_config}
        # Where config.json is silent, transformers' defaults apply (not Qwen2.5-0.5B's).
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs["rope_theta"] = float(rope.get("rope_theta", hf_config.get("rope_theta", 1e4)))
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get(
                "num_attention_heads", cls.num_attention_heads
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UserError(
                f"unknown Qwen2 config override(s) {unknown}; known fields: {sorted(fields)}"
            )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The ``config.json`` dict transformers needs to rebuild this model (fp32 weights)."""
        out = {key: getattr(self, key) for key in _HF_KEYS}
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        out.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
            rope_theta=self.rope_theta,
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            use_sliding_window=False,
            use_cache=True,
            dtype="float32",
            torch_dtype="float32",
        )
        return out


# ----------------------------------------------------------------------------- modules


class Qwen2Attention(nnx.Module):
    """GQA self-attention with rotary positions; q/k/v have a bias, o_proj does not."""

    def __init__(self, cfg: Qwen2Config, layer_idx: int, *, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, std=cfg.initializer_range)
        self.q_proj = dense(h, cfg.num_attention_heads * d, ("embed", "heads"), **kw)
        self.k_proj = dense(h, cfg.num_key_value_heads * d, ("embed", "kv"), **kw)
        self.v_proj = dense(h, cfg.num_key_value_heads * d, ("embed", "kv"), **kw)
        self.o_proj = dense(
            cfg.num_attention_heads * d, h, ("heads", "embed"), use_bias=False, **kw
        )
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = d
        self.dropout_rate = cfg.attention_dropout

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, rngs, prefix_kv=None):
        b, t, _ = x.shape
        q = self.q_proj(x, rngs=rngs).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, rngs=rngs).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, rngs=rngs).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            cache, k, v = cache.update(self.layer_idx, k, v)
        if prefix_kv is not None:
            k, v = prepend(prefix_kv, k, v)
        out = attention(q, k, v, mask, dropout_rate=self.dropout_rate, rngs=rngs)
        out = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), rngs=rngs)
        return out, cache


class Qwen2MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``, no biases."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=cfg.compute_dtype, std=cfg.initializer_range, use_bias=False)
        self.gate_proj = dense(h, m, ("embed", "mlp"), **kw)
        self.up_proj = dense(h, m, ("embed", "mlp"), **kw)
        self.down_proj = dense(m, h, ("mlp", "embed"), **kw)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        gate = ACTIVATIONS[self.act](self.gate_proj(x, rngs=rngs))
        return self.down_proj(gate * self.up_proj(x, rngs=rngs), rngs=rngs)


class Qwen2DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: Qwen2Config, layer_idx: int, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        self.self_attn = Qwen2Attention(cfg, layer_idx, rngs=rngs)
        self.mlp = Qwen2MLP(cfg, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, rngs, prefix_kv=None):
        attn, cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, cache, rngs, prefix_kv
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), rngs)
        return x, cache


def _layer_without_cache(layer: Qwen2DecoderLayer, x, cos, sin, mask, rngs, prefix_kv=None):
    return layer(x, cos, sin, mask, None, rngs, prefix_kv)[0]


# Recomputes each layer's activations in the backward pass instead of storing them.
_remat_layer = nnx.remat(_layer_without_cache)


class Qwen2Model(nnx.Module):
    """Embedding, decoder layers and the final norm (HF ``Qwen2Model``)."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.embed_tokens = embedding(
            cfg.vocab_size,
            cfg.hidden_size,
            rngs=rngs,
            dtype=cfg.compute_dtype,
            std=cfg.initializer_range,
        )
        self.layers = nnx.List(
            [Qwen2DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.compute_dtype)


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 causal LM implementing the decoder interface shared by every decoder port.

    ``model(input_ids [b, t], attention_mask [b, t] | None, positions [b, t] | None, cache)``
    returns ``(logits [b, t, vocab] fp32, cache)``. Without a cache the pass is causal and
    masks padding; ``positions`` default to ``cumsum(mask) - 1`` (clipped at 0) so that left
    padding gives the positions HF ``generate`` uses. With a cache, the new tokens are
    appended after the cache's filled slots and positions continue from the number of real
    tokens already cached. ``prefix`` (a ``Prefix``, keys/values ``[layers, b|1, N, kv, d]``)
    is put in front of every layer's keys/values and always attended; it gets no rotary and
    does not shift the positions. ``rngs`` turns dropout on (attention, LoRA adapters).
    ``logits_at [b, k]`` (positions within ``t``) computes the logits of those positions only,
    ``[b, k, vocab]``: a loss on the answer tokens skips the LM head of the rest.
    """

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Qwen2Model(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                rngs=rngs,
                use_bias=False,
                dtype=cfg.compute_dtype,
                std=cfg.initializer_range,
            )

    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``slots`` tokens."""
        cfg = self.config
        return KVCache.init(
            cfg.num_hidden_layers,
            batch,
            slots,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype or cfg.compute_dtype,
        )

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
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            prefix_kv = None if prefix is None else prefix.layer(i)
            if cache is not None:
                x, cache = layer(x, cos, sin, mask, cache, rngs, prefix_kv)
            elif cfg.remat:
                x = _remat_layer(layer, x, cos, sin, mask, rngs, prefix_kv)
            else:
                x = _layer_without_cache(layer, x, cos, sin, mask, rngs, prefix_kv)
        x = self.model.norm(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        if cfg.tie_word_embeddings:
            logits = tied_logits(x, self.model.embed_tokens)
        else:
            logits = self.lm_head(x, rngs=rngs)
        if cache is not None:
            cache = cache.advance(t)
        return logits.astype(jnp.float32), cache


# ----------------------------------------------------------------------------- checkpoints


def hf_to_ours(state: hf.StateDict, cfg: Qwen2Config) -> hf.StateDict:
    """HF names -> our HF-style names: only the tied LM head needs care.

    With tied embeddings some checkpoints still store ``lm_head.weight`` (a copy of the
    embedding); we own no such parameter, so it is dropped.
    """
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def ours_to_hf(state: hf.StateDict, cfg: Qwen2Config) -> hf.StateDict:
    """Our HF-style names -> what transformers expects; tied models store no ``lm_head``
    (transformers re-ties it to ``model.embed_tokens.weight`` on load)."""
    del cfg
    return state


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: str = "float32", **overrides: Any
) -> tuple[Qwen2ForCausalLM, Qwen2Config]:
    """Load an HF Qwen2 directory: ``(model, cfg)`` with fp32 params and ``dtype`` compute.

    ``overrides`` replace config fields by our names (e.g. ``remat=True``).
    """
    cfg = Qwen2Config.from_hf(hf.read_config(model_dir), dtype=dtype, **overrides)
    # Build the parameter tree abstractly: random init of a large model is wasted work.
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    hf.load_into(
        model,
        hf.load_state_dict(model_dir),
        functools.partial(hf_to_ours, cfg=cfg),
        where=str(model_dir),
    )
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(var.get_value()))
    return model, cfg


def export_pretrained(
    model: Qwen2ForCausalLM, cfg: Qwen2Config, out_dir: str | os.PathLike, tokenizer=None
) -> Path:
    """Write ``model`` as an HF Qwen2 directory that ``transformers`` loads directly."""
    state = hf.state_of(model, functools.partial(ours_to_hf, cfg=cfg))
    return hf.save_pretrained(state, cfg.to_hf(), out_dir, tokenizer=tokenizer)
