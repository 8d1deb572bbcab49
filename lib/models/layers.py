"""Building blocks shared by every model port: dense, embedding, norms, dropout, attention, rotary.

Every parameter is created in fp32 (``param_dtype``) with *logical* axis names attached as
metadata (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv``, ``layers``); ``lib.sharding`` maps
those names to mesh axes. Variables are created unsharded (no eager sharding) and placed on
the mesh afterwards, so the same module code runs on one CPU or a TPU slice.

Dropout is driven by an ``nnx.Rngs`` passed at call time: ``rngs=None`` means deterministic
(evaluation). Passing the generator explicitly keeps the train step a pure function of
``(params, batch, rng)``.
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Partitioning metadata is applied by lib.sharding after construction, never eagerly.
nnx.use_eager_sharding(False)

Axes = tuple[str | None, ...]


def normal_init(std: float, axes: Axes):
    """A normal(0, std) initializer that tags the parameter with logical axis names."""
    return nnx.with_partitioning(nnx.initializers.normal(std), axes)


@jax.custom_vjp
def _project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _project_fwd(x, kernel):
    return _project(x, kernel), (x, kernel)


def _project_bwd(res, dy):
    # The same two products as autodiff's, but the kernel gradient contracts the batch
    # dimensions of x and dy, and one of the two must be transposed for the matmul kernel.
    # Autodiff leaves the choice to XLA, which on CPU often transposes the larger one and
    # recomputes the elementwise ops fused into it (the GELU, the dropout mask) in transposed
    # order: a fifth of a BERT train step. Transposing the narrower of the two is cheapest.
    x, kernel = res
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    batch = tuple(range(x.ndim - 1))
    if kernel.shape[0] <= kernel.shape[1]:
        dkernel = jax.lax.dot_general(x, dy, ((batch, batch), ((), ())))
    else:
        dkernel = jax.lax.dot_general(dy, x, ((batch, batch), ((), ()))).T
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def tied_logits(x: jax.Array, embedding: nnx.Embed) -> jax.Array:
    """``x @ table.T`` of a tied input embedding (``nnx.Embed.attend``), with ``_project``'s
    backward: the table's gradient then transposes the small ``x`` and the ``[H, V]`` result,
    never the ``[tokens, V]`` logits gradient (a tenth of a small LM's train step on CPU)."""
    table = embedding.embedding[...]
    dtype = embedding.dtype or jnp.result_type(x, table)
    return _project(x.astype(dtype), table.astype(dtype).T)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    """``lax.dot_general`` for ``nnx.Linear``; its ``x @ kernel`` case takes ``_project``."""
    linear = (((lhs.ndim - 1,), (0,)), ((), ()))
    plain = precision is None and all(v is None for v in kwargs.values())
    if plain and rhs.ndim == 2 and lhs.dtype == rhs.dtype and _dims(dimension_numbers) == linear:
        return _project(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def _dims(dimension_numbers) -> tuple:
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


class Dense(nnx.Linear):
    """``nnx.Linear`` whose call also takes ``rngs``, which it ignores.

    The ports pass ``rngs`` to every projection so that a layer swapped for a
    ``lora.LoRALinear`` (which applies adapter dropout) gets it; a plain projection has no
    dropout of its own. The parameter paths (``kernel``, ``bias``) are those of ``nnx.Linear``.
    """

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``x @ kernel + bias``."""
        del rngs
        return super().__call__(x)


def dense(
    in_features: int,
    out_features: int,
    axes: Axes,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype: jnp.dtype = jnp.float32,
    std: float = 0.02,
) -> Dense:
    """A ``Dense`` layer (fp32 params, ``dtype`` compute) whose kernel has logical ``axes``.

    The kernel is ``[in, out]``: the transpose of a torch ``nn.Linear.weight``.
    """
    return Dense(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=normal_init(std, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[-1],)),
        dot_general=_dense_dot_general,
        rngs=rngs,
    )


def embedding(
    num: int,
    features: int,
    *,
    rngs: nnx.Rngs,
    axes: Axes = ("vocab", "embed"),
    dtype: jnp.dtype = jnp.float32,
    std: float = 0.02,
) -> nnx.Embed:
    """An embedding table ``[num, features]`` with logical axes."""
    return nnx.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=normal_init(std, axes),
        rngs=rngs,
    )


def layer_norm(
    features: int, eps: float, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32
) -> nnx.LayerNorm:
    """LayerNorm over the last axis (``scale`` and ``bias`` tagged ``embed``)."""
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in fp32, as the Llama-family HF models do."""

    def __init__(self, features: int, eps: float, *, dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), out_sharding=("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before applying the weight.
        return (self.scale[...] * x32.astype(x.dtype)).astype(self.dtype)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout; the identity when ``rngs`` is None (evaluation) or ``rate`` is 0."""
    if rngs is None or rate == 0.0:
        return x
    key = rngs.dropout()
    if x.size >= 2**32:  # beyond the hash's index range
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    else:
        threshold = min(round((1.0 - rate) * 2**32), 2**32 - 1)
        keep = _dropout_bits(key, x.shape) < jnp.uint32(threshold)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _hash32(x: jax.Array) -> jax.Array:
    # "lowbias32" integer finalizer: a bijection of uint32 with near-ideal avalanche.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _dropout_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint32 bits of a dropout mask: a keyed hash of each element's flat index.

    ``jax.random`` bits (threefry) run as a rolled loop on CPU and XLA keeps their raw output
    alive for the backward pass: about a fifth of a BERT train step. The hash is a few integer
    ops that XLA fuses into the ops using the mask (also where it recomputes the mask in the
    backward pass), and it depends only on the global index, so the mask is the same however
    the array is sharded.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
        stride *= shape[dim]
    return _hash32(_hash32(index ^ seed[0]) + seed[1])


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query support.

    Shapes: ``q [b, t, h, d]``, ``k, v [b, s, kv, d]`` with ``h % kv == 0`` (``kv == h`` is
    ordinary multi-head attention, ``kv == 1`` multi-query). ``mask`` is boolean, True where a
    query may attend, broadcastable to ``[b, h, t, s]``. ``bias [b | 1, h, t, s]`` is added to
    the fp32 scores (T5's relative positions); ``scale`` multiplies ``q`` (default
    ``1 / sqrt(d)``; T5 uses 1). Softmax runs in fp32; the result has ``q``'s dtype and shape
    ``[b, t, h, d]``.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    groups = h // kv
    q = q.reshape(b, t, kv, groups, d)
    if scale is None:
        scale = 1.0 / jnp.sqrt(jnp.float32(d)).astype(q.dtype)
    logits = jnp.einsum("btkgd,bskd->bkgts", q * scale, k).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32).reshape(-1, kv, groups, t, logits.shape[-1])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, t, mask.shape[-1])).reshape(b, kv, groups, t, -1)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = dropout(probs, dropout_rate, rngs)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def rotary_cos_sin(
    positions: jax.Array, dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[b, t, dim // 2]`` for integer ``positions [b, t]`` (fp32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool = False
) -> jax.Array:
    """Rotate the first ``2 * cos.shape[-1]`` features of ``x [b, t, h, d]``; pass the rest.

    ``interleaved=False`` pairs feature i with i + half (HF ``rotate_half``, Llama/Qwen2);
    ``interleaved=True`` pairs features 2i and 2i+1 (GLM / ChatGLM).
    """
    # Written as x * cos + swap(x) * sign * sin with swap a reverse over an axis of size 2:
    # elementwise ops and a reverse fuse into one loop, where the textbook split + concatenate
    # runs as slow concatenate fusions on CPU (a seventh of a small causal-LM train step).
    b, t, h, d = x.shape
    half = cos.shape[-1]
    rot = 2 * half
    cos = cos[:, :, None, :].astype(jnp.float32)
    sin = sin[:, :, None, :].astype(jnp.float32)
    if interleaved:
        if rot < d:  # the pass-through features get cos 1, sin 0
            pad = [(0, 0)] * 3 + [(0, (d - rot) // 2)]
            cos = jnp.pad(cos, pad, constant_values=1.0)
            sin = jnp.pad(sin, pad)
        pairs = x.astype(jnp.float32).reshape(b, t, h, d // 2, 2)
        sign = jnp.array([-1.0, 1.0], jnp.float32)
        out = pairs * cos[..., None] + jnp.flip(pairs, -1) * sign * sin[..., None]
        return out.reshape(x.shape).astype(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    halves = x_rot.astype(jnp.float32).reshape(b, t, h, 2, half)
    sign = jnp.array([-1.0, 1.0], jnp.float32)[:, None]
    out = halves * cos[..., None, :] + jnp.flip(halves, -2) * sign * sin[..., None, :]
    out = out.reshape(x_rot.shape).astype(x.dtype)
    return out if rot == d else jnp.concatenate([out, x_pass], axis=-1)


def relative_position_bucket(
    relative: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of each ``key - query`` distance (int32, in ``[0, num_buckets)``).

    Half the buckets (per direction when ``bidirectional``; a decoder sees only the past) hold
    the exact distances below ``num_buckets / 2`` (per direction); the rest cover the larger
    distances logarithmically up to ``max_distance``, beyond which all share the last bucket.
    """
    bucket = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = (relative > 0).astype(relative.dtype) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    exact = num_buckets // 2
    # log(0) for distance 0 is discarded by the where below.
    log_ratio = jnp.log(distance.astype(jnp.float32) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).astype(relative.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(distance < exact, distance, large)


@functools.lru_cache(maxsize=16)
def sinusoidal_table(positions: int, dim: int) -> np.ndarray:
    """The fixed ``[positions, dim]`` position table of Pegasus/Marian as HF builds it: angles
    ``pos / 10000^(2 * (j // 2) / dim)`` in float64, sines of the even features in the first
    half and cosines of the odd ones in the second half, then fp32."""
    j = np.arange(dim)
    angles = np.arange(positions)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    half = (dim + 1) // 2
    table = np.empty((positions, dim), np.float32)
    table[:, :half] = np.sin(angles[:, 0::2])
    table[:, half:] = np.cos(angles[:, 1::2])
    table.setflags(write=False)  # cached: shared by every caller
    return table


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every decoder layer for a fixed number of slots.

    ``k, v [layers, b, slots, kv, d]``; ``valid [b, slots]`` marks slots holding a real token
    (left padding and unfilled slots are False); ``index`` is how many slots are filled. The
    shapes never change while decoding, so one jitted step serves every position.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(
        cls, layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype
    ) -> KVCache:
        """An empty cache."""
        shape = (layers, batch, slots, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, slots), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def add_tokens(self, token_mask: jax.Array) -> tuple[KVCache, jax.Array]:
        """Register ``t`` new tokens (``token_mask [b, t]``, False for padding) before a step.

        Returns the cache with their slots marked and the attention mask ``[b, 1, t, slots]``
        of the new queries: a query sees real tokens at or before its own slot.
        """
        t = token_mask.shape[1]
        valid = jax.lax.dynamic_update_slice(self.valid, token_mask.astype(bool), (0, self.index))
        slots = self.valid.shape[1]
        query_slot = self.index + jnp.arange(t)
        causal = jnp.arange(slots)[None, :] <= query_slot[:, None]
        mask = valid[:, None, None, :] & causal[None, None]
        return self.replace(valid=valid), mask

    def update(
        self, layer: int, k: jax.Array, v: jax.Array
    ) -> tuple[KVCache, jax.Array, jax.Array]:
        """Write one layer's new ``k, v [b, t, kv, d]`` at ``index``; return all its slots."""
        start = (layer, 0, self.index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), start)
        v_all = jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), start)
        return self.replace(k=k_all, v=v_all), k_all[layer], v_all[layer]

    def advance(self, t: int) -> KVCache:
        """Move ``index`` past the ``t`` tokens just written (after all layers ran)."""
        return self.replace(index=self.index + t)

    def select(self, rows: jax.Array) -> KVCache:
        """The cache of batch rows ``rows [n]`` (repeats allowed): one prompt's prefill shared
        by its beams or samples, or the beams that survived a beam-search step."""
        return self.replace(k=self.k[:, rows], v=self.v[:, rows], valid=self.valid[rows])
