"""The ChatGLM2/3 tokenizer, read from a checkpoint's ``tokenizer.model`` (SentencePiece).

THUDM ship this tokenizer as Python code next to the weights; we never run that code. The
behaviour reimplemented here: text is encoded by the SentencePiece model alone, five special
tokens follow the SentencePiece vocabulary (``[MASK] [gMASK] [sMASK] sop eop``: ids 64789..64793
in ChatGLM2), every prompt starts with ``[gMASK] sop``, ``eos`` is the SentencePiece ``</s>``
and padding uses the ``<unk>`` id (0), on the left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lib.errors import UserError

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


class ChatGLMTokenizer:
    """SentencePiece encode/decode with ChatGLM's ``[gMASK] sop`` prefix and chat template."""

    def __init__(self, model_file: str | os.PathLike):
        path = Path(model_file)
        if not path.is_file():
            raise UserError(
                f"{path} is missing: a ChatGLM2/3 checkpoint directory holds its SentencePiece "
                "tokenizer.model next to config.json"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.model_file = path
        n = self.sp.vocab_size()
        self.special_ids = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.eos_token_id = self.sp.eos_id()
        self.bos_token_id = self.sp.bos_id()
        self.pad_token_id = self.sp.unk_id()

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> ChatGLMTokenizer:
        """The tokenizer of a checkpoint directory (its ``tokenizer.model``)."""
        return cls(Path(model_dir) / "tokenizer.model")

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Copy ``tokenizer.model`` into ``directory`` (an exported model's tokenizer)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if (out / "tokenizer.model").resolve() != self.model_file.resolve():
            shutil.copy(self.model_file, out / "tokenizer.model")
        return str(out)

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the special tokens (the model's table may be larger)."""
        return self.sp.vocab_size() + len(SPECIAL_TOKENS)

    @property
    def prefix_ids(self) -> list[int]:
        """``[gMASK] sop``: the start of every ChatGLM2/3 input."""
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, after the ``[gMASK] sop`` prefix unless told otherwise."""
        ids = self.sp.encode(text)
        return self.prefix_ids + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special, eos, bos and pad ids are dropped (as ChatGLM2 does)."""
        n = self.sp.vocab_size()
        drop = {self.eos_token_id, self.bos_token_id, self.pad_token_id}
        pieces = [int(i) for i in ids if 0 <= int(i) < n]
        if skip_special_tokens:
            pieces = [i for i in pieces if i not in drop]
        return self.sp.decode(pieces)

    @staticmethod
    def build_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """ChatGLM2's chat format: ``[Round k]\\n\\n问：{q}\\n\\n答：{a}\\n\\n`` per past turn
        (rounds count from 1), then the open round of ``query``."""
        prompt = ""
        for i, (old_query, response) in enumerate(history, 1):
            prompt += f"[Round {i}]\n\n问：{old_query}\n\n答：{response}\n\n"
        return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def encode_chat(self, query: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Ids of the chat prompt for ``query`` (with the ``[gMASK] sop`` prefix)."""
        return self.encode(self.build_prompt(query, history))

    def batch(self, seqs: Sequence[Sequence[int]], length: int | None = None) -> dict:
        """Left-pad id lists to ``length`` (default: the longest) as numpy ``input_ids`` and
        ``attention_mask`` ``[b, length]`` int32 (truncation is the caller's choice)."""
        longest = max(len(s) for s in seqs)
        length = length or longest
        if longest > length:
            raise ValueError(f"a sequence of {longest} ids does not fit in length {length}")
        ids = np.full((len(seqs), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(seqs), length), np.int32)
        for row, seq in enumerate(seqs):
            if seq:
                ids[row, -len(seq) :] = seq
                mask[row, -len(seq) :] = 1
        return {"input_ids": ids, "attention_mask": mask}
