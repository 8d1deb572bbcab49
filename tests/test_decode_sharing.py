"""What makes decoding cheap without changing its result: an encoder-decoder's beams and
samples read their input's cross-attention keys/values from one copy (``init_cache(copies=)``)
instead of a copy per row, and sampling draws among the top-k / top-p candidates instead of
the whole vocabulary, from the same distribution."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from test_beam_search import _inputs, _models

from lib import generate as gen

COPIES = 3


@jax.jit
def _encode(model, ids, mask):
    return model.encode(ids, mask)


@functools.partial(jax.jit, static_argnames="copies")
def _decode_steps(model, encoded, mask, tokens, parents, *, copies: int):
    """Logits ``[rows, steps, vocab]`` of feeding ``tokens [rows, steps]`` one step at a time,
    the rows reordered to ``parents`` (rows of the same input, as beam search does) after the
    second step."""
    cache = model.init_cache(encoded, mask, tokens.shape[1], copies=copies)
    out = []
    for i in range(tokens.shape[1]):
        if i == 2:
            cache = cache.select(parents)
        logits, cache = model.decode(tokens[:, i : i + 1], cache)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


def test_seq2seq_copies_share_one_encoding(tmp_path_factory):
    ref, model = _models("t5", tmp_path_factory)
    ids, mask = _inputs(ref)
    b = ids.shape[0]
    rows = b * COPIES
    tokens = jnp.asarray(np.random.RandomState(0).randint(2, ref.config.vocab_size, (rows, 5)),
                         jnp.int32)
    # Beam i of input j continues from beam (i + 1) % COPIES of the same input.
    parents = jnp.asarray([j * COPIES + (i + 1) % COPIES for j in range(b)
                           for i in range(COPIES)])
    encoded = _encode(model, ids, mask)
    shared = _decode_steps(model, encoded, mask, tokens, parents, copies=COPIES)
    # The same rows with a copy of the keys/values each (copies=1: select moves them too).
    mask_rows = jnp.repeat(jnp.asarray(mask), COPIES, axis=0)
    copied = _decode_steps(model, jnp.repeat(encoded, COPIES, axis=0), mask_rows, tokens,
                           parents, copies=1)
    diff = float(jnp.abs(shared - copied).max())
    assert diff <= 1e-5, diff
    # Not trivially equal: the reorder changed what the rows see.
    unordered = _decode_steps(model, encoded, mask, tokens, jnp.arange(rows), copies=COPIES)
    assert float(jnp.abs(unordered - shared).max()) > 1e-3


@functools.partial(jax.jit, static_argnames="settings")
def _draw(logits, keys, settings):
    """One token of ``logits [1, V]`` per key."""
    return jax.vmap(lambda key: gen._choose(logits, key, settings)[0])(keys)


def test_sampling_among_candidates_follows_the_warped_distribution():
    logits = jnp.log(jnp.asarray([[0.05, 0.3, 0.02, 0.2, 0.15, 0.08, 0.12, 0.08]]))
    draws = 20000
    keys = jax.random.split(jax.random.key(0), draws)
    for temperature, top_k, top_p in [(1.0, 3, 1.0), (1.0, 0, 0.7), (0.7, 5, 0.8),
                                      (1.3, 0, 1.0)]:
        settings = gen._Settings(True, temperature, top_k, top_p, 1, 1, 0)
        tokens = _draw(logits, keys, settings)
        counts = np.bincount(np.asarray(tokens), minlength=logits.shape[1]) / draws
        warped = gen.warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        expected = np.asarray(jax.nn.softmax(warped, axis=-1))[0]
        # Removed tokens never come; the others at their warped probability (the standard
        # error of a share is below 0.0035 here).
        np.testing.assert_array_equal(counts[expected == 0], 0)
        np.testing.assert_allclose(counts, expected, atol=0.015)
