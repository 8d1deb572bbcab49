"""Causal-LM examples from (prompt, answer) pairs, and their loss: the one place for label masking.

An example is ``prompt_ids + answer_ids + [eos]``, right-padded to ``max_length``. ``labels[t]``
is the token that position ``t`` must predict (``input_ids[t + 1]``) or ``IGNORE`` (-100) where
nothing is counted, so the loss is a mean over ``labels != IGNORE``:

- ``loss_mode="masked"``: only the answer tokens and the EOS are targets; the prompt is context.
- ``loss_mode="unmasked"``: every real token after the first is a target (prompt included).

Two bugs of the original SFT scripts are fixed here, for every task at once:
- *No EOS.* The full fine-tunes never appended an end token, so the model never learned to stop
  and generation ran to the length limit. Every complete answer here ends with the tokenizer's
  EOS, and the EOS is a target in both modes.
- *Padding counted.* Padding positions were labelled with the pad id and averaged into the loss
  (and, where pad = EOS, taught the model to emit endless EOS). Here a padding position is never
  a target and the attention mask hides it, so neither the pad id nor the padded length changes
  the loss.

Truncation (``truncate``), when ``prompt + answer + eos`` exceeds ``max_length``:
1. A prompt longer than ``max_prompt_length`` loses its middle: its first
   ``max_prompt_length - prompt_tail`` tokens (the instruction and the start of the content,
   including any model prefix such as ChatGLM's ``[gMASK] sop``) and its last ``prompt_tail``
   tokens (the cue that asks for the answer, e.g. ``请鉴赏诗歌：\\n``) are kept.
2. The answer keeps its head, as much as fits after the prompt. The EOS is kept only when the
   whole answer fits: a cut answer did not end there, and an EOS would teach stopping mid-text.
Inference prompts go through the same rule 1, so training and decoding see the same prompts.

``generate_answers`` decodes answers to prompts (cut by rule 1) in fixed-shape batches.

Prompt and answer are tokenized separately (as at inference, where only the prompt is known):
``encode_prompt`` adds the tokenizer's start tokens (``<bos>`` of a ``CharVocab``, ChatGLM's
``[gMASK] sop``, whatever an HF tokenizer adds), ``encode_answer`` adds none. Any tokenizer with
``encode(text, add_special_tokens=...)``, ``eos_token_id`` and ``pad_token_id`` works: HF
tokenizers, ``lib.tokenizer.CharVocab`` and ``lib.chatglm_tokenizer.ChatGLMTokenizer``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lib.data import pad_and_stack
from lib.errors import UserError
from lib.generate import generate
from lib.tokenizer import CharVocab

IGNORE = -100  # label of a position that is not a target (the Hugging Face convention)
LOSS_MODES = ("masked", "unmasked")

# ----------------------------------------------------------------------------- tokens


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-sequence id; a tokenizer without one cannot end an answer."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError(
            "the tokenizer has no EOS token (eos_token_id is None): answers could not end; "
            "use a model directory whose tokenizer defines eos_token"
        )
    return int(eos)


def pad_id(tokenizer: Any) -> int:
    """The pad id (the EOS id when the tokenizer has none: padding is never a target anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return eos_id(tokenizer) if pad is None else int(pad)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Ids of a prompt, with the start tokens the model expects before any text."""
    if isinstance(tokenizer, CharVocab):
        # Its add_special_tokens means BERT's [CLS] ... [SEP]; a decoder wants only a start.
        bos = tokenizer.bos_id
        return ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False)
    return list(tokenizer.encode(text, add_special_tokens=True))


def encode_answer(tokenizer: Any, text: str) -> list[int]:
    """Ids of an answer: plain text tokens, no special tokens (the EOS is added by the example)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def truncate_prompt(prompt: Sequence[int], max_prompt_length: int, prompt_tail: int = 0) -> list:
    """Cut a prompt longer than ``max_prompt_length`` in the middle (see the module docstring)."""
    prompt = list(prompt)
    if len(prompt) <= max_prompt_length:
        return prompt
    tail = min(max(prompt_tail, 0), max_prompt_length)
    head = max_prompt_length - tail
    return prompt[:head] + (prompt[len(prompt) - tail :] if tail else [])


def truncate(
    prompt: Sequence[int],
    answer: Sequence[int],
    eos: int,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    prompt_tail: int = 0,
) -> tuple[list[int], list[int]]:
    """``(prompt, target)`` fitting in ``max_length``: target is the answer + EOS, or a cut
    answer without EOS (rules in the module docstring). ``max_prompt_length`` defaults to
    ``max_length // 2``."""
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 0 < max_prompt_length < max_length:
        raise UserError(
            f"max_prompt_length={max_prompt_length} must be in [1, max_length={max_length}): "
            "the answer needs room (set data.max_prompt_length / data.max_length)"
        )
    prompt = truncate_prompt(prompt, max_prompt_length, prompt_tail)
    room = max_length - len(prompt)
    target = list(answer) + [eos]
    if len(target) > room:
        target = list(answer)[:room]
    return prompt, target


def build_example(
    prompt: Sequence[int],
    answer: Sequence[int],
    eos: int,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    prompt_tail: int = 0,
    loss_mode: str = "masked",
) -> tuple[list[int], list[int]]:
    """Unpadded ``(input_ids, labels)`` of one example (labels already shifted)."""
    if loss_mode not in LOSS_MODES:
        raise UserError(f"loss_mode={loss_mode!r}: choose 'masked' or 'unmasked'")
    prompt, target = truncate(
        prompt, answer, eos, max_length=max_length, max_prompt_length=max_prompt_length,
        prompt_tail=prompt_tail,
    )
    ids = prompt + target
    # labels[t] = ids[t + 1]: the last token predicts nothing.
    labels = ids[1:] + [IGNORE]
    if loss_mode == "masked":
        # Positions before the last prompt token predict prompt tokens: not targets.
        first = max(len(prompt) - 1, 0)
        labels = [IGNORE] * first + labels[first:]
    return ids, labels


def build_arrays(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    prompt_tail: int = 0,
    loss_mode: str = "masked",
) -> dict[str, np.ndarray]:
    """Training arrays of ``(prompt, answer)`` texts, right-padded to ``max_length``:
    ``input_ids``, ``attention_mask`` and ``labels`` (int32 ``[n, max_length]``)."""
    eos, pad = eos_id(tokenizer), pad_id(tokenizer)
    ids_list, label_list = [], []
    for prompt, answer in pairs:
        ids, labels = build_example(
            encode_prompt(tokenizer, prompt), encode_answer(tokenizer, answer), eos,
            max_length=max_length, max_prompt_length=max_prompt_length,
            prompt_tail=prompt_tail, loss_mode=loss_mode,
        )
        ids_list.append(ids)
        label_list.append(labels)
    input_ids, mask = pad_and_stack(ids_list, max_length, pad)
    labels, _ = pad_and_stack(label_list, max_length, IGNORE)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "label_positions": label_positions(labels)}


def label_positions(labels: np.ndarray, multiple: int = 8) -> np.ndarray:
    """Where each row's targets are: int32 ``[n, k]``, the positions of the labels that are not
    ``IGNORE`` in order, then 0s; ``k`` is the most targets of any row, rounded up to
    ``multiple`` (at most the row length). The loss computes logits at these positions only:
    with answer-only targets the LM head and its softmax skip the prompt and the padding."""
    target = labels != IGNORE
    counts = target.sum(axis=1)
    k = int(counts.max()) if len(counts) else 0
    k = min(max(-(-k // multiple) * multiple, 1), labels.shape[1])
    out = np.zeros((labels.shape[0], k), np.int32)
    for row, flags in enumerate(target):
        where = np.flatnonzero(flags)
        out[row, : len(where)] = where
    return out


def prompt_arrays(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_prompt_length: int,
    prompt_tail: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Inference prompts, truncated as in training and left-padded to ``max_prompt_length``
    (one fixed shape, so decoding compiles once): ``(input_ids, attention_mask)``."""
    seqs = [
        truncate_prompt(encode_prompt(tokenizer, p), max_prompt_length, prompt_tail)
        for p in prompts
    ]
    return pad_and_stack(seqs, max_prompt_length, pad_id(tokenizer), side="left")


def decode_answer(tokenizer: Any, ids: Sequence[int], extra_stops: Sequence[int] = ()) -> str:
    """Text of generated ids up to (not including) the first EOS or ``extra_stops`` id, special
    tokens dropped."""
    stops = {eos_id(tokenizer), *(int(i) for i in extra_stops)}
    ids = [int(i) for i in ids]
    end = next((n for n, i in enumerate(ids) if i in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def generate_answers(
    model: nnx.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_prompt_length: int,
    prompt_tail: int,
    max_new_tokens: int,
    batch_size: int,
    rng: jax.Array | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    extra_stops: Sequence[int] = (),
    num_return_sequences: int = 1,
) -> list[str]:
    """Decode an answer for every prompt, in fixed-shape batches (one compilation).

    An answer ends at the tokenizer's EOS or at an ``extra_stops`` id. The last batch is
    filled up with copies of the last prompt (their outputs are dropped). Batch ``i`` samples
    with ``fold_in(rng, i)``, so a given ``rng`` gives the same texts.

    ``num_return_sequences = k > 1`` samples ``k`` answers per prompt from one prefill
    (``lib.generate``) and returns them prompt by prompt (``k`` answers of the first prompt,
    then of the second, ...); a batch then holds ``max(1, batch_size // k)`` prompts, so that
    it decodes about ``batch_size`` sequences at once.
    """
    if not prompts:
        return []
    ids, mask = prompt_arrays(
        tokenizer, prompts, max_prompt_length=max_prompt_length, prompt_tail=prompt_tail
    )
    k = int(num_return_sequences)
    batch_size = max(1, batch_size // k)
    n = len(prompts)
    total = -(-n // batch_size) * batch_size
    fill = np.minimum(np.arange(total), n - 1)
    ids, mask = ids[fill], mask[fill]
    rng = jax.random.key(0) if rng is None else rng
    stops = list(dict.fromkeys([eos_id(tokenizer), *(int(i) for i in extra_stops)]))
    out: list[str] = []
    for i, start in enumerate(range(0, total, batch_size)):
        rows = slice(start, start + batch_size)
        tokens = generate(
            model, ids[rows], mask[rows], max_new_tokens=max_new_tokens,
            rng=jax.random.fold_in(rng, i), do_sample=do_sample, temperature=temperature,
            top_p=top_p, top_k=top_k, eos_token_id=stops, pad_token_id=pad_id(tokenizer),
            num_return_sequences=k,
        )
        out.extend(decode_answer(tokenizer, row, extra_stops) for row in tokens)
    return out[: n * k]


# ----------------------------------------------------------------------------- loss


def _token_ce(model, batch: dict, rngs) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy and the 0/1 target mask, both ``[b, t]``, or ``[b, k]`` at
    the batch's ``label_positions`` when it has them (the same sums, less LM head work)."""
    labels = batch["labels"]
    at = batch.get("label_positions")
    if at is None:
        logits, _ = model(batch["input_ids"], batch["attention_mask"], rngs=rngs)
    else:
        logits, _ = model(batch["input_ids"], batch["attention_mask"], rngs=rngs, logits_at=at)
        # Entries past a row's target count are filler (position 0): not targets.
        count = jnp.sum(labels != IGNORE, axis=1, keepdims=True)
        filler = jnp.arange(at.shape[1])[None, :] >= count
        labels = jnp.where(filler, IGNORE, jnp.take_along_axis(labels, at, axis=1))
    target = labels != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(target, labels, 0)
    )
    return ce, target.astype(jnp.float32)


def lm_loss(model, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Token-mean cross-entropy over the targets; ``aux["weight"]`` is the target count, so the
    trainer's gradient accumulation weighs micro-batches by tokens (exactly one big batch)."""
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    logits_ce, target = _token_ce(model, batch, rngs)
    count = jnp.sum(target)
    loss = jnp.sum(logits_ce * target) / jnp.maximum(count, 1.0)
    return loss, {"weight": count}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_nll(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    ce, target = _token_ce(model, batch, None)
    return jnp.sum(ce * target, axis=-1), jnp.sum(target, axis=-1)


def row_nll(model: nnx.Module, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Summed target negative log-likelihood and target count per row (jitted, no dropout)."""
    graphdef, state = nnx.split(model)
    keys = ("input_ids", "attention_mask", "labels", "label_positions")
    nll, count = _row_nll(graphdef, state, {k: batch[k] for k in keys if k in batch})
    return np.asarray(nll), np.asarray(count)
