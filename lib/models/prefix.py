"""p-tuning v2 (prefix tuning): learned keys/values in front of every decoder layer.

A ``Prefix`` holds keys and values ``[layers, b|1, N, kv, d]``. A decoder port that takes
``prefix=`` puts layer i's ``N`` keys/values in front of that layer's own (after the KV cache,
if any) and lets every query attend to them. As in ChatGLM2's p-tuning, no rotary embedding is
applied to the prefix and the positions of the real tokens are not shifted by it.

``PrefixEncoder`` learns the prefix the way ChatGLM's ``PrefixEncoder`` does: an embedding of
``N`` rows of width ``layers * 2 * kv * d`` (optionally followed by a tanh MLP,
``prefix_projection``), read as ``[N, layers, 2 (k, v), kv, d]``; the same layout as ChatGLM's
``past_key_values`` view, so a ChatGLM ``prefix_encoder.embedding.weight`` is the
``embedding.embedding`` table here. Its parameters are ``PrefixParam``, so
``trainable=PrefixParam`` (``lib.train.init_state``) trains the prefix and freezes the base.

``PrefixLM`` wraps a decoder and the encoder behind the decoder interface, so the trainer,
``lib.generate`` and the tasks use it like any decoder.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from lib.errors import UserError
from lib.models import layers


@flax.struct.dataclass
class Prefix:
    """p-tuning v2 prefix: keys/values ``[layers, b, N, kv, d]`` (``b`` may be 1 to share one
    prefix across the batch), prepended to every layer's attention and always attended."""

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        """``N``, the number of prefix positions."""
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        """Layer ``i``'s ``(k, v)``, each ``[b|1, N, kv, d]``."""
        return self.k[i], self.v[i]

    def extend_mask(self, mask: jax.Array) -> jax.Array:
        """An attention mask ``[..., t, s]`` with ``N`` always-True key columns in front."""
        visible = jnp.ones((*mask.shape[:-1], self.length), bool)
        return jnp.concatenate([visible, mask], axis=-1)


def prepend(
    prefix_kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One layer's prefix ``(k, v) [b|1, N, kv, d]`` in front of ``k, v [b, s, kv, d]``."""
    pk, pv = prefix_kv
    b = k.shape[0]
    pk = jnp.broadcast_to(pk, (b, *pk.shape[1:])).astype(k.dtype)
    pv = jnp.broadcast_to(pv, (b, *pv.shape[1:])).astype(v.dtype)
    return jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)


class PrefixParam(nnx.Param):
    """A parameter of the learned prefix: the only Variable type a p-tuning run trains."""


def _retype_params(module: nnx.Module) -> None:
    """Turn every ``nnx.Param`` of ``module``'s submodules into a ``PrefixParam`` (same value
    and metadata), in place."""
    for path, node in list(nnx.iter_graph(module)):
        if type(node) is nnx.Param:
            parent = module
            for key in path[:-1]:
                parent = getattr(parent, key)
            setattr(parent, path[-1], PrefixParam(node.get_value(), **node.get_metadata()))


class PrefixEncoder(nnx.Module):
    """Learned prefix of ``length`` positions for every layer of a decoder.

    ``prefix_projection=False``: the prefix is the embedding table itself. ``True``: the table
    (width ``layers * 2 * kv_heads * head_dim``) goes through ``Linear(hidden_size) -> tanh ->
    Linear`` first (ChatGLM's reparametrization). ``init_std`` defaults to 1.0, the N(0, 1) of
    a torch ``nn.Embedding`` that ChatGLM's encoder starts from. ``dropout`` applies to the
    prefix when called with ``rngs`` (ChatGLM2 uses 0.1).
    """

    def __init__(
        self,
        length: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        rngs: nnx.Rngs,
        prefix_projection: bool = False,
        hidden_size: int | None = None,
        dropout: float = 0.0,
        init_std: float = 1.0,
        dtype: jnp.dtype = jnp.float32,
    ):
        if not isinstance(length, int) or length < 1:
            raise UserError(f"prefix length must be a positive integer, got {length!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"prefix dropout must be in [0, 1), got {dropout!r}")
        if prefix_projection and not hidden_size:
            raise UserError("prefix_projection=True needs the projection's hidden_size")
        width = num_layers * 2 * kv_heads * head_dim
        self.length = length
        self.shape = (num_layers, kv_heads, head_dim)
        self.dropout_rate = float(dropout)
        self.prefix_projection = bool(prefix_projection)
        # Small next to the base model: the table stays replicated.
        self.embedding = layers.embedding(
            length, width, rngs=rngs, axes=(None, None), dtype=dtype, std=init_std
        )
        if self.prefix_projection:
            self.trans_in = layers.dense(width, hidden_size, (None, "mlp"), rngs=rngs, dtype=dtype)
            self.trans_out = layers.dense(hidden_size, width, ("mlp", None), rngs=rngs, dtype=dtype)
        _retype_params(self)

    def __call__(self, batch: int = 1, *, rngs: nnx.Rngs | None = None) -> Prefix:
        """The prefix for ``batch`` rows: ``Prefix(k, v)``, each ``[layers, batch, N, kv, d]``.

        With ``rngs`` (training) each row gets its own dropout mask."""
        x = self.embedding(jnp.arange(self.length))  # [N, layers * 2 * kv * d]
        if self.prefix_projection:
            x = self.trans_out(jnp.tanh(self.trans_in(x)))
        x = jnp.broadcast_to(x, (batch, *x.shape))
        x = layers.dropout(x, self.dropout_rate, rngs)
        num_layers, kv, d = self.shape
        x = x.reshape(batch, self.length, num_layers, 2, kv, d)
        x = x.transpose(2, 3, 0, 1, 4, 5)  # [layers, 2, b, N, kv, d]
        return Prefix(k=x[:, 0], v=x[:, 1])


class PrefixLM(nnx.Module):
    """A decoder (``base``) with a learned prefix (``prefix_encoder``), itself a decoder.

    ``model(input_ids, attention_mask=None, positions=None, cache=None, *, rngs=None)`` builds
    the prefix (dropout on it when ``rngs`` is given) and runs ``base`` with it; positions and
    the cache are the base's, untouched by the prefix. ``init_cache`` and ``config`` are the
    base's, so ``lib.generate`` decodes a PrefixLM like any decoder.
    """

    def __init__(self, base: nnx.Module, prefix_encoder: PrefixEncoder):
        self.base = base
        self.prefix_encoder = prefix_encoder

    @classmethod
    def create(
        cls,
        base: nnx.Module,
        length: int,
        *,
        rngs: nnx.Rngs,
        prefix_projection: bool = False,
        hidden_size: int | None = None,
        dropout: float = 0.0,
        init_std: float = 1.0,
    ) -> PrefixLM:
        """Wrap ``base`` (any port whose config has ``num_hidden_layers``,
        ``num_key_value_heads``, ``head_dim`` and ``hidden_size``) with a new encoder of
        ``length`` positions; the projection's ``hidden_size`` defaults to the model's."""
        cfg = base.config
        encoder = PrefixEncoder(
            length,
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            rngs=rngs,
            prefix_projection=prefix_projection,
            hidden_size=hidden_size or cfg.hidden_size,
            dropout=dropout,
            init_std=init_std,
        )
        return cls(base, encoder)

    @property
    def config(self):
        """The base decoder's config."""
        return self.base.config

    def init_cache(self, batch: int, slots: int, dtype=None):
        """The base decoder's empty KV cache (the prefix takes no slots)."""
        return self.base.init_cache(batch, slots, dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache=None,
        *,
        prefix: Prefix | None = None,
        rngs: nnx.Rngs | None = None,
        logits_at: jax.Array | None = None,
    ):
        """``(logits [b, t, vocab], cache)`` of the base decoder run with the learned prefix
        (``logits_at``: as the base's).

        ``prefix`` must be None: the learned one is the prefix (the argument exists only to
        keep the decoder interface)."""
        if prefix is not None:
            raise ValueError("a PrefixLM builds its own prefix; do not pass prefix=")
        learned = self.prefix_encoder(input_ids.shape[0], rngs=rngs)
        return self.base(input_ids, attention_mask, positions, cache, prefix=learned, rngs=rngs,
                         logits_at=logits_at)
