"""Supervised fine-tuning of a decoder LM on (prompt, answer) records (SEEDS.md §4).

Data: a JSON array or a JSONL file (``.jsonl``) of ``{"prompt", "answer"}`` records, or of
alpaca records ``{"instruction", "input", "output"}`` (``input`` may be missing or empty),
which become ``prompt = ALPACA_TEMPLATE.format(instruction, input)`` and ``answer = output``.
Examples and the loss come from ``lib.lm_data``: prompt + answer + EOS, the loss on the
answer and EOS (``loss_mode="masked"``) or on the whole sequence (``"unmasked"``), padding
never counted.

Model: Qwen2 or GLM/ChatGLM2 from an HF directory (``config.model.path``; the family is read
from its ``config.json``), or a small Qwen2 trained from scratch with a character vocabulary
(``model.path = ""``). ``config.model.lora.rank > 0`` trains LoRA adapters only.

Evaluation: token-level loss and perplexity of the answers of the eval file (the trained
targets, so ``masked`` and ``unmasked`` runs are compared on the same tokens: the answers),
plus a few greedy generations as samples.

This module is also the base of ``tasks.loopcot``, which changes only the data, the
evaluation and adds the experiment driver.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lib import hf, lm_data
from lib.data import ArrayDataset, json_object_or_none, read_json, read_jsonl
from lib.errors import UserError
from lib.generate import generate
from lib.models import glm, qwen2
from lib.tokenizer import CharVocab, load_hf_tokenizer

TOKENIZER_DIR = "tokenizer"

# SEEDS.md §4 records the template as "You are an AI assistant. … Instruction:{instruction}.
# \nInput:{input}\nOutput: {output}"; the elided middle is not recorded, this sentence fills it.
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
    """``(prompt, answer)`` texts of a data file (alpaca records through ``template``)."""
    out = []
    for r in read_records(path, key):
        if "instruction" in r:
            out.append((alpaca_prompt(r, template), r["output"]))
        else:
            out.append((r["prompt"], r["answer"]))
    return out


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
) -> list[str]:
    """Decode an answer for every prompt, in fixed-shape batches (one compilation).

    An answer ends at the tokenizer's EOS or at an ``extra_stops`` id. The last batch is
    filled up with copies of the last prompt (their outputs are dropped). Batch ``i`` samples
    with ``fold_in(rng, i)``, so a given ``rng`` gives the same texts.
    """
    if not prompts:
        return []
    ids, mask = lm_data.prompt_arrays(
        tokenizer, prompts, max_prompt_length=max_prompt_length, prompt_tail=prompt_tail
    )
    n = len(prompts)
    total = -(-n // batch_size) * batch_size
    fill = np.minimum(np.arange(total), n - 1)
    ids, mask = ids[fill], mask[fill]
    rng = jax.random.key(0) if rng is None else rng
    stops = list(dict.fromkeys([lm_data.eos_id(tokenizer), *(int(i) for i in extra_stops)]))
    out: list[str] = []
    for i, start in enumerate(range(0, total, batch_size)):
        rows = slice(start, start + batch_size)
        tokens = generate(
            model, ids[rows], mask[rows], max_new_tokens=max_new_tokens,
            rng=jax.random.fold_in(rng, i), do_sample=do_sample, temperature=temperature,
            top_p=top_p, top_k=top_k, eos_token_id=stops, pad_token_id=lm_data.pad_id(tokenizer),
        )
        out.extend(lm_data.decode_answer(tokenizer, row, extra_stops) for row in tokens)
    return out[:n]


class SftEval:
    """What ``evaluate`` needs: the eval examples as arrays, and a few prompts to decode."""

    def __init__(self, data: ArrayDataset, pairs: list[tuple[str, str]], tokenizer: Any):
        self.data = data
        self.pairs = pairs
        self.tokenizer = tokenizer


def _family(model_dir: str) -> str:
    """``"qwen2"`` or ``"glm"`` from the ``model_type`` of a checkpoint's config.json."""
    model_type = hf.read_config(model_dir).get("model_type")
    if model_type == "qwen2":
        return "qwen2"
    if model_type in ("glm", "chatglm"):
        return "glm"
    raise UserError(
        f"{model_dir}/config.json has model_type {model_type!r}; causal-LM tasks load "
        "'qwen2' (Qwen2/Qwen2.5) and 'glm'/'chatglm' (GLM, ChatGLM2/3) checkpoints"
    )


def _lora_export(lora_config) -> str:
    """``model.lora.export``: "adapter" (the default) or "merged"."""
    how = lora_config.get("export", "adapter")
    if how not in ("adapter", "merged"):
        raise UserError(f"config.model.lora.export must be 'adapter' or 'merged', got {how!r}")
    return how


class Task:
    """Causal-LM fine-tuning on (prompt, answer) pairs."""

    # --- model and tokenizer --------------------------------------------------------------

    def build(self, config):
        """``(model, tokenizer)``: pretrained from ``model.path``, else a scratch Qwen2."""
        self.config = config
        m = config.model
        if m.path:
            self.family = _family(m.path)
            module = qwen2 if self.family == "qwen2" else glm
            model, self.model_config = module.load_pretrained(
                m.path, dtype=m.dtype, remat=bool(m.remat)
            )
            if hf.read_config(m.path).get("model_type") == "chatglm":
                from lib.chatglm_tokenizer import ChatGLMTokenizer

                tokenizer = ChatGLMTokenizer.from_pretrained(m.path)
            else:
                tokenizer = load_hf_tokenizer(m.path)
        else:
            self.family = "qwen2"
            tokenizer = self._char_vocab(config)
            self.model_config = qwen2.Qwen2Config(
                vocab_size=tokenizer.vocab_size,
                hidden_size=int(m.hidden_size),
                intermediate_size=int(m.intermediate_size),
                num_hidden_layers=int(m.num_layers),
                num_attention_heads=int(m.num_heads),
                num_key_value_heads=int(m.num_kv_heads),
                max_position_embeddings=int(config.data.max_length) + 256,
                rope_theta=10000.0,
                tie_word_embeddings=True,
                attention_dropout=float(m.dropout),
                bos_token_id=tokenizer.bos_id,
                eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id,
                dtype=m.dtype,
                remat=bool(m.remat),
            )
            model = qwen2.Qwen2ForCausalLM(self.model_config, rngs=nnx.Rngs(config.train.seed))
        self.trainable = nnx.Param
        if int(m.lora.rank) > 0:
            model = self._add_lora(config, model)
        return model, tokenizer

    def _add_lora(self, config, model):
        """Wrap ``model.lora.targets`` in LoRA adapters; only the adapters are trained."""
        from lib.models import lora

        lc = config.model.lora
        _lora_export(lc)  # a misspelt choice fails now, not after training
        lora.apply_lora(
            model, tuple(lc.targets), int(lc.rank), float(lc.alpha), float(lc.dropout),
            nnx.Rngs(int(config.train.seed) + 1),
        )
        self.trainable = lora.LoRAParam
        return model

    def vocab_texts(self, config) -> list[str]:
        """Texts the scratch character vocabulary is built from: the training pairs."""
        return [p + a for p, a in read_pairs(config.data.train, "data.train", self.template)]

    @property
    def template(self) -> str:
        """The alpaca prompt template in use."""
        return self.config.data.get("template") or ALPACA_TEMPLATE

    def _char_vocab(self, config) -> CharVocab:
        saved = Path(config.get("workdir", "") or "") / TOKENIZER_DIR
        if config.get("workdir") and (saved / "vocab.txt").is_file():
            return CharVocab.load(saved)
        return CharVocab.build(self.vocab_texts(config), min_freq=int(config.model.min_char_freq))

    def save_assets(self, config, tokenizer, workdir: Path) -> None:
        """Keep a scratch run's vocabulary with it, so eval/predict work without the data."""
        if isinstance(tokenizer, CharVocab):
            tokenizer.save_pretrained(str(Path(workdir) / TOKENIZER_DIR))

    # --- data -----------------------------------------------------------------------------

    def arrays(self, tokenizer, pairs: list[tuple[str, str]], loss_mode: str | None = None):
        """Training arrays of ``pairs`` with the lengths of ``config.data``."""
        d = self.config.data
        return lm_data.build_arrays(
            tokenizer, pairs, max_length=int(d.max_length),
            max_prompt_length=int(d.max_prompt_length), prompt_tail=int(d.prompt_tail),
            loss_mode=loss_mode or d.loss_mode,
        )

    def datasets(self, config, tokenizer):
        """Train ``ArrayDataset`` and an ``SftEval`` from ``data.train`` / ``data.eval``."""
        self.config = config
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
        """Keyword arguments of ``generate_answers`` from ``config.data`` / ``config.eval``."""
        d, e = self.config.data, self.config.eval
        return dict(
            max_prompt_length=int(d.max_prompt_length), prompt_tail=int(d.prompt_tail),
            batch_size=int(e.batch_size), do_sample=not greedy and bool(e.do_sample),
            temperature=float(e.temperature), top_p=float(e.top_p), top_k=int(e.top_k),
            extra_stops=hf.generation_eos_ids(self.config.model.path),
        )

    def evaluate(self, model, eval_data: SftEval):
        """Answer loss and perplexity on the eval file; greedy generations as samples."""
        nll_sum, count = 0.0, 0.0
        for batch in eval_data.data.eval_batches(int(self.config.eval.batch_size)):
            valid = batch.pop(ArrayDataset.VALID)
            nll, n = lm_data.row_nll(model, batch)
            nll_sum += float(np.sum(nll[valid]))
            count += float(np.sum(n[valid]))
        loss = nll_sum / max(count, 1.0)
        shown = eval_data.pairs[: int(self.config.eval.num_samples)]
        outputs = generate_answers(
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

    def predict(self, config, model, tokenizer, inputs: list[str]) -> list[dict]:
        """Greedy answers; an input line is an instruction, or a JSON alpaca/prompt record."""
        self.config = config
        prompts = []
        for text in inputs:
            record = json_object_or_none(text) or {}
            if "instruction" in record:
                prompts.append(alpaca_prompt(record, self.template))
            elif "prompt" in record:
                prompts.append(str(record["prompt"]))
            else:
                prompts.append(alpaca_prompt({"instruction": text}, self.template))
        outputs = generate_answers(
            model, tokenizer, prompts, max_new_tokens=int(config.eval.max_new_tokens),
            **self.decode_settings(greedy=True),
        )
        return [{"input": t, "output": o} for t, o in zip(inputs, outputs)]

    def export(self, model, tokenizer, out_dir: str) -> None:
        """An HF directory of the model. A LoRA run writes, as ``model.lora.export`` says, a
        PEFT adapter directory for the base (``model.hub_id``, else ``model.path``) or the
        base with the adapters merged in (an HF directory like a full fine-tune's)."""
        m = self.config.model
        if self.trainable is not nnx.Param:
            from lib.models import lora

            if _lora_export(m.lora) == "adapter":
                lora.export_peft(
                    model, out_dir, m.get("hub_id") or m.path, targets=tuple(m.lora.targets),
                    # A ChatGLM2/3 base gets THUDM's module names (fused query_key_value).
                    base_config=hf.read_config(m.path) if m.path else None,
                )
                return
            model = lora.merge_lora(model)
        module = qwen2 if self.family == "qwen2" else glm
        save = tokenizer if hasattr(tokenizer, "save_pretrained") else None
        module.export_pretrained(model, self.model_config, out_dir, tokenizer=save)
        if save is None and m.path:
            # ChatGLM's tokenizer is its SentencePiece file: copy it next to the weights.
            shutil.copy(Path(m.path) / "tokenizer.model", out_dir)
