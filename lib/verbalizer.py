"""The verbalizer of prompt-based classification with a masked LM (PET, p-tuning).

A prompt holds ``L`` ``[MASK]`` slots, ``L`` the token length of the longest label word; the
masked LM fills them and the filled-in word names the class. This module is that mapping, once:

- ``Verbalizer``: label words -> token ids ``[labels, L]``, padded with ``[PAD]`` (the label word
  of a class is its name, as in the originals), and back: ``decode`` turns the argmax tokens at
  the slots into a class: the label whose tokens they are exactly, else the label sharing the
  longest common substring of tokens with them (ties and no overlap at all: the label listed
  first).
- ``mask_positions``: where the slots of each row are, found from the input ids (any padding
  side, any template), so a batch never relies on positions computed elsewhere.
- ``mask_loss``: cross-entropy of the slot logits against the label's tokens, averaged over the
  slots and the batch (padding slots predict ``[PAD]``, as in the originals).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lib.errors import UserError


def mask_positions(input_ids: jax.Array, mask_id: int, length: int) -> jax.Array:
    """``[b, length]`` column indices of the ``[MASK]`` tokens of each row, left to right.

    Every row must hold exactly ``length`` of them (the prompt encoder makes sure of it): a
    stable sort of "is not a mask" puts the mask columns first, in their order, wherever
    the padding and the prompt put them."""
    not_mask = (input_ids != mask_id).astype(jnp.int32)
    return jnp.argsort(not_mask, axis=-1, stable=True)[:, :length].astype(jnp.int32)


def mask_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of slot logits ``[b, L, vocab]`` against label tokens ``[b, L]``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.mean(ce)


def longest_common_substring(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest run of consecutive items that ``a`` and ``b`` share."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


class Verbalizer:
    """Label words as token ids and the decoding of predicted slot tokens (module
    docstring). ``tokenizer`` is an HF tokenizer or a ``lib.tokenizer.CharVocab``."""

    def __init__(self, labels: Sequence[str], tokenizer: Any, *, where: str = "data.labels"):
        """Token ids of each label word; a word the tokenizer cannot spell (an ``[UNK]``
        token, or no token at all) is a ``UserError`` naming ``where``."""
        self.labels = list(labels)
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        unk = tokenizer.unk_token_id
        words = []
        for name in self.labels:
            ids = [int(i) for i in tokenizer.encode(name, add_special_tokens=False)]
            if not ids or unk in ids:
                raise UserError(
                    f"config.{where}: label word {name!r} has no tokens or an unknown one in "
                    "the model's vocabulary (a scratch vocabulary: its characters must occur in "
                    "the training data)"
                )
            words.append(ids)
        # Slots per prompt: the longest label word.
        self.length = max(map(len, words))
        # [labels, L]: each word padded with [PAD] (the targets of the loss).
        self.ids = np.full((len(words), self.length), self.pad_id, np.int32)
        for row, ids in enumerate(words):
            self.ids[row, : len(ids)] = ids
        self._words = [tuple(ids) for ids in words]

    def targets(self, label_index: jax.Array) -> jax.Array:
        """``[b, L]`` token ids of the labels ``label_index [b]``."""
        return jnp.asarray(self.ids)[label_index]

    def decode(self, slot_ids: np.ndarray) -> np.ndarray:
        """Label indices ``[n]`` of predicted slot tokens ``[n, L]`` (``[PAD]`` dropped): the
        exact label, else the longest common substring, the earlier label on ties."""
        out = np.empty(len(slot_ids), np.int32)
        for row, ids in enumerate(np.asarray(slot_ids)):
            out[row] = self.label_of(tuple(int(i) for i in ids if i != self.pad_id))
        return out

    def word(self, slot_ids: Sequence[int]) -> str:
        """The text of predicted slot tokens, ``[PAD]`` dropped (for samples and predict)."""
        return "".join(self.tokenizer.convert_ids_to_tokens(
            [int(i) for i in slot_ids if i != self.pad_id]))

    def label_of(self, word: tuple[int, ...]) -> int:
        """The label index of one predicted word (token ids without padding)."""
        if word in self._words:
            return self._words.index(word)
        overlaps = [longest_common_substring(word, label) for label in self._words]
        return int(np.argmax(overlaps))  # argmax takes the first of equal values
