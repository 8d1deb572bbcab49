"""PET: few-shot classification as filling in a prompt with a BERT-family masked LM.

Each text goes into a hand-written template, ``config.data.template`` (the original's
``这是一条{MASK}评论：{textA}。``): ``{textA}`` is the text, ``{MASK}`` becomes ``L``
``[MASK]`` tokens, ``L`` the token length of the longest label word. The label word of a class
is its name (``config.data.labels``). The input is ``[CLS] template [SEP]``.

Loss: cross-entropy of the masked LM's logits at the ``[MASK]`` slots against the label word's
tokens (``lib.verbalizer``). Decode: the argmax token at each slot; the label whose word they
spell, else the label with the longest common substring (the earlier label on ties). Metrics:
accuracy, weighted precision / recall / F1 (best checkpoint by ``f1``), macro F1 and per-class
F1; each evaluation prints ``Each Class Metrics are: {...}``.

The model is built through the registry (``lib.models.build``, head ``masked_lm``): the
checkpoint of ``model.path`` (BERT/ERNIE with its MLM head), or a scratch ``model.family``
masked LM with a character vocabulary of the training data. ``tasks.p_tuning`` is this task
with learned prompt tokens instead of the hand-written words.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import config as config_lib
from lib import metrics as metrics_lib
from lib import verbalizer as verbalizer_lib
from lib.data import ArrayDataset, pad_and_stack, read_tsv
from lib.errors import UserError
from tasks import base
from tasks.classification import EvalSet, read_labels

MASK, TEXT = "{MASK}", "{textA}"
_PLACEHOLDER = re.compile(r"(\{MASK\}|\{textA\})")


def template_problem(value, config) -> str | None:
    """What is wrong with a template (``{MASK}`` and ``{textA}`` exactly once each), or None."""
    if not isinstance(value, str):
        return "must be a string"
    counts = {p: value.count(p) for p in (MASK, TEXT)}
    if counts != {MASK: 1, TEXT: 1}:
        return "must hold {MASK} and {textA} once each (e.g. 这是一条{MASK}评论：{textA}。)"
    return None


def read_examples(path: str, labels: list[str], key: str) -> list[dict]:
    """``label \\t text`` records (the label by name); an unknown label names file:line."""

    def check(row: dict) -> str | None:
        if row["label"] not in labels:
            return (f"label {row['label']!r} is not one of {', '.join(labels)} "
                    "(the names of --config.data.labels)")
        return None

    return read_tsv(path, ["label", "text"], key=key, check=check)


class Task(base.Task):
    """PET: a hand-written template, label words = label names."""

    RULES = {
        **base.Task.RULES,
        "data.test": config_lib.data_file(optional=True, modes=("train",)),
        "data.labels": config_lib.data_file(modes=config_lib.MODES),
        "data.max_length": config_lib.at_least(4),
        "data.template": config_lib.Rule(template_problem),
    }

    def __init__(self, config):
        super().__init__(config)
        self.labels = read_labels(config.data.labels)
        self.max_length = int(config.data.max_length)
        self.eval_batch_size = int(config.eval.batch_size)
        # Set by ``build`` (they need the tokenizer): label words, the [MASK] id and the
        # prompt's token ids.
        self.verbalizer: verbalizer_lib.Verbalizer | None = None
        self.mask_id: int | None = None
        self.prompt: list[int] = []

    # --- the prompt (what p-tuning changes) -----------------------------------------------

    def template(self) -> str:
        """The template: words around ``{MASK}`` and ``{textA}``."""
        return self.config.data.template

    def prompt_ids(self, tokenizer) -> list[int]:
        """Token ids put between ``[CLS]`` and the template (none: PET's prompt is words)."""
        return []

    # --- model and data -------------------------------------------------------------------

    def build(self):
        """``(model, tokenizer)``: a masked LM (``model.path``, or scratch with a character
        vocabulary), and the verbalizer of the labels under its tokenizer."""
        built = self.build_model("masked_lm", max_length=self.max_length)
        tokenizer = built.tokenizer
        if tokenizer.mask_token_id is None:
            raise UserError("the model's tokenizer has no [MASK] token (check config.model.path)")
        self.mask_id = int(tokenizer.mask_token_id)
        self.verbalizer = verbalizer_lib.Verbalizer(self.labels, tokenizer)
        self.prompt = self.prompt_ids(tokenizer)
        return built.model, tokenizer

    def vocab_texts(self) -> list[str]:
        """The training texts in their template with the label word at ``{MASK}`` (a scratch
        model's characters: the texts', the template's and the label words')."""
        rows = read_examples(self.config.data.train, self.labels, "data.train")
        return [self.template().replace(MASK, r["label"]).replace(TEXT, r["text"])
                for r in rows]

    def encode(self, tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
        """``[CLS] prompt template [SEP]`` of each text, padded to ``data.max_length``; a text
        is cut to what the rest leaves. A ``[MASK]`` the text itself holds becomes ``[UNK]``
        (the slots are found by their token)."""
        parts: list[list[int] | str] = [self.prompt]
        for piece in _PLACEHOLDER.split(self.template()):
            if piece in (MASK, TEXT):
                parts.append(piece)
            elif piece:
                parts.append(list(tokenizer.encode(piece, add_special_tokens=False)))
        slots = [self.mask_id] * self.verbalizer.length
        fixed = 2 + len(slots) + sum(len(p) for p in parts if not isinstance(p, str))
        budget = self.max_length - fixed
        if budget < 1:
            raise UserError(
                f"config.data.max_length={self.max_length} leaves no room for the text: the "
                f"prompt, {len(slots)} [MASK] slots and [CLS]/[SEP] take {fixed} tokens"
            )
        unk = int(tokenizer.unk_token_id)
        rows = []
        for text in texts:
            ids = [unk if i == self.mask_id else int(i)
                   for i in tokenizer.encode(text, add_special_tokens=False)[:budget]]
            row = [int(tokenizer.cls_token_id)]
            for part in parts:
                row += slots if part == MASK else ids if part == TEXT else part
            rows.append(row + [int(tokenizer.sep_token_id)])
        input_ids, attention_mask = pad_and_stack(rows, self.max_length,
                                                  int(tokenizer.pad_token_id))
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": np.zeros_like(input_ids)}

    def _dataset(self, tokenizer, key: str) -> EvalSet:
        path = config_lib.lookup(self.config, key)
        rows = read_examples(path, self.labels, key)
        texts = [r["text"] for r in rows]
        arrays = self.encode(tokenizer, texts)
        arrays["labels"] = np.asarray([self.labels.index(r["label"]) for r in rows], np.int32)
        return EvalSet(ArrayDataset(arrays, name=path), texts)

    def datasets(self, tokenizer):
        """A train ``ArrayDataset`` (``data.train``) and an ``EvalSet`` (``data.eval``)."""
        return self._dataset(tokenizer, "data.train").data, self._dataset(tokenizer, "data.eval")

    def test_dataset(self, tokenizer) -> EvalSet | None:
        """``data.test`` (empty: none), scored on the best checkpoint after training."""
        return self._dataset(tokenizer, "data.test") if self.config.data.test else None

    # --- training and evaluation ----------------------------------------------------------

    def slot_logits(self, model, batch, rngs=None) -> jax.Array:
        """The masked LM's logits at the ``[MASK]`` slots, ``[b, L, vocab]`` (fp32); the slots
        are found in ``input_ids``, the padding masked out of attention."""
        slots = verbalizer_lib.mask_positions(batch["input_ids"], self.mask_id,
                                              self.verbalizer.length)
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], rngs=rngs, logits_at=slots)

    def loss(self, model, batch, rng):
        """Slot cross-entropy against the label words; ``aux``: the fraction of examples whose
        argmax slot tokens spell their label word."""
        rngs = None if rng is None else nnx.Rngs(dropout=rng)
        logits = self.slot_logits(model, batch, rngs)
        targets = self.verbalizer.targets(batch["labels"])
        exact = jnp.all(jnp.argmax(logits, -1) == targets, axis=-1)
        return verbalizer_lib.mask_loss(logits, targets), {
            "accuracy": jnp.mean(exact.astype(jnp.float32))}

    def slot_tokens(self, model, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Argmax token ids at the slots of every row of ``arrays``, ``[n, L]``."""
        forward = nnx.jit(lambda m, b: jnp.argmax(self.slot_logits(m, b), -1))
        data = ArrayDataset({k: v for k, v in arrays.items() if k != "labels"}, name="prompts")
        return data.map_eval(lambda b: forward(model, b), self.eval_batch_size)

    def evaluate(self, model, eval_data: EvalSet, repeat: int = 0):
        """Accuracy, weighted P/R/F1, macro F1 and per-class F1, printing the per-class
        metrics; 8 samples (deterministic: ``repeat`` changes nothing)."""
        slot_ids = self.slot_tokens(model, eval_data.data.arrays)
        pred = self.verbalizer.decode(slot_ids)
        gold = eval_data.data.arrays["labels"]
        report = metrics_lib.classification_report(gold, pred, self.labels)
        per_class = {name: {k: round(v, 4) for k, v in m.items() if k != "support"}
                     for name, m in report["per_class"].items()}
        if jax.process_index() == 0:
            print("Each Class Metrics are: " + json.dumps(per_class, ensure_ascii=False),
                  flush=True)
        out = {"accuracy": report["accuracy"], "precision": report["weighted_precision"],
               "recall": report["weighted_recall"], "f1": report["weighted_f1"],
               "macro_f1": report["macro_f1"]}
        out.update({f"f1/{name}": m["f1"] for name, m in report["per_class"].items()})
        samples = [{"text": t[:80], "label": self.labels[g], "pred": self.labels[p],
                    "word": self.verbalizer.word(ids)}
                   for t, g, p, ids in zip(eval_data.texts[:8], gold[:8], pred[:8], slot_ids)]
        return out, samples

    # --- inference ------------------------------------------------------------------------

    def predict(self, model, tokenizer, texts: list[str]) -> list[dict]:
        """The label of each text, and the word the masked LM wrote in the slots."""
        slot_ids = self.slot_tokens(model, self.encode(tokenizer, texts))
        pred = self.verbalizer.decode(slot_ids)
        return [{"text": t, "label": self.labels[p], "word": self.verbalizer.word(ids)}
                for t, p, ids in zip(texts, pred, slot_ids)]

    def export(self, model, tokenizer, out_dir: str) -> None:
        """An HF ``BertForMaskedLM`` / ``ErnieForMaskedLM`` directory (the prompt and the
        label words are the config's; the model is a plain masked LM)."""
        self.export_model(model, out_dir)
