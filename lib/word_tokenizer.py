"""The BERT-vocabulary tokenizers of the Chinese seq2seq checkpoints, jieba words first.

Two model families ship a BERT ``vocab.txt`` whose entries include whole Chinese words, and a
tokenizer that splits the text into jieba words first:

- **t5-pegasus** (``imxly/t5-pegasus``, ``…-small``; ``MT5ForConditionalGeneration``): a text is
  encoded as ``[CLS] text [SEP]``; the decoder starts from ``[CLS]`` and ends with ``[SEP]``
  (eos); ``[PAD]`` pads. Decoding removes every space (as the original ``.replace(" ", "")``).
- **Randeng-Pegasus** (``IDEA-CCNL/Randeng-Pegasus-*``; ``PegasusForConditionalGeneration``): a
  text is encoded as ``text </s>`` (no ``[CLS]``); ``</s>`` is eos, ``<pad>`` (id 0) pads and
  starts the decoder. Its ``vocab.txt`` is a BERT one: ``</s>`` is the renamed ``[unused1]``
  (id 1), ``<mask_1>``/``<mask_2>`` are ``[unused2]``/``[unused3]``, ``<pad>``/``<unk>`` are
  ``[PAD]``/``[UNK]``. Decoding keeps a space only between two ASCII letters or digits.

A third family uses t5-pegasus's layout with a plain BERT tokenizer (no jieba): **t5-bert**,
UER's Chinese T5 (``uer/t5-small-chinese-cluecorpussmall``; ``T5ForConditionalGeneration``),
``[CLS] text [SEP]``, eos ``[SEP]``, decoder start ``[CLS]``.

Splitting a text, as both originals do: the special tokens written in it (``[SEP]``, ``</s>`` ...)
are kept whole; the rest is lowercased (transformers 4's slow tokenizers lowercased before the
word split when ``do_lower_case``, the default of both) and cut by ``jieba.cut(text,
HMM=False)``; a jieba word found in the vocabulary is one token, any other word goes through
BERT's basic + wordpiece tokenization (the HF ``BertTokenizer`` of the same vocabulary, as
``lib.tokenizer`` loads for BERT checkpoints), which splits Chinese characters and punctuation
and wordpieces the rest.

Which checkpoint gets which (``kind_of``): a directory with a ``vocab.txt`` is Randeng-Pegasus
when its ``config.json`` has ``model_type`` ``pegasus`` or its ``tokenizer_config.json`` names
``PegasusTokenizer``, and t5-pegasus when ``model_type`` is ``mt5`` or the tokenizer class is
``T5PegasusTokenizer``, and t5-bert when ``model_type`` is ``t5``; a character vocabulary saved
by ``lib.tokenizer.CharVocab`` (a scratch model's export) and anything else is not one of these
(``load`` then says so; ``load(..., kind=...)`` overrides the rule). Google's Pegasus, T5 and
mT5 ship SentencePiece files instead of ``vocab.txt``. ``load_seq2seq_tokenizer`` applies the
rule and falls back to ``lib.tokenizer.load_hf_tokenizer``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.data import pad_and_stack
from lib.errors import UserError
from lib.tokenizer import CHAR_VOCAB_KEY, load_hf_tokenizer

VOCAB_FILE = "vocab.txt"


@dataclass(frozen=True)
class Kind:
    """How one family lays out and decodes a text (token names as the original spells them)."""

    # The name of the family, as ``load`` and ``kind_of`` spell it.
    name: str
    # Tokens before and after the text of an encoded source.
    prefix: tuple[str, ...]
    suffix: tuple[str, ...]
    # End of sequence, padding, first decoder input and unknown-word tokens.
    eos: str
    pad: str
    decoder_start: str
    unk: str
    # Special tokens recognised whole inside a text and dropped by skip_special_tokens.
    specials: tuple[str, ...]
    # Names used when the vocabulary holds the BERT token instead (Randeng: </s> is [unused1]).
    aliases: tuple[tuple[str, str], ...]
    # Keep a space between two ASCII words when decoding (else every space goes).
    spaces_between_ascii: bool
    # ``tokenizer_class`` written to tokenizer_config.json by save_pretrained.
    tokenizer_class: str
    # Split the text into jieba words first (False: BERT's tokenization of the whole text).
    jieba: bool = True


KINDS = {
    "t5-pegasus": Kind(
        name="t5-pegasus", prefix=("[CLS]",), suffix=("[SEP]",), eos="[SEP]", pad="[PAD]",
        decoder_start="[CLS]", unk="[UNK]",
        specials=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), aliases=(),
        spaces_between_ascii=False, tokenizer_class="BertTokenizer",
    ),
    "randeng-pegasus": Kind(
        name="randeng-pegasus", prefix=(), suffix=("</s>",), eos="</s>", pad="<pad>",
        decoder_start="<pad>", unk="<unk>",
        specials=("<pad>", "</s>", "<unk>", "<mask_1>", "<mask_2>", "[SEP]", "[CLS]"),
        aliases=(("</s>", "[unused1]"), ("<mask_1>", "[unused2]"), ("<mask_2>", "[unused3]"),
                 ("<pad>", "[PAD]"), ("<unk>", "[UNK]")),
        spaces_between_ascii=True, tokenizer_class="PegasusTokenizer",
    ),
    # UER's Chinese T5 (uer/t5-*-chinese-cluecorpussmall): t5-pegasus's layout, plain BERT.
    "t5-bert": Kind(
        name="t5-bert", prefix=("[CLS]",), suffix=("[SEP]",), eos="[SEP]", pad="[PAD]",
        decoder_start="[CLS]", unk="[UNK]",
        specials=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), aliases=(),
        spaces_between_ascii=False, tokenizer_class="BertTokenizer", jieba=False,
    ),
}

_ASCII_WORD_CHAR = re.compile(r"[0-9A-Za-z]")


def _read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is absent; a broken one is a UserError naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def kind_of(model_dir: str | os.PathLike) -> str | None:
    """``"t5-pegasus"``, ``"randeng-pegasus"``, ``"t5-bert"`` or None for a checkpoint
    directory (the rule is in the module docstring)."""
    path = Path(model_dir)
    if not (path / VOCAB_FILE).is_file():
        return None
    model_type = _read_json(path / "config.json").get("model_type")
    tokenizer_config = _read_json(path / "tokenizer_config.json")
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    if tokenizer_config.get(CHAR_VOCAB_KEY):
        return None
    if model_type == "pegasus" or tokenizer_class == "PegasusTokenizer":
        return "randeng-pegasus"
    if model_type == "mt5" or tokenizer_class == "T5PegasusTokenizer":
        return "t5-pegasus"
    if model_type == "t5":
        return "t5-bert"
    return None


def load(model_dir: str | os.PathLike, kind: str | None = None,
         key: str | None = "model.path") -> JiebaBertTokenizer:
    """The tokenizer of a checkpoint directory's ``vocab.txt``; ``kind`` (a key of KINDS)
    overrides ``kind_of``. Errors name the directory and, with ``key``, the config key."""
    hint = f" (set --config.{key}=DIR)" if key else ""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found{hint}")
    if not (path / VOCAB_FILE).is_file():
        raise UserError(f"{path}: no {VOCAB_FILE} (a t5-pegasus, Randeng-Pegasus or UER T5 "
                        f"checkpoint has one){hint}")
    if kind is None:
        kind = kind_of(path)
        if kind is None:
            raise UserError(
                f"{path}: not a t5-pegasus, Randeng-Pegasus or UER T5 checkpoint (config.json "
                "model_type must be mt5, pegasus or t5, or tokenizer_config.json "
                f"tokenizer_class T5PegasusTokenizer or PegasusTokenizer){hint}")
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer kind {kind!r}: expected one of {sorted(KINDS)}")
    lines = (path / VOCAB_FILE).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lower = _read_json(path / "tokenizer_config.json").get("do_lower_case", True)
    try:
        return JiebaBertTokenizer([t.rstrip("\r") for t in lines], KINDS[kind], bool(lower))
    except ValueError as e:
        raise UserError(f"{path / VOCAB_FILE}: {e}") from None


def load_seq2seq_tokenizer(model_dir: str | os.PathLike, key: str | None = "model.path") -> Any:
    """A seq2seq checkpoint's tokenizer: this module's when ``kind_of`` names a family, else
    the HF tokenizer of the directory (a character vocabulary for a scratch model's export)."""
    if kind_of(model_dir) is not None:
        return load(model_dir, key=key)
    return load_hf_tokenizer(model_dir, key)


class JiebaBertTokenizer:
    """jieba words of a BERT vocabulary, else BERT wordpieces (see the module docstring; the
    t5-bert kind skips the jieba step).

    Answers the calls tasks make on the project's other tokenizers: ``tok(texts,
    max_length=..., truncation=True, padding="max_length", return_tensors="np")``, ``encode``,
    ``decode``, ``batch_decode``, the ``*_token_id`` attributes, ``vocab_size``,
    ``save_pretrained``; plus ``encode_target`` and ``decoder_start_token_id`` for seq2seq.
    """

    padding_side = "right"

    def __init__(self, tokens: Sequence[str], kind: Kind, do_lower_case: bool = True):
        """``tokens``: the lines of vocab.txt (id = position)."""
        from transformers import BertTokenizer

        self.tokens = list(tokens)
        self.kind = kind
        self.do_lower_case = do_lower_case
        self.token_to_id: dict[str, int] = {}
        for i, token in enumerate(self.tokens):
            self.token_to_id.setdefault(token, i)  # a repeated line keeps its first id, as HF
        aliases = dict(kind.aliases)
        self.special_to_id = {}
        for name in kind.specials:
            token = name if name in self.token_to_id else aliases.get(name, name)
            if token in self.token_to_id:
                self.special_to_id[name] = self.token_to_id[token]
        for role in ("eos", "pad", "decoder_start", "unk"):
            name = getattr(kind, role)
            if name not in self.special_to_id:
                also = f" or {aliases[name]!r}" if name in aliases else ""
                raise ValueError(f"the vocabulary lacks {name!r}{also} ({kind.name} {role})")
        self.all_special_ids = sorted(set(self.special_to_id.values()))
        self._special_pattern = re.compile(
            "(" + "|".join(re.escape(s) for s in sorted(self.special_to_id, key=len,
                                                          reverse=True)) + ")")
        # BERT's basic + wordpiece tokenization of this vocabulary, for the words not in it.
        unk_token = next(t for t in (kind.unk, aliases.get(kind.unk)) if t in self.token_to_id)
        self.wordpiece = BertTokenizer(vocab=dict(self.token_to_id), unk_token=unk_token,
                                       do_lower_case=do_lower_case).backend_tokenizer
        self.prefix_ids = [self.special_to_id[t] for t in kind.prefix]
        self.suffix_ids = [self.special_to_id[t] for t in kind.suffix]

    # --- ids of the special tokens ----------------------------------------------------------

    @property
    def eos_token_id(self) -> int:
        """End of sequence: ``[SEP]`` (t5-pegasus) or ``</s>`` (Randeng, id 1)."""
        return self.special_to_id[self.kind.eos]

    @property
    def pad_token_id(self) -> int:
        """Padding: ``[PAD]`` / ``<pad>`` (id 0 in both)."""
        return self.special_to_id[self.kind.pad]

    @property
    def decoder_start_token_id(self) -> int:
        """The decoder's first input: ``[CLS]`` (t5-pegasus) or the pad id (Randeng)."""
        return self.special_to_id[self.kind.decoder_start]

    @property
    def unk_token_id(self) -> int:
        """A wordpiece outside the vocabulary."""
        return self.special_to_id[self.kind.unk]

    @property
    def bos_token_id(self) -> int | None:
        """The first token of an encoded source (``[CLS]``), None for Randeng."""
        return self.prefix_ids[0] if self.prefix_ids else None

    @property
    def vocab_size(self) -> int:
        """Lines of vocab.txt (the model's embedding table must have as many rows)."""
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id (a copy)."""
        return dict(self.token_to_id)

    # --- encoding ---------------------------------------------------------------------------

    def _words(self, text: str) -> list[tuple[str, bool]]:
        """``(piece, is_special)``: the special tokens of ``text`` whole, the rest cut into
        jieba words (lowercased first when ``do_lower_case``)."""
        from lib.metrics import _quiet_jieba

        jieba = _quiet_jieba()
        out: list[tuple[str, bool]] = []
        for i, piece in enumerate(self._special_pattern.split(text)):
            if i % 2:
                out.append((piece, True))
            elif piece:
                piece = piece.lower() if self.do_lower_case else piece
                out += ([(w, False) for w in jieba.cut(piece, HMM=False)] if self.kind.jieba
                        else [(piece, False)])
        return out

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text`` (no special tokens added)."""
        return [self.tokens[i] for i in self._ids(text)]

    def _ids(self, text: str) -> list[int]:
        """Ids of ``text`` without the prefix/suffix tokens."""
        words = self._words(text)
        whole = {w: self.token_to_id[w] for w, special in words
                 if not special and self.kind.jieba and w in self.token_to_id}
        pieces = iter(self._wordpieces([w for w, special in words
                                        if not special and w not in whole]))
        ids: list[int] = []
        for word, special in words:
            if special:
                ids.append(self.special_to_id[word])
            elif word in whole:
                ids.append(whole[word])
            else:
                ids += next(pieces)
        return ids

    def _wordpieces(self, words: list[str]) -> list[list[int]]:
        """BERT's ids of each word. One call on the words joined by spaces: BERT splits at
        whitespace first, so the pieces are those of each word alone; each token goes back to
        its word by its character offset."""
        starts, joined = [], ""
        for word in words:
            starts.append(len(joined))
            joined += word + " "
        encoding = self.wordpiece.encode(joined, add_special_tokens=False)
        out: list[list[int]] = [[] for _ in words]
        k = 0
        for token_id, (start, _) in zip(encoding.ids, encoding.offsets):
            while k + 1 < len(starts) and starts[k + 1] <= start:
                k += 1
            out[k].append(token_id)
        return out

    def encode(self, text: str, add_special_tokens: bool = True,
               max_length: int | None = None) -> list[int]:
        """Ids of a source text: ``[CLS] text [SEP]`` / ``text </s>`` (``add_special_tokens``).
        With ``max_length`` the text is cut so that the whole fits, the special tokens kept."""
        ids = self._ids(text)
        prefix, suffix = (self.prefix_ids, self.suffix_ids) if add_special_tokens else ([], [])
        if max_length is not None:
            budget = max_length - len(prefix) - len(suffix)
            if budget < 0:
                raise ValueError(f"max_length {max_length} < {len(prefix) + len(suffix)} "
                                 "special tokens")
            ids = ids[:budget]
        return prefix + ids + suffix

    def encode_target(self, text: str, max_length: int | None = None) -> list[int]:
        """The ids a decoder must produce for ``text``: its tokens then eos (``summary [SEP]``
        / ``summary </s>``); the decoder's inputs are ``decoder_start_token_id`` followed by
        all of them but the last. ``max_length`` cuts the text, keeping eos."""
        ids = self._ids(text)
        if max_length is not None:
            if max_length < 1:
                raise ValueError(f"max_length {max_length} leaves no room for eos")
            ids = ids[: max_length - 1]
        return ids + [self.eos_token_id]

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        padding_side: str | None = None,
    ) -> dict[str, Any]:
        """Encode one text or a batch as HF tokenizers do: ``input_ids`` and
        ``attention_mask``, numpy int32 ``[batch, length]`` with ``return_tensors="np"``, else
        lists (flat for a single str). ``padding``: False, True/"longest" or "max_length";
        ``truncation``: False or True (the text is cut, the special tokens kept)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        mode = {True: "longest", False: None, "do_not_pad": None}.get(padding, padding)
        if mode not in (None, "longest", "max_length"):
            raise ValueError(f"unknown padding {padding!r}")
        if truncation not in (True, False, "longest_first", "only_first"):
            raise ValueError(f"unknown truncation {truncation!r}")
        if (truncation or mode == "max_length") and max_length is None:
            raise ValueError("truncation and padding='max_length' need max_length")
        limit = max_length if truncation else None
        all_ids = [self.encode(t, add_special_tokens, limit) for t in texts]
        if mode is None and return_tensors is None:
            out: dict[str, Any] = {"input_ids": all_ids,
                                   "attention_mask": [[1] * len(ids) for ids in all_ids]}
        else:
            if mode is None and len(set(map(len, all_ids))) > 1:
                raise ValueError("sequences differ in length: set padding to build an array")
            width = max_length if mode == "max_length" else None
            ids_arr, mask = pad_and_stack(all_ids, width, self.pad_token_id,
                                          padding_side or self.padding_side)
            out = {"input_ids": ids_arr, "attention_mask": mask}
            if return_tensors is None:
                out = {k: v.tolist() for k, v in out.items()}
            elif return_tensors != "np":
                raise ValueError(f'return_tensors must be "np" or None, got {return_tensors!r}')
        if single and return_tensors is None:
            out = {k: v[0] for k, v in out.items()}
        return out

    # --- decoding ---------------------------------------------------------------------------

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Tokens of ids, as vocab.txt spells them."""
        if isinstance(ids, int | np.integer):
            return self.tokens[int(ids)]
        return [self.tokens[int(i)] for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of tokens (special tokens also by their names, e.g. ``"</s>"``); unknown tokens
        give the unk id."""
        def one(token: str) -> int:
            return self.special_to_id.get(token, self.token_to_id.get(token, self.unk_token_id))

        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``: wordpieces joined, spaces removed (Randeng keeps one between
        two ASCII words); ``skip_special_tokens`` drops [PAD], [SEP], </s>, [UNK] ... ."""
        special = set(self.all_special_ids)
        text = ""
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in special:
                continue
            token = self.tokens[i]
            if token.startswith("##") and len(token) > 2:
                text += token[2:]
            elif (self.kind.spaces_between_ascii and text
                  and _ASCII_WORD_CHAR.match(text[-1]) and _ASCII_WORD_CHAR.match(token[0])):
                text += " " + token
            else:
                text += token
        return text

    def batch_decode(self, batch: Iterable[Iterable[int]],
                     skip_special_tokens: bool = False) -> list[str]:
        """``decode`` of each row."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # --- files ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``vocab.txt`` (as read) and a ``tokenizer_config.json`` naming the original's
        tokenizer class and ``do_lower_case``; return the directory."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / VOCAB_FILE, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(t + "\n" for t in self.tokens))
        config = {"tokenizer_class": self.kind.tokenizer_class,
                  "do_lower_case": self.do_lower_case}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                   encoding="utf-8")
        return str(out)
