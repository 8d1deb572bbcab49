"""Tokenizers: the HF tokenizer of a checkpoint directory, or a character vocabulary.

`load_hf_tokenizer` opens the tokenizer saved with a pretrained model. `CharVocab` is a
character-level tokenizer built from the data, for models trained from scratch (demos, tests).
It answers the calls tasks make on an HF tokenizer (`tok(texts, text_pair, max_length=...,
truncation=True, padding="max_length", return_tensors="np")`, `encode`, `decode`, the
`*_token_id` attributes, `save_pretrained`), with the BERT layout `[CLS] a [SEP] (b [SEP])`, so a
task can take either.

Choices of CharVocab, and where it differs from HF's BERT tokenizer:
- Every character is one token: no lowercasing, no wordpieces, no whitespace splitting. A space
  (or U+3000, a tab) is an ordinary character: in the vocabulary if the data had it, else
  `[UNK]`. `\\n` and `\\r` never enter the vocabulary (vocab.txt holds one token per line) and
  always map to `[UNK]`.
- Special tokens are the only tokens longer than one character, which is how `load` tells them
  apart. Their roles are found by name: `[PAD]` (always id 0), `[UNK]`, `[CLS]`, `[SEP]`,
  `[MASK]`, `<bos>`, `<eos>`. A special token written inside a text is not recognised: "[SEP]"
  in a text is five characters.
- `decode` joins characters without the spaces HF's BERT decoder puts between them.
- Arrays are int32 (HF gives int64).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lib.data import pad_and_stack
from lib.errors import UserError

VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The key of tokenizer_config.json that marks a CharVocab directory.
CHAR_VOCAB_KEY = "char_vocab"
DEFAULT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<bos>", "<eos>")
# Characters that cannot live on a line of vocab.txt.
_LINE_BREAKS = ("\n", "\r")


def load_hf_tokenizer(model_dir: str | os.PathLike, key: str | None = "model.path") -> Any:
    """The tokenizer saved in an HF model directory (AutoTokenizer, local files, no remote code).

    A missing directory or one without tokenizer files is a UserError naming `key`, the config
    key the directory came from.
    """
    from transformers import AutoTokenizer

    hint = f" (set --config.{key}=DIR)" if key else ""
    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: model directory not found{hint}")
    if _is_char_vocab(model_dir):
        return CharVocab.load(model_dir)
    try:
        return AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())  # HF messages span lines; a UserError is one line
        raise UserError(f"{model_dir}: cannot load a tokenizer from it ({reason}){hint}") from None


def _is_char_vocab(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` holds a vocabulary saved by ``CharVocab`` (a scratch model's
    export): its ``tokenizer_config.json`` says so."""
    path = Path(model_dir) / TOKENIZER_CONFIG
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get(CHAR_VOCAB_KEY))
    except (OSError, ValueError, AttributeError):
        return False


def _truncate_pair(n1: int, n2: int, budget: int, strategy: str) -> tuple[int, int]:
    """Lengths to keep of two sequences so that they fit in `budget` tokens.

    "longest_first" follows the HF (Rust) tokenizers rule: if only the longer must shrink it is
    cut to fit, else both get budget // 2 and the longer one keeps the odd token.
    """
    if n1 + n2 <= budget:
        return n1, n2
    if strategy in ("only_first", "only_second"):
        fixed = n2 if strategy == "only_first" else n1
        if fixed > budget:
            raise ValueError(f"truncation={strategy!r} cannot fit: the other sequence alone has "
                             f"{fixed} tokens > {budget}")
        return (budget - n2, n2) if strategy == "only_first" else (n1, budget - n1)
    short = min(n1, n2)
    keep_long = max(short, budget - short) if short <= budget else short
    if short + keep_long > budget:
        short, keep_long = budget // 2, budget // 2 + budget % 2
    return (keep_long, short) if n1 > n2 else (short, keep_long)


class CharVocab:
    """A character-level tokenizer with BERT-style special tokens (see the module docstring)."""

    padding_side = "right"

    def __init__(self, tokens: Sequence[str]):
        """Build from the full token list (id = position); use `build` or `load` normally."""
        if len(set(tokens)) != len(tokens):
            dup = next(t for t, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"token {dup!r} appears twice in the vocabulary")
        if not tokens or tokens[0] != "[PAD]" or "[UNK]" not in tokens:
            raise ValueError('the vocabulary must start with "[PAD]" and contain "[UNK]"')
        self.tokens = list(tokens)
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        self.all_special_ids = [i for i, t in enumerate(self.tokens) if len(t) > 1]
        self._special = set(self.all_special_ids)

    # --- construction and files -------------------------------------------------------------

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        min_freq: int = 1,
        max_size: int | None = None,
        specials: Sequence[str] = DEFAULT_SPECIALS,
    ) -> CharVocab:
        """Count the characters of `texts`; keep those seen `min_freq` times, most frequent first.

        Ties are broken by code point, so the vocabulary is a function of the data alone.
        `max_size` caps the whole vocabulary, specials included. `specials` must start with
        "[PAD]", contain "[UNK]", and be longer than one character each (e.g. "[unused1]").
        """
        if any(len(s) < 2 for s in specials):
            raise ValueError(f"special tokens must be longer than one character: {specials}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        chars = sorted(
            (c for c, n in counts.items() if n >= min_freq and c not in _LINE_BREAKS),
            key=lambda c: (-counts[c], c),
        )
        if max_size is not None:
            chars = chars[: max(max_size - len(specials), 0)]
        return cls(list(specials) + chars)

    def with_specials(self, tokens: Sequence[str]) -> CharVocab:
        """This vocabulary plus the special `tokens` it lacks, appended (existing ids keep
        their meaning): reserved tokens such as p-tuning's `[unused1]` ... `[unusedN]`, which a
        vocabulary built from data never has. Each must be longer than one character."""
        if any(len(t) < 2 for t in tokens):
            raise ValueError(f"special tokens must be longer than one character: {tokens}")
        missing = [t for t in dict.fromkeys(tokens) if t not in self.token_to_id]
        return CharVocab(self.tokens + missing) if missing else self

    def save(self, directory: str | os.PathLike) -> str:
        """Write `directory/vocab.txt`, one token per line, and a `tokenizer_config.json` that
        marks the directory as a character vocabulary (`load_hf_tokenizer` then loads a
        CharVocab; `transformers` a BertTokenizer without lowercasing); return the vocab path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VOCAB_FILE)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(t + "\n" for t in self.tokens))
        marker = {"tokenizer_class": "BertTokenizer", "do_lower_case": False,
                  CHAR_VOCAB_KEY: True}
        with open(os.path.join(directory, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
        return path

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """The HF name of `save`, so a run can save either kind of tokenizer the same way."""
        return self.save(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharVocab:
        """Read `directory/vocab.txt` written by `save`."""
        path = Path(directory) / VOCAB_FILE
        if not path.is_file():
            raise UserError(f"{path}: vocabulary file not found (a directory saved by CharVocab)")
        # Split on "\n" only: a token may be a space or another character str.splitlines eats.
        with open(path, encoding="utf-8", newline="\n") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        try:
            return cls(lines)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None

    # --- ids of the special tokens ----------------------------------------------------------

    def _id(self, token: str) -> int | None:
        return self.token_to_id.get(token)

    @property
    def pad_id(self) -> int:
        """Id of [PAD] (0)."""
        return 0

    @property
    def unk_id(self) -> int:
        """Id of [UNK]."""
        return self.token_to_id["[UNK]"]

    @property
    def cls_id(self) -> int | None:
        """Id of [CLS], or None if the vocabulary has none."""
        return self._id("[CLS]")

    @property
    def sep_id(self) -> int | None:
        """Id of [SEP], or None."""
        return self._id("[SEP]")

    @property
    def mask_id(self) -> int | None:
        """Id of [MASK], or None."""
        return self._id("[MASK]")

    @property
    def bos_id(self) -> int | None:
        """Id of <bos>, or None."""
        return self._id("<bos>")

    @property
    def eos_id(self) -> int | None:
        """Id of <eos>, or None."""
        return self._id("<eos>")

    @property
    def vocab_size(self) -> int:
        """Number of tokens, specials included."""
        return len(self.tokens)

    def __len__(self) -> int:
        """Number of tokens (as `len(hf_tokenizer)`)."""
        return len(self.tokens)

    # The HF attribute names of the same ids.
    pad_token_id = pad_id
    unk_token_id = unk_id
    cls_token_id = cls_id
    sep_token_id = sep_id
    mask_token_id = mask_id
    bos_token_id = bos_id
    eos_token_id = eos_id

    # --- encoding and decoding --------------------------------------------------------------

    def get_vocab(self) -> dict[str, int]:
        """Token -> id (a copy)."""
        return dict(self.token_to_id)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of tokens (specials by name, e.g. "[MASK]"); unknown tokens give the [UNK] id."""
        if isinstance(tokens, str):
            return self.token_to_id.get(tokens, self.unk_id)
        return [self.token_to_id.get(t, self.unk_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Tokens of ids."""
        if isinstance(ids, int | np.integer):
            return self.tokens[int(ids)]
        return [self.tokens[int(i)] for i in ids]

    def _chars(self, text: str) -> list[int]:
        """Ids of the characters of `text`, no special tokens."""
        unk = self.unk_id
        return [self.token_to_id.get(c, unk) for c in text]

    def _wrap(self, a: list[int], b: list[int] | None) -> tuple[list[int], list[int]]:
        """`[CLS] a [SEP] (b [SEP])` and its token type ids (0 for the first part, 1 for b)."""
        if self.cls_id is None or self.sep_id is None:
            raise ValueError("add_special_tokens needs [CLS] and [SEP] in the vocabulary")
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def encode(
        self, text: str, text_pair: str | None = None, add_special_tokens: bool = True
    ) -> list[int]:
        """Ids of `text` (and `text_pair`), with `[CLS] ... [SEP]` when `add_special_tokens`."""
        a = self._chars(text)
        b = None if text_pair is None else self._chars(text_pair)
        if not add_special_tokens:
            return a + (b or [])
        return self._wrap(a, b)[0]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Join the tokens of `ids`; `skip_special_tokens` drops [PAD], [SEP], [UNK] ... as HF."""
        out = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self._special:
                continue
            out.append(self.tokens[i])
        return "".join(out)

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        padding_side: str | None = None,
    ) -> dict[str, Any]:
        """Encode one text or a batch as HF tokenizers do.

        Returns `input_ids`, `token_type_ids` and `attention_mask`: numpy int32 arrays
        `[batch, length]` with `return_tensors="np"`, else lists (flat for a single str).
        `padding`: False/"do_not_pad", True/"longest", or "max_length". `truncation`: False,
        True/"longest_first", "only_first" or "only_second"; it keeps the special tokens.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs: list[str | None]
        if text_pair is None:
            pairs = [None] * len(texts)
        else:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")

        strategy = {True: "longest_first", False: None, "do_not_truncate": None}.get(
            truncation, truncation
        )
        if strategy not in (None, "longest_first", "only_first", "only_second"):
            raise ValueError(f"unknown truncation {truncation!r}")
        mode = {True: "longest", False: None, "do_not_pad": None}.get(padding, padding)
        if mode not in (None, "longest", "max_length"):
            raise ValueError(f"unknown padding {padding!r}")
        if (strategy or mode == "max_length") and max_length is None:
            raise ValueError("truncation and padding='max_length' need max_length")

        all_ids, all_types = [], []
        for a_text, b_text in zip(texts, pairs):
            a = self._chars(a_text)
            b = None if b_text is None else self._chars(b_text)
            if strategy is not None:
                n_special = (2 + (b is not None)) if add_special_tokens else 0
                budget = max_length - n_special
                if budget < 0:
                    raise ValueError(f"max_length {max_length} < {n_special} special tokens")
                n1, n2 = _truncate_pair(len(a), len(b or []), budget, strategy)
                a = a[:n1]
                b = None if b is None else b[:n2]
            if add_special_tokens:
                ids, types = self._wrap(a, b)
            else:
                ids = a + (b or [])
                types = [0] * len(a) + [1] * len(b or [])
            all_ids.append(ids)
            all_types.append(types)

        side = padding_side or self.padding_side
        if mode is None:
            width = None
        else:
            width = max_length if mode == "max_length" else max(map(len, all_ids), default=0)
        if mode is None and return_tensors is None:
            out = {
                "input_ids": all_ids,
                "token_type_ids": all_types,
                "attention_mask": [[1] * len(ids) for ids in all_ids],
            }
        else:
            if mode is None and len(set(map(len, all_ids))) > 1:
                raise ValueError("sequences differ in length: set padding to build an array")
            ids_arr, mask = pad_and_stack(all_ids, width, self.pad_id, side)
            types_arr, _ = pad_and_stack(all_types, width, 0, side)
            out = {"input_ids": ids_arr, "token_type_ids": types_arr, "attention_mask": mask}
            if return_tensors is None:
                out = {k: v.tolist() for k, v in out.items()}
            elif return_tensors != "np":
                raise ValueError(f'return_tensors must be "np" or None, got {return_tensors!r}')
        if single and return_tensors is None:
            out = {k: v[0] for k, v in out.items()}
        return out


_SPACE_NEAR_WIDE = re.compile(r"(?<=[^\x00-\x7f]) | (?=[^\x00-\x7f])")


class BertLMTokenizer:
    """A BERT ``vocab.txt`` tokenizer used by a causal LM (``uer/gpt2-chinese-*``).

    The convention of those models: a text starts with ``[CLS]`` and ends with ``[SEP]``, so
    ``encode(text, add_special_tokens=True)`` gives ``[CLS] text`` (a prompt, to be continued)
    and ``[SEP]`` is the end-of-sequence token (``eos_token_id``) that ends an answer. ``decode``
    removes the spaces BERT's decoder puts around CJK characters (kept between ASCII words).
    Everything else is the wrapped HF tokenizer's (``tokenizer``).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos_token_id = tokenizer.cls_token_id
        self.eos_token_id = tokenizer.sep_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.vocab_size = len(tokenizer)

    @staticmethod
    def wraps(tokenizer: Any) -> bool:
        """Whether an HF tokenizer is a BERT one without an EOS token of its own."""
        return (getattr(tokenizer, "eos_token_id", None) is None
                and getattr(tokenizer, "cls_token_id", None) is not None
                and getattr(tokenizer, "sep_token_id", None) is not None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``[CLS] text`` (``add_special_tokens``) or the text's ids alone."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_special_tokens else list(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` without the spaces around CJK characters."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _SPACE_NEAR_WIDE.sub("", text)

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, directory: str | os.PathLike) -> Any:
        """The wrapped tokenizer's files (``vocab.txt`` ...)."""
        return self.tokenizer.save_pretrained(str(directory))


def load_lm_tokenizer(model_dir: str | os.PathLike) -> Any:
    """A causal LM's tokenizer: the HF one, wrapped in ``BertLMTokenizer`` when it is a BERT
    vocabulary without an EOS token (GPT-2 Chinese)."""
    tokenizer = load_hf_tokenizer(model_dir)
    return BertLMTokenizer(tokenizer) if BertLMTokenizer.wraps(tokenizer) else tokenizer
