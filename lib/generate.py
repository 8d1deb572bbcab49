"""The one decoding loop: jitted greedy / sampled generation with a fixed-shape KV cache.

Any decoder port that implements the decoder interface (``model(input_ids, attention_mask,
positions, cache, *, prefix) -> (logits, cache)``, ``model.init_cache(batch, slots)``,
``model.config``) decodes here, and so does a ``PrefixLM`` (p-tuning v2), whose learned prefix
goes to the prefill and to every decode step. One compiled function does everything: prefill
the left-padded prompt into a cache of ``t + max_new_tokens`` slots, then a
``jax.lax.while_loop`` that feeds one token per step and stops as soon as every row has
produced an EOS. Shapes never change inside the loop, so each (model, prompt shape, settings)
compiles exactly once.

Sampling follows Hugging Face's order: temperature, then top-k, then top-p (nucleus). The
random stream is an explicit ``jax.random`` key, folded with the step number, so the same key
gives the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib.errors import UserError
from lib.models.prefix import Prefix, PrefixLM


class _Settings(NamedTuple):
    """Static sampling settings: part of the compile-cache key (EOS and pad ids are not)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float


# ----------------------------------------------------------------------------- token choice


def warp_logits(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Apply temperature, top-k and top-p to ``logits [..., V]``; removed tokens get -inf.

    top-k keeps every token at least as likely as the k-th (ties kept, like HF's
    ``TopKLogitsWarper``). top-p keeps the smallest set of most likely tokens whose probability
    sums to at least ``top_p``, and always the most likely one (HF's ``TopPLogitsWarper``):
    a token is kept when the probability of the tokens ranked above it is below ``top_p``.
    """
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    k = vocab if top_k <= 0 else min(top_k, vocab)
    if k == vocab and top_p >= 1.0:
        return logits
    # Sorted descending; with top-k only the k best need sorting, which is much cheaper.
    best = jax.lax.top_k(logits, k)[0]
    threshold = best[..., -1:]
    if top_p < 1.0:
        probs = jax.nn.softmax(best, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs
        keep = above < top_p
        keep = keep.at[..., 0].set(True)
        # The kept set is a prefix of the sorted list: its smallest logit is the cut.
        threshold = jnp.min(jnp.where(keep, best, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _choose(logits: jax.Array, key: jax.Array, s: _Settings) -> jax.Array:
    """Next token ``[b]`` from last-position ``logits [b, V]``."""
    if not s.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warped = warp_logits(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return jax.random.categorical(key, warped, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the loop


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "settings"))
def _generate(
    graphdef, state, input_ids, attention_mask, rng, eos, pad, prefix, *, max_new_tokens, settings
):
    """Pure, jitted generation: ``[b, max_new_tokens]`` int32 tokens (pad after EOS).

    ``eos [n]`` holds the stop ids (-1 for none), ``pad`` the id written after a row's EOS,
    ``prefix`` a ``Prefix`` for every forward (or None).
    """
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    if isinstance(model, PrefixLM):
        # The learned prefix does not depend on the tokens: build it once, not at every step.
        prefix = model.prefix_encoder(1)
        model = model.base
    # Decoders without p-tuning support need not know the keyword.
    extra = {} if prefix is None else {"prefix": prefix}
    mask = attention_mask.astype(bool)
    cache = model.init_cache(b, t + max_new_tokens)
    if t > 1:
        # Prefill all prompt tokens but the last. Its logits are unused, so XLA drops the LM
        # head here: with a large vocabulary that is most of the memory of a long prefill.
        positions = jnp.maximum(jnp.cumsum(mask[:, :-1], axis=-1, dtype=jnp.int32) - 1, 0)
        _, cache = model(
            input_ids[:, :-1], mask[:, :-1], positions=positions, cache=cache, **extra
        )
    # Left padding puts every row's last prompt token in the last column; the loop feeds it
    # first, at the position after the row's other real tokens.
    last_pos = jnp.sum(mask, axis=-1, dtype=jnp.int32) - 1
    step_mask = jnp.ones((b, 1), bool)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, token, done, pos, cache = carry
        logits, cache = model(
            token[:, None], step_mask, positions=pos[:, None], cache=cache, **extra
        )
        token = _choose(logits[:, 0], jax.random.fold_in(rng, i), settings)
        token = jnp.where(done, pad, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, out, token, done | jnp.isin(token, eos), pos + 1, cache

    out = jnp.full((b, max_new_tokens), pad, jnp.int32)
    done = jnp.zeros((b,), bool)
    carry = (jnp.int32(0), out, input_ids[:, -1], done, jnp.maximum(last_pos, 0), cache)
    return jax.lax.while_loop(cond, body, carry)[1]


def generate(
    model: nnx.Module,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prefix: Prefix | None = None,
) -> np.ndarray:
    """Continue left-padded prompts ``input_ids [b, t]``; return ``[b, max_new_tokens]`` tokens.

    Greedy unless ``do_sample`` (then ``rng``, a ``jax.random`` key, is required).
    ``eos_token_id`` / ``pad_token_id`` default to ``model.config``'s; pass ``eos_token_id=[]``
    to never stop early. A row's EOS is kept and every later token of that row is the pad id;
    decoding stops once every row has ended. ``prefix`` (p-tuning v2 keys/values, batch ``b``
    or 1) is passed to every forward of a plain decoder; a ``PrefixLM`` supplies its own.
    Compiled once per (model structure, prompt shape, ``max_new_tokens``, settings): keep
    prompt shapes fixed (``left_pad(length=)``) to avoid recompiling.
    """
    cfg = model.config
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id
    if pad_token_id is None:
        raise UserError(
            "generate needs a pad token id: the model config has none, pass pad_token_id "
            "(e.g. the tokenizer's pad_token_id)"
        )
    if eos_token_id is None:
        eos = ()
    elif isinstance(eos_token_id, int | np.integer):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample:
        if rng is None:
            raise ValueError("do_sample=True needs rng=jax.random.key(seed)")
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(
                f"invalid sampling settings temperature={temperature} (> 0), top_p={top_p} "
                f"(in (0, 1]), top_k={top_k} (>= 0)"
            )
        settings = _Settings(True, float(temperature), int(top_k), float(top_p))
    else:
        rng = jax.random.key(0)  # unused by greedy decoding
        settings = _Settings(False, 1.0, 0, 1.0)

    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask).astype(bool)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be [b, t]")
    if np.any(mask[:, :-1] & ~mask[:, 1:]):
        raise ValueError("prompts must be left-padded (mask 0...0 1...1); use left_pad()")
    # -1 (never a token) pads the EOS ids to a multiple of 4: fewer shapes to compile.
    eos_ids = np.full((max(4, -(-len(eos) // 4) * 4),), -1, np.int32)
    eos_ids[: len(eos)] = eos
    if prefix is not None and isinstance(model, PrefixLM):
        raise ValueError("a PrefixLM builds its own prefix; do not pass prefix= to generate")
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef,
        state,
        ids,
        mask,
        rng,
        eos_ids,
        np.int32(pad_token_id),
        prefix,
        max_new_tokens=max_new_tokens,
        settings=settings,
    )
    return np.asarray(out)


# ----------------------------------------------------------------------------- prompts


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, *, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into ``(ids [b, L], mask [b, L])`` int32 arrays.

    ``L`` is the longest sequence, or ``length`` when given (a fixed length avoids recompiling
    ``generate`` for every batch); a sequence longer than ``length`` is an error.
    """
    longest = max((len(s) for s in sequences), default=0)
    width = longest if length is None else length
    if longest > width:
        raise ValueError(f"a sequence has {longest} tokens, more than length={length}")
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = seq
            mask[row, width - len(seq) :] = 1
    return ids, mask


def apply_chat_template(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a chat (``[{"role": ..., "content": ...}, ...]``) ready for generation.

    Uses the tokenizer's own ``chat_template`` when it has one (e.g. Qwen's ``<|im_start|>``
    format); otherwise a plain ``role: content`` line per message, ending with
    ``assistant: `` when a reply is wanted. The template already places any special tokens,
    so none are added on top.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
    return list(tokenizer.encode(text, add_special_tokens=False))
