"""GLM decoder (HF ``GlmForCausalLM``) that also loads ChatGLM2-6B / ChatGLM3-6B checkpoints.

Architecture: pre-norm decoder blocks (RMSNorm), grouped-query attention with a bias on q/k/v
only, rotary embedding on the first ``partial_rotary_factor * head_dim`` features of each head
with *interleaved* pairs (features 2i, 2i+1), and a SwiGLU MLP whose fused ``gate_up_proj``
holds ``[gate | up]`` (gate first). The module tree mirrors HF ``glm`` names
(``model.layers.0.self_attn.q_proj``), so HF ``glm`` directories convert by the generic rule of
``lib.hf``.

THUDM's ChatGLM2/3 checkpoints (``model_type: chatglm``, read as data; their Python files are
never imported) are the same network under other names:

    transformer.embedding.word_embeddings            model.embed_tokens
    transformer.encoder.layers.N.input_layernorm     model.layers.N.input_layernorm
    ...self_attention.query_key_value (fused q|k|v)   self_attn.{q,k,v}_proj
    ...self_attention.dense                           self_attn.o_proj
    ...post_attention_layernorm                       post_attention_layernorm
    ...mlp.dense_h_to_4h (fused gate|up)              mlp.gate_up_proj
    ...mlp.dense_4h_to_h                              mlp.down_proj
    transformer.encoder.final_layernorm               model.norm
    transformer.output_layer                          lm_head
    transformer.rotary_pos_emb.inv_freq               (buffer, dropped)

ChatGLM2 rotates half of each head (``RotaryEmbedding(kv_channels // 2)``) on interleaved pairs
with base ``10000 * rope_ratio``: exactly ``partial_rotary_factor = 0.5`` here.

p-tuning v2 (``prefix``): learned keys/values ``[layers, b, N, kv, d]`` are put in front of every
layer's keys/values and are always attended. As in ChatGLM2's p-tuning, the prefix is used as
given (no rotary is applied to it) and does not shift the positions of the real tokens
(``lib.models.prefix`` holds the pytree and the learned ``PrefixEncoder`` / ``PrefixLM``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

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
    apply_rotary,
    attention,
    dense,
    embedding,
    rotary_cos_sin,
    tied_logits,
)
from lib.models.prefix import Prefix, prepend

StateDict = hf.StateDict


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class GlmConfig:
    """Architecture of a GLM decoder (defaults: ChatGLM2-6B). Frozen, so it can sit in a
    module's static graph."""

    vocab_size: int = 65024
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 28
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    bos_token_id: int | None = None
    # Compute dtype ("float32", "bfloat16"); parameters are always fp32.
    dtype: str = "float32"
    # Rematerialize each decoder layer in the backward pass (saves activation memory).
    remat: bool = False

    @property
    def rotary_dim(self) -> int:
        """How many features of each head are rotated."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf_config: dict, **overrides: Any) -> GlmConfig:
        """From an HF ``config.json`` dict, ``model_type`` ``glm`` or ``chatglm`` (ChatGLM2/3)."""
        if hf_config.get("model_type") == "chatglm":
            return cls.from_chatglm(hf_config, **overrides)
        if hf_config.get("model_type") not in (None, "glm"):
            raise UserError(
                f"config.json has model_type {hf_config.get('model_type')!r}; lib.models.glm "
                "reads 'glm' (GlmForCausalLM) and 'chatglm' (ChatGLM2/3) checkpoints"
            )
        rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UserError(
                f"config.json rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                "supported: only the default rotary embedding is implemented"
            )
        try:
            fields = cls._glm_fields(hf_config, rope)
        except KeyError as e:
            raise UserError(f"config.json lacks the key {e.args[0]!r} of a GLM model") from None
        return cls._checked(fields, overrides)

    @staticmethod
    def _glm_fields(hf_config: dict, rope: dict) -> dict:
        heads = hf_config["num_attention_heads"]
        return dict(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_hidden_layers=hf_config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
            head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
            partial_rotary_factor=rope.get(
                "partial_rotary_factor", hf_config.get("partial_rotary_factor", 0.5)
            ),
            rope_theta=rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-5),
            attention_bias=hf_config.get("attention_bias", True),
            attention_dropout=hf_config.get("attention_dropout", 0.0),
            hidden_act=hf_config.get("hidden_act", "silu"),
            max_position_embeddings=hf_config.get("max_position_embeddings", 32768),
            tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
            pad_token_id=hf_config.get("pad_token_id"),
            eos_token_id=_ids(hf_config.get("eos_token_id")),
            bos_token_id=hf_config.get("bos_token_id"),
        )

    @classmethod
    def from_chatglm(cls, cfg: dict, **overrides: Any) -> GlmConfig:
        """From THUDM's ChatGLM2/3 ``config.json`` (``num_layers``, ``ffn_hidden_size``, ...)."""
        if "multi_query_group_num" not in cfg and "padded_vocab_size" not in cfg:
            raise UserError(
                "config.json is a first-generation ChatGLM-6B (no multi_query_group_num / "
                "padded_vocab_size): its 2-D positions and post-LN blocks are a different "
                "architecture; use a ChatGLM2-6B or ChatGLM3-6B checkpoint"
            )
        # Variants of the ChatGLM code that this port does not implement.
        for key, supported in (
            ("rmsnorm", True),
            ("apply_residual_connection_post_layernorm", False),
            ("post_layer_norm", True),
            ("add_bias_linear", False),
            ("original_rope", True),
        ):
            if cfg.get(key, supported) != supported:
                raise UserError(
                    f"config.json {key}={cfg[key]!r} is not supported by lib.models.glm "
                    f"(ChatGLM2/3 use {key}={supported})"
                )
        try:
            fields = cls._chatglm_fields(cfg)
        except KeyError as e:
            raise UserError(
                f"config.json lacks the key {e.args[0]!r} of a ChatGLM2/3 model"
            ) from None
        return cls._checked(fields, overrides)

    @staticmethod
    def _chatglm_fields(cfg: dict) -> dict:
        heads = cfg["num_attention_heads"]
        groups = cfg["multi_query_group_num"] if chatglm_multi_query(cfg) else heads
        return dict(
            vocab_size=cfg["padded_vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["ffn_hidden_size"],
            num_hidden_layers=cfg["num_layers"],
            num_attention_heads=heads,
            num_key_value_heads=groups,
            head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
            partial_rotary_factor=0.5,
            # ChatGLM3-6B-32k stretches the rotary wavelengths by rope_ratio (50).
            rope_theta=10000.0 * cfg.get("rope_ratio", 1),
            rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
            attention_bias=bool(cfg.get("add_qkv_bias", False)),
            attention_dropout=cfg.get("attention_dropout", 0.0),
            max_position_embeddings=cfg.get("seq_length", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            pad_token_id=cfg.get("pad_token_id", 0),
            eos_token_id=_ids(cfg.get("eos_token_id", 2)),
        )

    @classmethod
    def _checked(cls, fields: dict, overrides: dict) -> GlmConfig:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown GLM config fields {unknown} (see lib.models.glm.GlmConfig)")
        config = cls(**{**fields, **overrides})
        if config.hidden_act not in ACTIVATIONS:
            raise UserError(f"config.json hidden_act {config.hidden_act!r} is not supported")
        if config.num_attention_heads % config.num_key_value_heads:
            raise UserError(
                f"config.json: {config.num_attention_heads} attention heads are not divisible "
                f"by {config.num_key_value_heads} key/value heads"
            )
        if config.rotary_dim % 2:
            raise UserError(f"config.json: rotary dim {config.rotary_dim} must be even")
        return config

    def to_hf(self) -> dict:
        """HF ``glm`` ``config.json`` dict (readable by transformers 4.x and 5.x)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["GlmForCausalLM"],
            "model_type": "glm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "attention_dropout": self.attention_dropout,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            # 5.x reads rope_parameters, 4.x the two top-level keys.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": eos,
            "bos_token_id": self.bos_token_id,
            "torch_dtype": "float32",
        }


def chatglm_multi_query(cfg: dict) -> bool:
    """Whether a ChatGLM2/3 ``config.json`` dict uses grouped (multi-query) attention, which
    also decides the row layout of its fused ``query_key_value``."""
    # Missing keys take the defaults of THUDM's ChatGLMConfig (released configs set them all).
    return bool(cfg.get("multi_query_attention", False))


def _ids(value):
    """Token id lists become tuples so that the config stays hashable."""
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- modules


class GlmAttention(nnx.Module):
    """Grouped-query self-attention with partial interleaved rotary embedding."""

    def __init__(self, config: GlmConfig, layer: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        hidden, d = config.hidden_size, config.head_dim
        self.layer_index = layer  # which layer of the KV cache is this one's
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d
        bias = config.attention_bias
        self.q_proj = dense(
            hidden, self.heads * d, ("embed", "heads"), use_bias=bias, dtype=dtype, rngs=rngs
        )
        self.k_proj = dense(
            hidden, self.kv_heads * d, ("embed", "kv"), use_bias=bias, dtype=dtype, rngs=rngs
        )
        self.v_proj = dense(
            hidden, self.kv_heads * d, ("embed", "kv"), use_bias=bias, dtype=dtype, rngs=rngs
        )
        self.o_proj = dense(
            self.heads * d, hidden, ("heads", "embed"), use_bias=False, dtype=dtype, rngs=rngs
        )
        self.dropout_rate = config.attention_dropout

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: KVCache | None,
        prefix_kv: tuple[jax.Array, jax.Array] | None,
        rngs: nnx.Rngs | None,
    ) -> tuple[jax.Array, KVCache | None]:
        b, t, _ = x.shape
        q = self.q_proj(x, rngs=rngs).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x, rngs=rngs).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x, rngs=rngs).reshape(b, t, self.kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin, interleaved=True)
        k = apply_rotary(k, cos, sin, interleaved=True)
        if cache is not None:
            cache, k, v = cache.update(self.layer_index, k, v)
        if prefix_kv is not None:
            k, v = prepend(prefix_kv, k, v)
        out = attention(q, k, v, mask, dropout_rate=self.dropout_rate, rngs=rngs)
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim), rngs=rngs), cache


class GlmMLP(nnx.Module):
    """SwiGLU MLP with the fused ``[gate | up]`` projection of GLM / ChatGLM."""

    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = dense(
            hidden, 2 * inter, ("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs
        )
        self.down_proj = dense(
            inter, hidden, ("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs
        )
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        gate, up = jnp.split(self.gate_up_proj(x, rngs=rngs), 2, axis=-1)
        return self.down_proj(up * self.act(gate), rngs=rngs)


class GlmDecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: GlmConfig, layer: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = GlmAttention(config, layer, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype
        )
        self.mlp = GlmMLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache, prefix_kv, rngs):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, prefix_kv, rngs)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), rngs)
        return x, cache


class GlmModel(nnx.Module):
    """Embedding, decoder layers and final norm (HF ``GlmModel``)."""

    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [GlmDecoderLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)


def _run_layer(layer, x, cos, sin, mask, cache, prefix_kv, rngs):
    return layer(x, cos, sin, mask, cache, prefix_kv, rngs)


# Recompute the layer's activations in the backward pass instead of storing them.
_run_layer_remat = nnx.remat(_run_layer)


class GlmForCausalLM(nnx.Module):
    """GLM causal LM with the shared decoder interface (see ``__call__``)."""

    def __init__(self, config: GlmConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = GlmModel(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = dense(
                config.hidden_size,
                config.vocab_size,
                ("embed", "vocab"),
                use_bias=False,
                dtype=jnp.dtype(config.dtype),
                rngs=rngs,
            )

    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        """An empty KV cache of ``slots`` positions (compute dtype unless ``dtype`` is given)."""
        c = self.config
        return KVCache.init(
            c.num_hidden_layers,
            batch,
            slots,
            c.num_key_value_heads,
            c.head_dim,
            jnp.dtype(dtype or c.dtype),
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
        """Logits ``[b, t, vocab]`` (fp32) of ``input_ids [b, t]`` and the updated cache.

        ``attention_mask [b, t]`` is 1 for real tokens, 0 for (left) padding. ``positions``
        default to the count of real tokens before each one (HF's left-padding rule), continuing
        from the cache's real tokens when a cache is given. With a ``cache`` the new tokens are
        written at its ``index`` and attend to every valid slot; without, attention is causal
        within ``input_ids``. ``prefix`` adds p-tuning v2 keys/values to every layer. ``rngs``
        turns dropout on (attention, LoRA adapters: training); None is deterministic.
        ``logits_at [b, k]`` (positions within ``t``) computes the logits of those positions
        only, ``[b, k, vocab]``.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        token_mask = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.cumsum(token_mask, axis=-1) - 1
            if cache is not None:
                positions = positions + cache.valid.sum(axis=-1, keepdims=True)
            positions = jnp.maximum(positions, 0)
        if cache is not None:
            cache, mask = cache.add_tokens(token_mask)
        else:
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None, None] & token_mask[:, None, None, :]
        if prefix is not None:
            mask = prefix.extend_mask(mask)

        cos, sin = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        run = _run_layer_remat if self.config.remat else _run_layer
        for i, layer in enumerate(self.model.layers):
            prefix_kv = None if prefix is None else prefix.layer(i)
            x, cache = run(layer, x, cos, sin, mask, cache, prefix_kv, rngs)
        x = self.model.norm(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        if self.config.tie_word_embeddings:
            logits = tied_logits(x, self.model.embed_tokens)
        else:
            logits = self.lm_head(x, rngs=rngs)
        if cache is not None:
            cache = cache.advance(t)
        return logits.astype(jnp.float32), cache


# ----------------------------------------------------------------------------- checkpoints


def glm_to_ours(state: StateDict, config: GlmConfig) -> StateDict:
    """HF ``glm`` names are ours already; a tied model has no ``lm_head``."""
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


# (ChatGLM name, ours): whole names, then names inside ``transformer.encoder.layers.N.``.
_CHATGLM_RENAMES = (
    ("transformer.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("transformer.encoder.final_layernorm.weight", "model.norm.weight"),
    ("transformer.output_layer.weight", "lm_head.weight"),
)
_CHATGLM_LAYER_RENAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.dense.weight", "self_attn.o_proj.weight"),
    ("mlp.dense_h_to_4h.weight", "mlp.gate_up_proj.weight"),
    ("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight"),
)
_CHATGLM_LAYER = "transformer.encoder.layers."
_CHATGLM_BUFFERS = ("transformer.rotary_pos_emb.inv_freq",)


def chatglm_to_ours(
    state: StateDict, config: GlmConfig, *, multi_query: bool = True
) -> StateDict:
    """Rename a ChatGLM2/3 state dict to our (HF ``glm``) names and split the fused qkv.

    ``query_key_value`` rows are ``[q (heads*d) | k (groups*d) | v (groups*d)]`` with
    multi-query attention (every released ChatGLM2/3), and per head ``[q_h | k_h | v_h]``
    without it (``multi_query=False``). Keys it does not know are passed through unchanged,
    so a strict load names them.
    """
    out: StateDict = {}
    global_names = dict(_CHATGLM_RENAMES)
    layer_names = dict(_CHATGLM_LAYER_RENAMES)
    for name, value in state.items():
        if name in _CHATGLM_BUFFERS:
            continue
        if name in global_names:
            out[global_names[name]] = value
            continue
        if name.startswith(_CHATGLM_LAYER):
            index, _, rest = name[len(_CHATGLM_LAYER) :].partition(".")
            ours = f"model.layers.{index}."
            if rest in layer_names:
                out[ours + layer_names[rest]] = value
                continue
            if rest.startswith("self_attention.query_key_value."):
                leaf = rest.rsplit(".", 1)[1]
                q, k, v = _split_qkv(np.asarray(value), config, multi_query)
                out[ours + f"self_attn.q_proj.{leaf}"] = q
                out[ours + f"self_attn.k_proj.{leaf}"] = k
                out[ours + f"self_attn.v_proj.{leaf}"] = v
                continue
        out[name] = value
    return out


def ours_to_chatglm(
    state: StateDict, config: GlmConfig, *, multi_query: bool = True
) -> StateDict:
    """Inverse of ``chatglm_to_ours`` (the dropped ``inv_freq`` buffer is not recreated)."""
    out: StateDict = {}
    global_names = {v: k for k, v in _CHATGLM_RENAMES}
    layer_names = {v: k for k, v in _CHATGLM_LAYER_RENAMES}
    fused: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, value in state.items():
        if name in global_names:
            out[global_names[name]] = value
            continue
        if name.startswith("model.layers."):
            index, _, rest = name[len("model.layers.") :].partition(".")
            theirs = f"{_CHATGLM_LAYER}{index}."
            if rest in layer_names:
                out[theirs + layer_names[rest]] = value
                continue
            proj, _, leaf = rest.rpartition(".")
            if proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                which = proj.split(".")[1][0]  # "q", "k" or "v"
                fused.setdefault((theirs, leaf), {})[which] = np.asarray(value)
                continue
        out[name] = value
    for (theirs, leaf), parts in fused.items():
        out[f"{theirs}self_attention.query_key_value.{leaf}"] = _join_qkv(
            parts["q"], parts["k"], parts["v"], config, multi_query
        )
    return out


def _split_qkv(
    value: np.ndarray, config: GlmConfig, multi_query: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, g, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if value.shape[0] != (h + 2 * g) * d:
        raise UserError(
            f"query_key_value has {value.shape[0]} rows, config.json implies (heads {h} + "
            f"2 * groups {g}) * kv_channels {d} = {(h + 2 * g) * d}"
        )
    if multi_query:
        return value[: h * d], value[h * d : (h + g) * d], value[(h + g) * d :]
    per_head = value.reshape(h, 3, d, *value.shape[1:])
    return tuple(per_head[:, i].reshape(h * d, *value.shape[1:]) for i in range(3))


def _join_qkv(q, k, v, config: GlmConfig, multi_query: bool) -> np.ndarray:
    if multi_query:
        return np.concatenate([q, k, v], axis=0)
    h, d = config.num_attention_heads, config.head_dim
    parts = [a.reshape(h, 1, d, *a.shape[1:]) for a in (q, k, v)]
    return np.concatenate(parts, axis=1).reshape(3 * h * d, *q.shape[1:])


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: str = "float32", **overrides: Any
) -> tuple[GlmForCausalLM, GlmConfig]:
    """Load an HF ``glm`` or ChatGLM2/3 directory: ``(model, config)``, fp32 params.

    The naming is detected from ``config.json``'s ``model_type``. ``overrides`` replace
    ``GlmConfig`` fields (e.g. ``remat=True``, ``attention_dropout=0.1``).
    """
    hf_config = hf.read_config(model_dir)
    config = GlmConfig.from_hf(hf_config, dtype=dtype, **overrides)
    # Build the parameter tree abstractly: random init of a 6B model is wasted work.
    model = nnx.eval_shape(lambda: GlmForCausalLM(config, rngs=nnx.Rngs(0)))
    if hf_config.get("model_type") == "chatglm":
        transform = functools.partial(
            chatglm_to_ours, config=config, multi_query=chatglm_multi_query(hf_config)
        )
    else:
        transform = functools.partial(glm_to_ours, config=config)
    hf.load_into(model, hf.load_state_dict(model_dir), transform, where=str(model_dir))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(var.get_value()))
    return model, config


def export_pretrained(
    model: GlmForCausalLM, config: GlmConfig, out_dir: str | os.PathLike, tokenizer=None
) -> Path:
    """Write ``model`` as an HF ``glm`` directory (``GlmForCausalLM.from_pretrained`` reads
    it); a ChatGLM2/3 checkpoint is exported under the HF ``glm`` names too."""
    return hf.save_pretrained(hf.state_of(model), config.to_hf(), out_dir, tokenizer=tokenizer)
