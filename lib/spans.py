"""Pointer-network spans: encoding ``[CLS] prompt [SEP] content [SEP]`` windows with the
characters each token covers, and decoding start/end probabilities back into character spans.

UIE (``tasks/uie.py``) asks one question (the prompt) about one text (the content) and reads
the answer off two per-token probabilities: that a span starts here, that it ends here.

- ``token_offsets``: the content's tokens and the characters each covers; a character
  vocabulary (``CharVocab``) is one token per character, an HF tokenizer gives its offset
  mapping (characters it drops, such as spaces, belong to no token).
- ``windows``: a content longer than ``max_length`` leaves room for is cut into windows of
  tokens; consecutive windows share ``stride`` tokens, so a span up to ``stride`` tokens long
  that one window cuts lies whole in its neighbour.
- ``decode``: positions whose probability exceeds the threshold are starts / ends; each end
  takes the nearest start at or before it that no earlier end took (the pairing of the
  original UIE); spans on positions outside the content (the prompt, ``[SEP]``, padding) are
  dropped, and so are spans touching a window's cut edge when the windows overlap.
- ``merge``: the spans of a content's windows, in content characters; a span found in two
  windows is kept once, with its higher probability.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lib.errors import UserError
from lib.tokenizer import CharVocab

# A position of a window that is not a content token (prompt, [CLS]/[SEP], padding).
NO_CHAR = -1


@dataclasses.dataclass
class Window:
    """One model input: ``[CLS] prompt [SEP] content tokens [first, end) [SEP]`` padded to
    ``max_length``, with the content character range of every position."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    # [max_length] first character / end character (exclusive) of each position's token in the
    # content; NO_CHAR outside the content.
    char_start: np.ndarray
    char_end: np.ndarray
    # The content tokens this window holds, and whether the content continues on each side.
    first: int
    end: int
    cut_left: bool
    cut_right: bool


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and the ``(start, end)`` characters of each."""
    if isinstance(tokenizer, CharVocab):
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids, [(i, i + 1) for i in range(len(text))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def windows(tokenizer, prompt: str, content: str, max_length: int, stride: int) -> list[Window]:
    """The windows of one (prompt, content) pair (one window when the content fits)."""
    prompt_ids, _ = token_offsets(tokenizer, prompt)
    ids, offsets = token_offsets(tokenizer, content)
    room = max_length - len(prompt_ids) - 3
    if room <= stride:
        raise UserError(
            f"prompt {prompt!r} takes {len(prompt_ids)} tokens: with data.max_length="
            f"{max_length} and data.stride={stride} no content fits (raise data.max_length)"
        )
    starts = [0]
    while starts[-1] + room < len(ids):
        starts.append(starts[-1] + room - stride)
    head = [tokenizer.cls_token_id, *prompt_ids, tokenizer.sep_token_id]
    out = []
    for first in starts:
        end = min(first + room, len(ids))
        row = head + ids[first:end] + [tokenizer.sep_token_id]
        n = len(row)
        char_start = np.full(max_length, NO_CHAR, np.int32)
        char_end = np.full(max_length, NO_CHAR, np.int32)
        chars = np.asarray(offsets[first:end], np.int32).reshape(-1, 2)
        char_start[len(head) : len(head) + end - first] = chars[:, 0]
        char_end[len(head) : len(head) + end - first] = chars[:, 1]
        types = np.zeros(max_length, np.int32)
        types[len(head) : n] = 1
        input_ids = np.full(max_length, tokenizer.pad_token_id, np.int32)
        input_ids[:n] = row
        mask = np.zeros(max_length, np.int32)
        mask[:n] = 1
        out.append(Window(input_ids, types, mask, char_start, char_end, first, end,
                          cut_left=first > 0, cut_right=end < len(ids)))
    return out


def targets(window: Window, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """0/1 start and end labels of a window for character spans ``(start, end)`` of the
    content; a span that the window does not hold whole is left out."""
    start = np.zeros(len(window.input_ids), np.float32)
    end = np.zeros(len(window.input_ids), np.float32)
    for s, e in spans:
        first = np.flatnonzero((window.char_start <= s) & (s < window.char_end))
        last = np.flatnonzero((window.char_start < e) & (e <= window.char_end))
        if len(first) and len(last) and first[0] <= last[-1]:
            start[first[0]] = 1.0
            end[last[-1]] = 1.0
    return start, end


def pair(starts: Sequence[int], ends: Sequence[int]) -> list[tuple[int, int]]:
    """Nearest-first pairing: each end (in order) takes the last start at or before it and
    after the previous end; starts and ends left without a partner are dropped."""
    out, i, starts = [], 0, sorted(starts)
    previous_end = -1
    for e in sorted(ends):
        chosen = None
        while i < len(starts) and starts[i] <= e:
            if starts[i] > previous_end:
                chosen = starts[i]
            i += 1
        if chosen is not None:
            out.append((chosen, e))
            previous_end = e
    return out


def decode(window: Window, start_prob: np.ndarray, end_prob: np.ndarray,
           threshold: float = 0.5, overlap: bool = True) -> list[tuple[int, int, float]]:
    """Character spans ``(start, end, probability)`` of one window: ``pair`` on the positions
    above ``threshold``; spans outside the content are dropped, and with ``overlap`` (windows
    sharing tokens) spans touching a cut edge too (the neighbouring window holds them whole).
    The probability is ``start_prob * end_prob``."""
    starts = np.flatnonzero(start_prob > threshold)
    ends = np.flatnonzero(end_prob > threshold)
    out = []
    content = np.flatnonzero(window.char_start != NO_CHAR)
    lo, hi = (content[0], content[-1]) if len(content) else (0, -1)
    for s, e in pair(starts.tolist(), ends.tolist()):
        if not lo <= s <= e <= hi:
            continue
        if overlap and ((window.cut_left and s == lo) or (window.cut_right and e == hi)):
            continue
        out.append((int(window.char_start[s]), int(window.char_end[e]),
                    float(start_prob[s] * end_prob[e])))
    return out


def merge(per_window: Sequence[Sequence[tuple[int, int, float]]]) -> list[tuple[int, int, float]]:
    """The spans of all windows of a content, each once (its highest probability), in order."""
    best: dict[tuple[int, int], float] = {}
    for spans in per_window:
        for s, e, p in spans:
            best[(s, e)] = max(p, best.get((s, e), 0.0))
    return [(s, e, p) for (s, e), p in sorted(best.items())]
