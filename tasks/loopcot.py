"""LoopCoT: fine-tune one model on poem generation *and* its inverse, appreciation.

The data, prompts and mixes are ``tasks.poetry``'s: a run trains on the examples of one mix
(``config.data.mix``) with the causal-LM machinery of ``tasks.sft`` (loss on the answer and
EOS). The experiment compares mixes: ``configs/loopcot.py`` declares a sweep
(``lib.sweep``) with one run per mix, which trains each, re-evaluates each test part's best
checkpoint ``sweep.repeats`` times with different sampling keys, and prints the table of
mean ± std.

Evaluation of a test part: sampled decoding (top_p 0.8, temperature 0.8 by default) of every
test prompt, then ROUGE-1/2/L (jieba words) and BLEU-4 (characters), x100, as
``<part>/<metric>``; ``rouge-1`` is their mean over the parts (the trainer's best checkpoint).

The original's bug: training used the bare prompt while inference wrapped it in ChatGLM's chat
template ``[Round 1]\\n\\n问：{prompt}\\n\\n答：``, so the model was evaluated on prompts it never
saw. Here both use the bare prompt; ``data.chat_template_at_inference=True`` brings the old
behaviour back (inference prompts wrapped) for comparison with the reported numbers.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from lib import config as config_lib
from lib import lm_data
from lib import metrics as metrics_lib
from lib.data import ArrayDataset, json_object_or_none
from tasks import sft
from tasks.poetry import (
    MIXES,
    PARTS,
    PoetryData,
    appreciation_prompt,
    chat_wrap,
    generation_prompt,
    parse_mix,
)

__all__ = ["LoopEval", "PoetryData", "Task", "appreciation_prompt", "generation_prompt"]


class LoopEval:
    """The test parts of a run: prompts (as decoded, chat-wrapped or not) and references."""

    def __init__(self, parts: dict[str, list[tuple[str, str]]], tokenizer: Any, wrap: bool):
        self.tokenizer = tokenizer
        self.prompts = {p: [chat_wrap(q) if wrap else q for q, _ in v] for p, v in parts.items()}
        self.references = {p: [a for _, a in v] for p, v in parts.items()}

    @property
    def parts(self) -> tuple[str, ...]:
        """Test part names, in ``PARTS`` order."""
        return tuple(p for p in PARTS if p in self.prompts)


class Task(sft.Task):
    """Bidirectional poetry fine-tuning (the causal-LM machinery is ``tasks.sft``'s)."""

    RULES = {
        **{k: v for k, v in sft.Task.RULES.items() if k != "eval.max_new_tokens"},
        "data.mix": config_lib.one_of(*MIXES),
        "data.extra_generation": config_lib.data_file(optional=True),
        "data.theme_file": config_lib.data_file(optional=True),
        "data.summary_chars": config_lib.at_least(1),
        "data.test_size": config_lib.at_least(0),
        "eval.max_new_tokens.generation": config_lib.at_least(1),
        "eval.max_new_tokens.appreciation": config_lib.at_least(1),
        "eval.seed": config_lib.at_least(0),
    }

    # --- data -----------------------------------------------------------------------------

    def vocab_texts(self) -> list[str]:
        """All mixes' training texts: every run (and the untrained model) shares one vocab."""
        return PoetryData(self.config).all_texts()

    def eval_set(self, tokenizer, parts: tuple[str, ...] | None = None) -> LoopEval:
        """A ``LoopEval`` of ``parts`` (default: the test parts of ``data.mix``)."""
        parts = parse_mix(self.config.data.mix)[1] if parts is None else parts
        data = PoetryData(self.config)
        return LoopEval(
            data.test_parts(parts), tokenizer, bool(self.config.data.chat_template_at_inference)
        )

    def datasets(self, tokenizer):
        """The training examples of ``data.mix`` and its test parts."""
        mix = self.config.data.mix
        pairs = PoetryData(self.config).train_examples(mix)
        train = ArrayDataset(self.arrays(tokenizer, pairs), name=f"{mix} training examples")
        return train, self.eval_set(tokenizer)

    # --- evaluation -----------------------------------------------------------------------

    def max_new_tokens(self, part: str) -> int:
        """Decoding budget of a part (``generation_summary`` decodes poems, as generation)."""
        budget = self.config.eval.max_new_tokens
        return int(budget.appreciation if part == "appreciation" else budget.generation)

    def decode_part(self, model, eval_data: LoopEval, part: str, repeat: int,
                    samples: int = 1) -> list[str]:
        """``samples`` sampled answers to each of a part's prompts, prompt by prompt (one
        prefill per prompt); the key depends on (eval.seed, repeat, part)."""
        key = jax.random.fold_in(jax.random.key(int(self.config.eval.seed)), repeat)
        key = jax.random.fold_in(key, PARTS.index(part))
        return lm_data.generate_answers(
            model, eval_data.tokenizer, eval_data.prompts[part], rng=key,
            max_new_tokens=self.max_new_tokens(part), num_return_sequences=samples,
            **self.decode_settings(),
        )

    def scores(self, eval_data: LoopEval, part: str, outputs: list[str]) -> dict[str, float]:
        """ROUGE-1/2/L and BLEU-4 (x100) of a part's ``outputs``."""
        refs = eval_data.references[part]
        scores = metrics_lib.rouge_zh(outputs, refs)
        scores["bleu-4"] = metrics_lib.bleu4_chars(outputs, refs)
        return scores

    def evaluate(self, model, eval_data: LoopEval, repeat: int = 0):
        """ROUGE-1/2/L and BLEU-4 (x100) of every test part as ``part/metric``, and
        ``rouge-1``: their mean over parts (what picks the trainer's best checkpoint).
        ``repeat`` selects the sampling keys."""
        outputs = {p: self.decode_part(model, eval_data, p, repeat) for p in eval_data.parts}
        return self.report(eval_data, outputs)

    def evaluate_repeats(self, model, eval_data: LoopEval, repeats: int):
        """The sweep's ``repeats`` evaluations from one decoding pass per part: every prompt is
        prefilled once and sampled ``repeats`` times (``num_return_sequences``), with the key
        ``fold_in(fold_in(key(eval.seed), repeats), part)``; evaluation ``r`` scores each
        prompt's ``r``-th answer."""
        outputs = {}
        for part in eval_data.parts:
            t0 = time.perf_counter()
            outputs[part] = self.decode_part(model, eval_data, part, repeats, samples=repeats)
            print(f"    {part}: {repeats} answers to each of {len(eval_data.prompts[part])} "
                  f"prompts ({time.perf_counter() - t0:.0f}s)", flush=True)
        for r in range(repeats):
            yield self.report(eval_data, {p: texts[r::repeats] for p, texts in outputs.items()})

    def report(self, eval_data: LoopEval, outputs: dict[str, list[str]]):
        """``(metrics, samples)`` of every part's outputs: ``part/metric`` scores, ``rouge-1``
        (their mean over parts) and the first ``eval.num_samples`` outputs of each part."""
        out: dict[str, float] = {}
        samples = []
        for part in eval_data.parts:
            out.update({f"{part}/{m}": v for m, v in self.scores(eval_data, part,
                                                                 outputs[part]).items()})
            for prompt, ref, output in list(
                zip(eval_data.prompts[part], eval_data.references[part], outputs[part])
            )[: int(self.config.eval.num_samples)]:
                samples.append({"part": part, "prompt": prompt, "reference": ref,
                                "output": output})
        out["rouge-1"] = float(np.mean([out[f"{p}/rouge-1"] for p in eval_data.parts]))
        return out, samples

    # --- inference ------------------------------------------------------------------------

    def predict(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        """Sampled answers. A line is a JSON object ``{"theme", "form"}`` (generation) or
        ``{"poem"}`` (appreciation), or a prompt used as is."""
        prompts, parts = [], []
        for text in inputs:
            record = json_object_or_none(text) or {}
            if "poem" in record:
                prompts.append(appreciation_prompt(str(record["poem"])))
                parts.append("appreciation")
            elif "theme" in record:
                prompts.append(generation_prompt(str(record["theme"]),
                                                 str(record.get("form", "5言绝句"))))
                parts.append("generation")
            else:
                prompts.append(text)
                parts.append("generation")
        if self.config.data.chat_template_at_inference:
            prompts = [chat_wrap(p) for p in prompts]
        outputs = [""] * len(prompts)
        for part in sorted(set(parts)):
            rows = [i for i, p in enumerate(parts) if p == part]
            key = jax.random.fold_in(jax.random.key(int(self.config.eval.seed)), PARTS.index(part))
            texts = lm_data.generate_answers(
                model, tokenizer, [prompts[i] for i in rows], rng=key,
                max_new_tokens=self.max_new_tokens(part), **self.decode_settings(),
            )
            for i, text in zip(rows, texts):
                outputs[i] = text
        return [
            {"input": t, "part": p, "output": o} for t, p, o in zip(inputs, parts, outputs)
        ]
