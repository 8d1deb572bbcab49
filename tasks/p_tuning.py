"""p-tuning: PET (``tasks.pet``) with a learned prompt instead of hand-written words.

The input is ``[CLS] [unused1] ... [unusedN] [MASK] x L text [SEP]``: ``N`` =
``config.model.prompt_tokens`` reserved vocabulary tokens whose embeddings are learned with the
rest of the model (the whole masked LM is fine-tuned), then the label slots, then the text.
Verbalizer, loss, decoding, metrics, predict and export are PET's.

A pretrained BERT vocabulary reserves ``[unused1]`` ... ``[unused99]``; a scratch character
vocabulary gets ``[unused1..N]`` appended as special tokens (``CharVocab.with_specials``).

Two bugs of the original are fixed here: its training inputs had no attention mask that fit
them (the text's own mask, from before the prompt and the slots were inserted), and at
inference it read the slots at positions computed for another layout than the encoded input.
Here each input is encoded whole and masked by its own padding in training, evaluation and
prediction alike, and the slots are found from the ``[MASK]`` tokens of the input ids
(``lib.verbalizer.mask_positions``).
"""

from __future__ import annotations

from lib import config as config_lib
from lib.errors import UserError
from lib.tokenizer import CharVocab
from tasks import pet


def _lora_problem(value, config) -> str | None:
    if value == 0:
        return None
    return ("must be 0: p-tuning learns its prompt tokens' embeddings, which LoRA keeps "
            "frozen (use the pet task for LoRA)")


class Task(pet.Task):
    """p-tuning: ``model.prompt_tokens`` learned tokens, then the slots and the text."""

    RULES = {
        **{k: v for k, v in pet.Task.RULES.items() if k != "data.template"},
        "model.prompt_tokens": config_lib.at_least(1),
        "model.lora.rank": config_lib.Rule(_lora_problem),
    }

    def __init__(self, config):
        super().__init__(config)
        # The reserved tokens of the learned prompt.
        self.prompt_tokens = [f"[unused{i}]" for i in range(1, int(config.model.prompt_tokens) + 1)]

    def template(self) -> str:
        """The slots, then the text (the prompt tokens come first, ``prompt_ids``)."""
        return pet.MASK + pet.TEXT

    def prompt_ids(self, tokenizer) -> list[int]:
        """Ids of ``[unused1]`` ... ``[unusedN]``; a vocabulary without them is an error."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.prompt_tokens if t not in vocab]
        if missing:
            raise UserError(
                f"config.model.prompt_tokens={len(self.prompt_tokens)}: the model's vocabulary "
                f"has no {missing[0]} token (a BERT vocabulary reserves [unused1]..[unused99])"
            )
        return [vocab[t] for t in self.prompt_tokens]

    def char_vocab(self) -> CharVocab:
        """The scratch character vocabulary with the prompt tokens reserved."""
        return super().char_vocab().with_specials(self.prompt_tokens)
