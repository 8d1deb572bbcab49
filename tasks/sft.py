"""Supervised fine-tuning of a decoder LM on (prompt, answer) records.

Data: a JSON array or a JSONL file (``.jsonl``) of ``{"prompt", "answer"}`` records, or of
alpaca records ``{"instruction", "input", "output"}`` (``input`` may be missing or empty),
which become ``prompt = ALPACA_TEMPLATE.format(instruction, input)`` and ``answer = output``;
or a ``.tsv`` of ``label \t text`` lines, each text a plain language-model example (no prompt;
with ``data.loss_mode="unmasked"`` this is pretraining on the texts).
Examples and the loss come from ``lib.lm_data``: prompt + answer + EOS, the loss on the
answer and EOS (``loss_mode="masked"``) or on the whole sequence (``"unmasked"``), padding
never counted.

Model: any decoder port of ``lib.models`` from an HF directory (``config.model.path``: Qwen2,
Llama, GLM/ChatGLM2/3, GPT-2; the port is read from its ``config.json``), or a small
``model.family`` decoder trained from scratch with a character vocabulary (``model.path =
""``). ``config.model.lora.rank > 0`` trains LoRA adapters only, ``model.prefix.length > 0`` a
p-tuning v2 prefix only.

Evaluation: token-level loss and perplexity of the answers of the eval file (the trained
targets, so ``masked`` and ``unmasked`` runs are compared on the same tokens: the answers),
plus a few greedy generations as samples.

This module is also the base of ``tasks.loopcot``, which changes only the data and the
evaluation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lib import config as config_lib
from lib import hf, lm_data
from lib.data import ArrayDataset, json_object_or_none, read_json, read_jsonl, read_tsv
from lib.errors import UserError
from tasks import base

# The recorded template is "You are an AI assistant. … Instruction:{instruction}.\nInput:{input}
# \nOutput: {output}"; its elided middle is not recorded, this sentence fills it.
ALPACA_TEMPLATE = (
    "You are an AI assistant. Follow the instruction, using the input if there is one.\n"
    "Instruction:{instruction}.\nInput:{input}\nOutput: "
)


def alpaca_prompt(record: dict, template: str = ALPACA_TEMPLATE) -> str:
    """The prompt of an alpaca record (the answer, ``output``, follows ``Output: ``)."""
    return template.format(instruction=record["instruction"], input=record.get("input") or "")


def read_records(path: str, key: str) -> list[dict]:
    """Records of a JSON array or JSONL file (by extension), checked for the needed fields."""
    reader = read_jsonl if str(path).endswith(".jsonl") else read_json
    records = reader(path, {}, key=key)
    if not records:
        raise UserError(f"{path}: no records (--config.{key})")
    if "instruction" in records[0]:
        records = reader(path, {"instruction": str, "output": str}, key=key)
        for i, r in enumerate(records):
            if not isinstance(r.get("input", ""), str | None):
                raise UserError(f'{path}: record [{i}]: field "input" must be a string')
    else:
        records = reader(path, {"prompt": str, "answer": str}, key=key)
    return records


def read_pairs(path: str, key: str, template: str = ALPACA_TEMPLATE) -> list[tuple[str, str]]:
    """``(prompt, answer)`` texts of a data file (alpaca records through ``template``). A
    ``.tsv`` file of ``label \t text`` lines (the classification format) gives plain
    language-model examples: an empty prompt and the text as the answer."""
    if str(path).endswith(".tsv"):
        return [("", r["text"]) for r in read_tsv(path, ("label", "text"), key=key)]
    out = []
    for r in read_records(path, key):
        if "instruction" in r:
            out.append((alpaca_prompt(r, template), r["output"]))
        else:
            out.append((r["prompt"], r["answer"]))
    return out


class SftEval:
    """What ``evaluate`` needs: the eval examples as arrays, and a few prompts to decode."""

    def __init__(self, data: ArrayDataset, pairs: list[tuple[str, str]], tokenizer: Any):
        self.data = data
        self.pairs = pairs
        self.tokenizer = tokenizer


class Task(base.Task):
    """Causal-LM fine-tuning on (prompt, answer) pairs."""

    RULES = {
        **base.Task.RULES,
        "data.loss_mode": config_lib.one_of("masked", "unmasked"),
        "data.max_length": config_lib.at_least(2),
        "data.max_prompt_length": config_lib.at_least(1),
        "data.prompt_tail": config_lib.at_least(0),
        "eval.num_samples": config_lib.at_least(0),
        "eval.max_new_tokens": config_lib.at_least(1),
        "eval.temperature": config_lib.above(0),
        "eval.top_p": config_lib.interval(0, 1, low_open=True, high_open=False),
        "eval.top_k": config_lib.at_least(0),
    }

    # --- model and tokenizer --------------------------------------------------------------

    def build(self):
        """``(model, tokenizer)``: the checkpoint of ``model.path`` (any decoder port), else a
        scratch ``model.family`` decoder with a character vocabulary of the training data;
        LoRA or a p-tuning v2 prefix as ``config.model`` says."""
        built = self.build_model("causal_lm", max_length=int(self.config.data.max_length))
        return built.model, built.tokenizer

    def vocab_texts(self) -> list[str]:
        """Texts the scratch character vocabulary is built from: the training pairs."""
        return [p + a for p, a in read_pairs(self.config.data.train, "data.train", self.template)]

    @property
    def template(self) -> str:
        """The alpaca prompt template in use."""
        return self.config.data.template or ALPACA_TEMPLATE

    # --- data -----------------------------------------------------------------------------

    def arrays(self, tokenizer, pairs: list[tuple[str, str]], loss_mode: str | None = None):
        """Training arrays of ``pairs`` with the lengths of ``config.data``."""
        d = self.config.data
        return lm_data.build_arrays(
            tokenizer, pairs, max_length=int(d.max_length),
            max_prompt_length=int(d.max_prompt_length), prompt_tail=int(d.prompt_tail),
            loss_mode=loss_mode or d.loss_mode,
        )

    def datasets(self, tokenizer):
        """Train ``ArrayDataset`` and an ``SftEval`` from ``data.train`` / ``data.eval``."""
        config = self.config
        train_pairs = read_pairs(config.data.train, "data.train", self.template)
        eval_pairs = read_pairs(config.data.eval, "data.eval", self.template)
        train = ArrayDataset(self.arrays(tokenizer, train_pairs), name=config.data.train)
        # Eval perplexity is on the answers in both loss modes: comparable across modes.
        eval_arrays = self.arrays(tokenizer, eval_pairs, loss_mode="masked")
        evald = SftEval(ArrayDataset(eval_arrays, name=config.data.eval), eval_pairs, tokenizer)
        return train, evald

    # --- loss and evaluation --------------------------------------------------------------

    def loss(self, model, batch, rng):
        """Token-mean cross-entropy over the targets (``lib.lm_data.lm_loss``)."""
        return lm_data.lm_loss(model, batch, rng)

    def decode_settings(self, greedy: bool = False) -> dict:
        """Keyword arguments of ``lm_data.generate_answers`` from ``config.data`` /
        ``config.eval``."""
        d, e = self.config.data, self.config.eval
        return dict(
            max_prompt_length=int(d.max_prompt_length), prompt_tail=int(d.prompt_tail),
            batch_size=int(e.batch_size), do_sample=not greedy and bool(e.do_sample),
            temperature=float(e.temperature), top_p=float(e.top_p), top_k=int(e.top_k),
            extra_stops=hf.generation_eos_ids(self.config.model.path),
        )

    def evaluate(self, model, eval_data: SftEval, repeat: int = 0):
        """Answer loss and perplexity on the eval file; greedy generations as samples
        (deterministic: ``repeat`` changes nothing)."""
        nll_sum, count = 0.0, 0.0
        for batch in eval_data.data.eval_batches(int(self.config.eval.batch_size)):
            valid = batch.pop(ArrayDataset.VALID)
            nll, n = lm_data.row_nll(model, batch)
            nll_sum += float(np.sum(nll[valid]))
            count += float(np.sum(n[valid]))
        loss = nll_sum / max(count, 1.0)
        shown = eval_data.pairs[: int(self.config.eval.num_samples)]
        outputs = lm_data.generate_answers(
            model, eval_data.tokenizer, [p for p, _ in shown],
            max_new_tokens=int(self.config.eval.max_new_tokens), **self.decode_settings(True),
        )
        samples = [
            {"prompt": p[-80:], "reference": a, "output": o}
            for (p, a), o in zip(shown, outputs)
        ]
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
        return metrics, samples

    # --- inference and export -------------------------------------------------------------

    def predict(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        """Greedy answers; an input line is an instruction, or a JSON alpaca/prompt record."""
        prompts = []
        for text in inputs:
            record = json_object_or_none(text) or {}
            if "instruction" in record:
                prompts.append(alpaca_prompt(record, self.template))
            elif "prompt" in record:
                prompts.append(str(record["prompt"]))
            else:
                prompts.append(alpaca_prompt({"instruction": text}, self.template))
        outputs = lm_data.generate_answers(
            model, tokenizer, prompts, max_new_tokens=int(self.config.eval.max_new_tokens),
            **self.decode_settings(greedy=True),
        )
        return [{"input": t, "output": o} for t, o in zip(inputs, outputs)]

    def export(self, model, tokenizer, out_dir: str) -> None:
        """An HF directory of the model. A LoRA run writes, as ``model.lora.export`` says, a
        PEFT adapter directory for the base (``model.hub_id``, else ``model.path``) or the
        base with the adapters merged in (an HF directory like a full fine-tune's)."""
        self.export_model(model, out_dir)
