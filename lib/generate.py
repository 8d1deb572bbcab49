"""The one decoding module: jitted greedy, sampled and beam-search generation with a fixed-shape
KV cache, for decoder-only and encoder-decoder models.

Two kinds of model decode here:

- a decoder (``lib.models.DecoderLM``: ``model(input_ids, attention_mask, positions, cache, *,
  prefix) -> (logits, cache)``, ``model.init_cache(batch, slots)``), including a ``PrefixLM``
  (p-tuning v2), whose learned prefix goes to the prefill and to every step. The left-padded
  prompt is prefilled into a cache of ``t + max_new_tokens`` slots;
- an encoder-decoder (``lib.models.Seq2SeqLM``, ``model.config.is_encoder_decoder``): the
  encoder runs once, ``model.init_cache`` computes the cross-attention keys/values once, and
  decoding starts from ``config.decoder_start_token_id``.

Either way a prompt is prefilled (or encoded) **once**, where HF ``generate`` runs it once per
returned sequence or beam: a decoder's cache rows are then copied for its
``num_return_sequences`` samples or its ``num_beams`` beams (``cache.select(rows)``); an
encoder-decoder's cross-attention keys/values stay one copy per input, read by all its rows
(``init_cache(copies=)``), and only the decoder's self-attention cache has a row per beam.
Then one ``jax.lax.while_loop`` feeds one token per row and step. Shapes never change inside
it, so each (model, prompt shape, settings) compiles exactly once.

Token choice follows Hugging Face ``generate``: the ``no_repeat_ngram_size`` ban (the prompt
counts), then for sampling temperature, top-k and top-p (nucleus); a sample is drawn among
the candidates these keep. The random stream is an explicit ``jax.random`` key, folded with
the step number, so the same key gives the same tokens. Beam search is HF's
``_beam_search`` step for step (its ``2 * num_beams`` candidates, finished hypotheses scored
``sum log p / length ** length_penalty``, ``early_stopping`` True / False / "never"), so
greedy and beam outputs are token-identical to HF's.

    ids, mask = left_pad([[5, 6, 7], [8, 9]], pad_id=0)
    generate(model, ids, mask, max_new_tokens=16, num_beams=3)  # -> int32 [2, 16]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib.errors import UserError
from lib.models.prefix import Prefix, PrefixLM

# The "minus infinity" HF's beam search adds to scores it rules out (finite, so sums stay
# ordered exactly as HF's do).
_RULED_OUT = -1.0e9
EARLY_STOPPING = (True, False, "never")


class _Settings(NamedTuple):
    """Static decoding settings: part of the compile-cache key (EOS, pad and start ids, the
    length penalty and early stopping are data, not)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    # 1: greedy or sampled decoding; more: beam search with that many beams.
    num_beams: int
    # Rows decoded per prompt from its one prefill: its samples, or its beams.
    copies: int
    # > 0: no n-gram of this size occurs twice (prompt included).
    no_repeat_ngram_size: int


class _BeamScoring(NamedTuple):
    """Beam search's scoring settings, as data (``_beam_scoring``)."""

    # [max_new_tokens] float32: length ** length_penalty for 1, 2, ... new tokens.
    penalty: jax.Array
    # early_stopping=True: stop once every prompt has num_beams finished hypotheses.
    stop_when_full: jax.Array
    # early_stopping="never" with length_penalty > 0: a running beam may still improve up to
    # max_new_tokens tokens (else it is judged at its current length).
    hope_longest: jax.Array


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
    logits = _tempered(logits, temperature)
    if not _filters(logits.shape[-1], top_k, top_p):
        return logits
    best, _, keep = _candidates(logits, top_k, top_p)
    # The kept set is a prefix of the sorted list: its smallest logit is the cut.
    threshold = jnp.min(jnp.where(keep, best, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _tempered(logits: jax.Array, temperature: float) -> jax.Array:
    logits = logits.astype(jnp.float32)
    return logits if temperature == 1.0 else logits / temperature


def _filters(vocab: int, top_k: int, top_p: float) -> bool:
    """Whether top-k or top-p removes any token of a ``vocab``-sized distribution."""
    return 0 < top_k < vocab or top_p < 1.0


def _candidates(
    logits: jax.Array, top_k: int, top_p: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(logits, token ids, kept) [..., k]`` of the ``k`` most likely tokens, best first
    (``k``: ``top_k``, else the vocabulary), and which of them top-p keeps."""
    vocab = logits.shape[-1]
    # With top-k only the k best need sorting, which is much cheaper than the vocabulary.
    best, index = jax.lax.top_k(logits, vocab if top_k <= 0 else min(top_k, vocab))
    keep = jnp.ones(best.shape, bool)
    if top_p < 1.0:
        probs = jax.nn.softmax(best, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs < top_p).at[..., 0].set(True)
    return best, index, keep


def ban_repeated_ngrams(
    scores: jax.Array, history: jax.Array, length: jax.Array, n: int
) -> jax.Array:
    """-inf for every token that would repeat an ``n``-gram of ``history[:, :length]``.

    ``scores [r, V]``, ``history [r, L]`` (the tokens so far, then filler), ``length`` the
    number of real tokens (a traced scalar). As HF's ``NoRepeatNGramLogitsProcessor``: every
    window of ``n`` tokens whose first ``n - 1`` equal the last ``n - 1`` tokens bans its last
    token.
    """
    r, width = history.shape
    if n > width:
        return scores
    count = width - n + 1
    windows = jnp.stack([history[:, k : k + count] for k in range(n)], axis=-1)  # [r, W, n]
    # (Before n - 1 tokens exist no window is complete: the mask below rules them all out.)
    suffix = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(length - (n - 1), 0), n - 1, 1)
    complete = jnp.arange(count) <= length - n
    match = jnp.all(windows[..., :-1] == suffix[:, None, :], axis=-1) & complete[None]
    vocab = scores.shape[-1]
    # A window that does not match bans the spare column ``vocab``.
    banned_ids = jnp.where(match, jnp.minimum(windows[..., -1], vocab), vocab)
    banned = jnp.zeros((r, vocab + 1), bool).at[jnp.arange(r)[:, None], banned_ids].set(True)
    return jnp.where(banned[:, :vocab], -jnp.inf, scores)


def _choose(logits: jax.Array, key: jax.Array, s: _Settings) -> jax.Array:
    """Next token ``[b]`` from last-position ``logits [b, V]``.

    A sample is drawn among the candidates that top-k and top-p keep (``_candidates``), not
    over the whole vocabulary with the others at -inf: the same distribution (as
    ``warp_logits``, up to a token tied with the last candidate), at the cost of ``k``
    random numbers per row instead of ``V``."""
    if not s.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _tempered(logits, s.temperature)
    if not _filters(logits.shape[-1], s.top_k, s.top_p):
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    best, index, keep = _candidates(logits, s.top_k, s.top_p)
    pick = jax.random.categorical(key, jnp.where(keep, best, -jnp.inf), axis=-1)
    return jnp.take_along_axis(index, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ----------------------------------------------------------------------------- starting


class _Start(NamedTuple):
    """Where decoding starts, every prompt's rows already copied for its beams or samples.

    ``step(token [r], position [r], cache) -> (logits [r, V] fp32, cache)`` runs the model on
    one token per row; ``token`` is the first token to feed, ``position`` its position;
    ``history [r, w]`` the tokens that count for the n-gram ban (the padded prompt of a
    decoder, the start token of an encoder-decoder).
    """

    step: Callable
    cache: Any
    token: jax.Array
    position: jax.Array
    history: jax.Array


def _start_decoder(model, input_ids, mask, prefix, rows, max_new_tokens) -> _Start:
    """Prefill a decoder's left-padded prompts, then copy each prompt's rows (``rows``)."""
    b, t = input_ids.shape
    if isinstance(model, PrefixLM):
        # The learned prefix does not depend on the tokens: build it once, not at every step.
        prefix = model.prefix_encoder(1)
        model = model.base
    extra = {} if prefix is None else {"prefix": prefix}
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
    last_pos = jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
    if rows is not None:
        cache = cache.select(rows)
        input_ids, last_pos = input_ids[rows], last_pos[rows]
        if prefix is not None and prefix.k.shape[1] > 1:
            prefix = Prefix(k=prefix.k[:, rows], v=prefix.v[:, rows])
            extra = {"prefix": prefix}
    one = jnp.ones((input_ids.shape[0], 1), bool)

    def step(token, position, cache):
        logits, cache = model(token[:, None], one, positions=position[:, None], cache=cache,
                              **extra)
        return logits[:, 0], cache

    return _Start(step, cache, input_ids[:, -1], last_pos, input_ids)


def _start_seq2seq(model, input_ids, mask, start_id, copies, max_new_tokens) -> _Start:
    """Encode the inputs once and compute their cross-attention keys/values once, shared by
    each input's ``copies`` decoder rows; decoding starts from ``start_id``."""
    cache = model.init_cache(model.encode(input_ids, mask), mask, max_new_tokens,
                             copies=copies)
    r = input_ids.shape[0] * copies

    def step(token, position, cache):
        logits, cache = model.decode(token[:, None], cache)
        return logits[:, 0], cache

    token = jnp.full((r,), start_id, jnp.int32)
    return _Start(step, cache, token, jnp.zeros((r,), jnp.int32), token[:, None])


# ----------------------------------------------------------------------------- the loops


def _sample_loop(start: _Start, rng, eos, pad, max_new_tokens: int, s: _Settings) -> jax.Array:
    """Greedy or sampled decoding: ``[r, max_new_tokens]`` (pad after a row's EOS); stops as
    soon as every row has produced an EOS."""
    r, prompt = start.history.shape
    history = jnp.concatenate([start.history, jnp.full((r, max_new_tokens), pad)], axis=1)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, history, token, done, pos, cache = carry
        logits, cache = start.step(token, pos, cache)
        if s.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, history, prompt + i, s.no_repeat_ngram_size)
        token = _choose(logits, jax.random.fold_in(rng, i), s)
        token = jnp.where(done, pad, token)
        history = jax.lax.dynamic_update_slice(history, token[:, None], (0, prompt + i))
        return i + 1, history, token, done | jnp.isin(token, eos), pos + 1, cache

    done = jnp.zeros((r,), bool)
    carry = (jnp.int32(0), history, start.token, done, start.position, start.cache)
    return jax.lax.while_loop(cond, body, carry)[1][:, prompt:]


class _Beams(NamedTuple):
    """Beam-search state of ``B`` prompts x ``k`` beams (HF's names in parentheses)."""

    step: jax.Array
    cache: Any
    # The running beams' last tokens ``[B * k]`` and their positions.
    token: jax.Array
    position: jax.Array
    # Running beams: tokens ``[B, k, L]`` and summed log-probabilities ``[B, k]``
    # (running_sequences, running_beam_scores).
    seqs: jax.Array
    scores: jax.Array
    # The best finished hypotheses, best first (sequences, beam_scores, is_sent_finished).
    done_seqs: jax.Array
    done_scores: jax.Array
    done: jax.Array
    # [B]: whether a running beam may still beat a finished one
    # (is_early_stop_heuristic_unsatisfied).
    open: jax.Array


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x [B, n, ...]`` at beam indices ``index [B, m]``: ``[B, m, ...]``."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _beam_search(
    start: _Start, eos, pad, scoring: _BeamScoring, max_new_tokens: int, s: _Settings
) -> jax.Array:
    """HF's beam search (``GenerationMixin._beam_search``, without sampling):
    ``[B * num_beams, max_new_tokens]``, each prompt's hypotheses best first."""
    k = s.num_beams
    rows, prompt = start.history.shape
    b = rows // k
    width = prompt + max_new_tokens
    # Keep (EOS ids + 1) x beams candidates, so that k of them go on even if the best k end.
    keep = max(2, 1 + eos.shape[0]) * k
    penalty, full = scoring.penalty, scoring.stop_when_full
    seqs = jnp.concatenate([start.history, jnp.full((rows, max_new_tokens), pad)], axis=1)
    seqs = seqs.reshape(b, k, width)
    # Only the first beam is live at first: the others would repeat its candidates.
    scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_RULED_OUT)

    def cond(st: _Beams):
        return (st.step < max_new_tokens) & jnp.any(st.open) & ~(full & jnp.all(st.done))

    def body(st: _Beams) -> _Beams:
        i, length = st.step, prompt + st.step
        logits, cache = start.step(st.token, st.position, st.cache)
        logp = jax.nn.log_softmax(logits, axis=-1)
        if s.no_repeat_ngram_size:
            logp = ban_repeated_ngrams(logp, st.seqs.reshape(rows, width), length,
                                       s.no_repeat_ngram_size)
        vocab = logp.shape[-1]
        total = (logp.reshape(b, k, vocab) + st.scores[..., None]).reshape(b, k * vocab)
        top, index = jax.lax.top_k(total, keep)
        parent, token = index // vocab, (index % vocab).astype(jnp.int32)
        cand = jax.lax.dynamic_update_slice(_take(st.seqs, parent), token[..., None],
                                            (0, 0, length))
        ends = jnp.isin(token, eos) | (i + 1 >= max_new_tokens)

        # The best k candidates that go on.
        live = top + jnp.where(ends, _RULED_OUT, 0.0)
        best = jax.lax.top_k(live, k)[1]
        seqs, scores, parent = _take(cand, best), _take(live, best), _take(parent, best)

        # Candidates among the best k that ended join the finished hypotheses if they beat them.
        ended = ends & (jnp.arange(keep) < k)[None]
        final = top / penalty[i]
        final = final + jnp.where(full & jnp.all(st.done, -1, keepdims=True), _RULED_OUT, 0.0)
        final = final + jnp.where(st.open[:, None], 0.0, _RULED_OUT)
        final = final + jnp.where(ended, 0.0, _RULED_OUT)
        merged = jnp.concatenate([st.done_scores, final], axis=1)
        chosen = jax.lax.top_k(merged, k)[1]
        done_seqs = _take(jnp.concatenate([st.done_seqs, cand], axis=1), chosen)
        done = _take(jnp.concatenate([st.done, ended], axis=1), chosen)
        done_scores = _take(merged, chosen)

        cache = cache.select((jnp.arange(b)[:, None] * k + parent).reshape(-1))
        # Could the best running beam still beat the worst finished hypothesis?
        hoped = jnp.where(scoring.hope_longest, penalty[-1], penalty[i])
        worst = jnp.where(done, jnp.min(done_scores, axis=1, keepdims=True), _RULED_OUT)
        still = jnp.any(scores[:, :1] / hoped > worst, axis=-1)
        return _Beams(i + 1, cache, seqs[:, :, length].reshape(-1), st.position + 1, seqs,
                      scores, done_seqs, done_scores, done, st.open & still)

    state = _Beams(
        step=jnp.int32(0), cache=start.cache, token=start.token, position=start.position,
        seqs=seqs, scores=scores, done_seqs=seqs,
        done_scores=jnp.full((b, k), _RULED_OUT, jnp.float32), done=jnp.zeros((b, k), bool),
        open=jnp.ones((b,), bool),
    )
    final = jax.lax.while_loop(cond, body, state)
    return final.done_seqs[:, :, prompt:].reshape(rows, max_new_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "settings"))
def _generate(
    graphdef, state, input_ids, attention_mask, rng, eos, pad, start_id, scoring, prefix, *,
    max_new_tokens, settings,
):
    """Pure, jitted generation: ``[b * settings.copies, max_new_tokens]`` int32 tokens.

    ``eos [n]`` holds the stop ids (-1 for none), ``pad`` the id written after a row's EOS,
    ``start_id`` an encoder-decoder's first decoder token, ``scoring`` beam search's
    ``_BeamScoring``, ``prefix`` a ``Prefix`` for every forward of a decoder (or None).
    """
    model = nnx.merge(graphdef, state)
    b = input_ids.shape[0]
    mask = attention_mask.astype(bool)
    copies = settings.copies
    rows = jnp.repeat(jnp.arange(b), copies) if copies > 1 else None
    if model.config.is_encoder_decoder:
        start = _start_seq2seq(model, input_ids, mask, start_id, copies, max_new_tokens)
    else:
        start = _start_decoder(model, input_ids, mask, prefix, rows, max_new_tokens)
    if settings.num_beams > 1:
        return _beam_search(start, eos, pad, scoring, max_new_tokens, settings)
    return _sample_loop(start, rng, eos, pad, max_new_tokens, settings)


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
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prefix: Prefix | None = None,
) -> np.ndarray:
    """Continue prompts ``input_ids [b, t]``; return ``[b * num_return_sequences,
    max_new_tokens]`` tokens, each prompt's sequences together (as HF ``generate``).

    A decoder's prompts are left-padded (``left_pad``); an encoder-decoder's inputs may be
    padded on either side (``attention_mask``) and its decoding starts from
    ``config.decoder_start_token_id``.

    Greedy by default; ``do_sample`` samples (``rng``, a ``jax.random`` key, is required), with
    ``num_return_sequences`` samples per prompt from one prefill. ``num_beams > 1`` is beam
    search, as HF's: ``length_penalty``, ``early_stopping`` (True: stop once ``num_beams``
    hypotheses ended; False: once no running beam can beat them at its current length;
    "never": at any length up to ``max_new_tokens``), ``num_return_sequences <= num_beams``
    best hypotheses, best first. ``no_repeat_ngram_size`` bans repeated n-grams in every mode.
    ``eos_token_id`` / ``pad_token_id`` default to ``model.config``'s; pass ``eos_token_id=[]``
    to never stop early. A sequence's EOS is kept and every later token is the pad id.
    ``prefix`` (p-tuning v2 keys/values, batch ``b`` or 1) is passed to every forward of a
    plain decoder; a ``PrefixLM`` supplies its own. Compiled once per (model structure, prompt
    shape, ``max_new_tokens``, settings): keep prompt shapes fixed (``left_pad(length=)``) to
    avoid recompiling.
    """
    cfg = model.config
    seq2seq = bool(cfg.is_encoder_decoder)
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id
    if pad_token_id is None:
        raise UserError(
            "generate needs a pad token id: the model config has none, pass pad_token_id "
            "(e.g. the tokenizer's pad_token_id)"
        )
    start_id = cfg.decoder_start_token_id if seq2seq else 0
    if start_id is None:
        raise UserError("an encoder-decoder model needs config.decoder_start_token_id to "
                        "decode")
    if eos_token_id is None:
        eos = ()
    elif isinstance(eos_token_id, int | np.integer):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    settings = _settings(
        max_new_tokens=max_new_tokens, rng=rng, temperature=temperature, top_k=top_k,
        top_p=top_p, do_sample=do_sample, num_beams=num_beams,
        num_return_sequences=num_return_sequences, early_stopping=early_stopping,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    if not do_sample:
        rng = jax.random.key(0)  # unused by greedy decoding and beam search

    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask).astype(bool)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be [b, t]")
    if not seq2seq and np.any(mask[:, :-1] & ~mask[:, 1:]):
        raise ValueError("prompts must be left-padded (mask 0...0 1...1); use left_pad()")
    # -1 (never a token) pads the EOS ids to a multiple of 4: fewer shapes to compile. (Beam
    # search keeps one candidate set per EOS id, so there they stay as they are.)
    slots = len(eos) if num_beams > 1 else max(4, -(-len(eos) // 4) * 4)
    eos_ids = np.full((slots,), -1, np.int32)
    eos_ids[: len(eos)] = eos
    if prefix is not None and isinstance(model, PrefixLM):
        raise ValueError("a PrefixLM builds its own prefix; do not pass prefix= to generate")
    if prefix is not None and seq2seq:
        raise ValueError("prefix= (p-tuning v2) is for a decoder, not an encoder-decoder")
    graphdef, state = nnx.split(model)
    scoring = _beam_scoring(max_new_tokens, float(length_penalty), early_stopping)
    out = np.asarray(_generate(
        graphdef, state, ids, mask, rng, eos_ids, np.int32(pad_token_id), np.int32(start_id),
        scoring, prefix, max_new_tokens=max_new_tokens, settings=settings,
    ))
    if num_beams > num_return_sequences:
        # Each prompt's best num_return_sequences of its num_beams hypotheses.
        out = out.reshape(ids.shape[0], num_beams, max_new_tokens)[:, :num_return_sequences]
        out = out.reshape(-1, max_new_tokens)
    return out


def _beam_scoring(max_new_tokens: int, length_penalty: float, early_stopping) -> _BeamScoring:
    """``_BeamScoring`` of one call. The penalties are computed in float64, as HF's Python
    scalars are, then rounded to float32."""
    lengths = np.arange(1, max_new_tokens + 1, dtype=np.float64)
    return _BeamScoring(
        penalty=(lengths**length_penalty).astype(np.float32),
        stop_when_full=np.bool_(early_stopping is True),
        hope_longest=np.bool_(early_stopping == "never" and length_penalty > 0.0),
    )


def _settings(
    *, max_new_tokens, rng, temperature, top_k, top_p, do_sample, num_beams,
    num_return_sequences, early_stopping, no_repeat_ngram_size,
) -> _Settings:
    """The checked, hashable settings of one ``generate`` call."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1 or num_return_sequences < 1 or no_repeat_ngram_size < 0:
        raise ValueError(
            f"num_beams={num_beams} and num_return_sequences={num_return_sequences} must be "
            f">= 1, no_repeat_ngram_size={no_repeat_ngram_size} >= 0"
        )
    if early_stopping not in EARLY_STOPPING or (
        isinstance(early_stopping, int) and not isinstance(early_stopping, bool)
    ):
        raise ValueError(f"early_stopping={early_stopping!r}: choose True, False or 'never'")
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam search samples nothing: do_sample=True needs num_beams=1")
        if num_return_sequences > num_beams:
            raise ValueError(f"num_return_sequences={num_return_sequences} must be <= "
                             f"num_beams={num_beams}")
    elif num_return_sequences > 1 and not do_sample:
        raise ValueError(f"greedy decoding returns one sequence per prompt, not "
                         f"num_return_sequences={num_return_sequences}: sample (do_sample=True) "
                         "or use beam search (num_beams > 1)")
    copies = int(num_beams) if num_beams > 1 else int(num_return_sequences)
    beam = dict(num_beams=int(num_beams), copies=copies,
                no_repeat_ngram_size=int(no_repeat_ngram_size))
    if not do_sample:
        return _Settings(False, 1.0, 0, 1.0, **beam)
    if rng is None:
        raise ValueError("do_sample=True needs rng=jax.random.key(seed)")
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"invalid sampling settings temperature={temperature} (> 0), top_p={top_p} "
            f"(in (0, 1]), top_k={top_k} (>= 0)"
        )
    return _Settings(True, float(temperature), int(top_k), float(top_p), **beam)


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
