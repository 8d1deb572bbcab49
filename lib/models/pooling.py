"""Sentence vectors from an encoder's outputs, and the two-tower model that uses them.

Poolers (``pool(kind, ...)``): ``cls`` (the [CLS] state of the last layer), ``pooler`` (BERT's
pooler: tanh(dense([CLS]))) and ``mean`` (the mean of the last layer over real tokens; padding
never counts). ``TwoTower`` wraps an encoder built by the registry (``head="encoder"``: a
``BertModel`` with its pooler) so that each side of a pair is encoded alone, plus an optional
Sentence-Transformer classifier over ``[u; v; |u - v|]`` and an optional projection head
(SimCSE's Linear -> dropout -> L2 normalisation of the sentence vector). On an encoder with
LoRA adapters these head layers are trained whole beside the adapters; ``export_head`` writes
them next to the exported encoder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from lib import hf
from lib.errors import UserError
from lib.models import layers, lora

POOLINGS = ("cls", "pooler", "mean")


def mean_pool(states: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``states [b, t, H]`` averaged over the positions where ``mask [b, t]`` is 1."""
    weight = (jnp.ones(states.shape[:2], states.dtype) if mask is None
              else mask.astype(states.dtype))
    total = jnp.einsum("bth,bt->bh", states, weight)
    return total / jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1.0)


def pool(kind: str, states: jax.Array, pooled: jax.Array | None,
         mask: jax.Array | None) -> jax.Array:
    """The sentence vector ``[b, H]`` of ``kind`` (``POOLINGS``) from an encoder's
    ``(states, pooled)`` outputs and the attention mask."""
    if kind == "cls":
        return states[:, 0]
    if kind == "pooler":
        if pooled is None:
            raise UserError("pooling 'pooler' needs an encoder with a pooler")
        return pooled
    if kind == "mean":
        return mean_pool(states, mask)
    raise UserError(f"pooling {kind!r}: choose one of {', '.join(POOLINGS)}")


def cosine(u: jax.Array, v: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Row-wise cosine similarity of ``u, v [b, H]`` (as ``torch.cosine_similarity``)."""
    norms = jnp.maximum(jnp.linalg.norm(u, axis=-1), eps) * jnp.maximum(
        jnp.linalg.norm(v, axis=-1), eps)
    return jnp.sum(u * v, axis=-1) / norms


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of ``x`` scaled to unit L2 norm (as ``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pair_features(u: jax.Array, v: jax.Array) -> jax.Array:
    """Sentence-Transformer's classifier input ``[u; v; |u - v|]`` (``[b, 3H]``)."""
    return jnp.concatenate([u, v, jnp.abs(u - v)], axis=-1)


class TwoTower(nnx.Module):
    """One shared encoder applied to each side of a pair; ``num_labels > 0`` adds a Linear
    over ``pair_features`` (Sentence-Transformer's softmax head); ``projection > 0`` maps each
    sentence vector through Linear(projection) -> dropout(``projection_dropout``) -> L2
    normalisation (SimCSE's head)."""

    def __init__(self, encoder: nnx.Module, pooling: str, hidden_size: int, num_labels: int = 0,
                 *, projection: int = 0, projection_dropout: float = 0.0, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        if pooling not in POOLINGS:
            raise UserError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling
        if num_labels:
            self.classifier = layers.dense(3 * hidden_size, num_labels, ("embed", None),
                                           rngs=rngs, dtype=dtype)
        self.num_labels = num_labels
        if projection:
            self.projection = layers.dense(hidden_size, projection, ("embed", None),
                                           rngs=rngs, dtype=dtype)
        self.projection_size = projection
        self.projection_dropout = projection_dropout
        if lora.lora_modules(encoder):
            # The encoder learns through adapters; the head is new, so it learns whole.
            lora.train_whole(self, [n for n, on in (("classifier", num_labels),
                                                    ("projection", projection)) if on])

    def embed(self, input_ids, attention_mask, token_type_ids=None, *,
              rngs: nnx.Rngs | None = None) -> jax.Array:
        """Sentence vectors ``[b, H]`` (fp32) of one side (``[b, projection]``, unit length,
        with a projection head)."""
        states, pooled = self.encoder(input_ids, attention_mask, token_type_ids, rngs=rngs)
        vector = pool(self.pooling, states, pooled, attention_mask)
        if self.projection_size:
            vector = layers.dropout(self.projection(vector), self.projection_dropout, rngs)
            return l2_normalize(vector.astype(jnp.float32))
        return vector.astype(jnp.float32)

    def classify(self, u: jax.Array, v: jax.Array) -> jax.Array:
        """Logits ``[b, num_labels]`` of the pair vectors ``u, v``."""
        return self.classifier(pair_features(u, v)).astype(jnp.float32)

    def export_head(self, out_dir: str | os.PathLike) -> None:
        """Write what the towers add to the encoder, next to its export in ``out_dir``:
        ``sentence_head.json`` (``pooling``, ``num_labels``, ``projection``) and, with head
        layers, ``sentence_head.safetensors``: ``classifier.weight [num_labels, 3H]`` /
        ``projection.weight [projection, H]`` and their biases, as torch ``nn.Linear`` keeps
        them."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        spec = {"pooling": self.pooling, "num_labels": self.num_labels,
                "projection": self.projection_size}
        (out / "sentence_head.json").write_text(json.dumps(spec, indent=2) + "\n",
                                                encoding="utf-8")
        state = {}
        for name, on in (("classifier", self.num_labels), ("projection", self.projection_size)):
            if on:
                state.update({f"{name}.{k}": v for k, v in hf.state_of(getattr(self, name))
                              .items()})
        if state:
            hf.write_safetensors(state, out / "sentence_head.safetensors")
