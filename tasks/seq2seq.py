"""Sequence-to-sequence fine-tuning of an encoder-decoder (T5, mT5 / t5-pegasus, Pegasus): the
base of ``tasks.summarization``, ``tasks.t5_qa`` and ``tasks.t5_filling``.

A task built on it says which JSONL fields a record needs (``FIELDS``), how a record becomes a
source text and a target text (``source_text`` / ``target_text``), how a decoded output is
scored (``score``) and what ``--mode=predict`` reads and prints (``predict_source`` /
``predict_output``). The rest is here:

- Examples. The source is ``tokenizer.encode(text)`` (with the tokenizer's own frame:
  ``[CLS] text [SEP]`` for t5-pegasus, UER's T5 and a character vocabulary, ``text </s>`` for
  Randeng-Pegasus and Google's T5); a source longer than ``data.max_source_length`` keeps its
  head and its closing token. The target is the text's tokens then EOS; a longer one keeps its
  head and the EOS (``JiebaBertTokenizer.encode_target``'s rule). Both counts are printed once
  per file (``data/summarization/train.jsonl: 238 of 2145 sources cut to 256 tokens, ...``).
  The decoder reads ``[decoder_start] + target[:-1]`` and predicts ``target``.
- Loss: token-mean cross-entropy over the target tokens; padding is never a target (nor seen by
  the attention), so the padded length does not change it. ``aux["weight"]`` is the token count
  (gradient accumulation weighs micro-batches by tokens).
- Evaluation: the eval file's target loss, then every source decoded by ``lib.generate``
  (greedy, or beam search with ``eval.num_beams`` beams as the originals' inference), cut at
  the first EOS, special tokens dropped and spaces removed (``eval.remove_spaces``, as the
  originals' ``.replace(" ", "")``), scored by the task's ``score``; the first
  ``eval.num_samples`` outputs are the samples.
- Model: ``lib.models.build(head="seq2seq_lm")``: the checkpoint of ``model.path`` with its own
  tokenizer (``lib.word_tokenizer``, whose decoder start, EOS and pad ids replace the
  checkpoint config's: t5-pegasus's keeps mT5's defaults), or a scratch ``model.family``
  (``t5``, ``mt5``, ``pegasus``) with a character vocabulary of the training texts. A
  tokenizer with more ids than the model's embedding, or 128 or more fewer (T5 rounds its
  table up to a multiple of 128), is an error naming both sizes. ``model.lora.rank > 0``
  trains LoRA adapters on ``model.lora.targets`` (q/v) and ``--mode=export`` writes a PEFT
  ``SEQ_2_SEQ_LM`` adapter.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lib import config as config_lib
from lib.data import ArrayDataset, json_object_or_none, pad_and_stack, read_jsonl
from lib.errors import UserError
from lib.generate import generate
from lib.word_tokenizer import JiebaBertTokenizer
from tasks import base

IGNORE = -100  # label of a position that is not a target (the Hugging Face convention)
# T5 rounds its embedding table up to a multiple of this (32100 tokens, 32128 rows).
VOCAB_ROUNDING = 128


# ----------------------------------------------------------------------------- examples


def cut_source(ids: list[int], max_length: int) -> list[int]:
    """A source of at most ``max_length`` ids: its head and its last id (the tokenizer's
    closing ``[SEP]`` / ``</s>``)."""
    if len(ids) <= max_length:
        return ids
    return ids[: max_length - 1] + ids[-1:]


def cut_target(ids: list[int], eos: int, max_length: int) -> list[int]:
    """The text's ``ids`` then ``eos``, at most ``max_length`` in all (the EOS is kept)."""
    return ids[: max_length - 1] + [eos]


def encode_pairs(
    tokenizer: Any, sources: list[str], targets: list[str], *, max_source_length: int,
    max_target_length: int, start_id: int, name: str, quiet: bool = False,
) -> dict[str, np.ndarray]:
    """Training arrays of ``(source, target)`` texts, right-padded: ``input_ids``,
    ``attention_mask`` ``[n, max_source_length]``; ``decoder_input_ids``,
    ``decoder_attention_mask``, ``labels`` (``IGNORE`` on padding) ``[n, max_target_length]``.
    Prints how many sources and targets were cut (unless ``quiet``)."""
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    src, tgt, cut_src, cut_tgt = [], [], 0, 0
    for source, target in zip(sources, targets):
        ids = list(tokenizer.encode(source, add_special_tokens=True))
        cut_src += len(ids) > max_source_length
        src.append(cut_source(ids, max_source_length))
        ids = list(tokenizer.encode(target, add_special_tokens=False))
        cut_tgt += len(ids) + 1 > max_target_length
        tgt.append(cut_target(ids, eos, max_target_length))
    if not quiet:
        print(f"{name}: {len(src)} examples; {cut_src} sources cut to {max_source_length} "
              f"tokens (data.max_source_length), {cut_tgt} targets cut to {max_target_length} "
              "(data.max_target_length)", flush=True)
    input_ids, mask = pad_and_stack(src, max_source_length, pad)
    labels, dec_mask = pad_and_stack(tgt, max_target_length, IGNORE)
    dec_in, _ = pad_and_stack([[start_id] + t[:-1] for t in tgt], max_target_length, pad)
    return {"input_ids": input_ids, "attention_mask": mask, "decoder_input_ids": dec_in,
            "decoder_attention_mask": dec_mask, "labels": labels}


# ----------------------------------------------------------------------------- loss


def _token_ce(model, batch: dict, rngs) -> tuple[jax.Array, jax.Array]:
    """Per-position target cross-entropy and the 0/1 target mask, both ``[b, t]``."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                   batch["decoder_attention_mask"], rngs=rngs)
    labels = batch["labels"]
    target = labels != IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(target, labels, 0))
    return ce, target.astype(jnp.float32)


def seq2seq_loss(model, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """Token-mean cross-entropy over the target tokens; ``aux["weight"]`` is their count."""
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    ce, target = _token_ce(model, batch, rngs)
    count = jnp.sum(target)
    return jnp.sum(ce * target) / jnp.maximum(count, 1.0), {"weight": count}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_nll(graphdef, state, batch):
    ce, target = _token_ce(nnx.merge(graphdef, state), batch, None)
    return jnp.sum(ce * target, axis=-1), jnp.sum(target, axis=-1)


# ----------------------------------------------------------------------------- decoding


def decode_output(tokenizer: Any, ids, remove_spaces: bool) -> str:
    """Text of generated ids up to (not including) the first EOS, special tokens dropped."""
    eos = int(tokenizer.eos_token_id)
    ids = [int(i) for i in ids]
    end = ids.index(eos) if eos in ids else len(ids)
    text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    return text.replace(" ", "") if remove_spaces else text.strip()


def generate_texts(
    model: nnx.Module, tokenizer: Any, sources: list[str], *, max_source_length: int,
    batch_size: int, remove_spaces: bool, **settings: Any,
) -> list[str]:
    """Decode an output for every source text in fixed-shape batches (one compilation): the
    sources cut as in training and padded to ``max_source_length``; ``settings`` go to
    ``lib.generate.generate`` (``max_new_tokens``, ``num_beams``, ``length_penalty``,
    ``no_repeat_ngram_size``). The last batch is filled up with copies of the last source
    (their outputs are dropped)."""
    if not sources:
        return []
    ids = [cut_source(list(tokenizer.encode(s, add_special_tokens=True)), max_source_length)
           for s in sources]
    n = len(ids)
    total = -(-n // batch_size) * batch_size
    ids += [ids[-1]] * (total - n)
    # One width for every call (evaluation and predict share one compilation).
    input_ids, mask = pad_and_stack(ids, max_source_length, int(tokenizer.pad_token_id))
    out: list[str] = []
    for start in range(0, total, batch_size):
        rows = slice(start, start + batch_size)
        tokens = generate(model, input_ids[rows], mask[rows], eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **settings)
        out += [decode_output(tokenizer, row, remove_spaces) for row in tokens]
    return out[:n]


# ----------------------------------------------------------------------------- the task


class Seq2SeqEval:
    """What ``evaluate`` needs of a split: its examples as arrays (the target loss), and its
    records, source texts and target texts (decoding and scoring)."""

    def __init__(self, data: ArrayDataset, records: list[dict], sources: list[str],
                 targets: list[str]):
        self.data = data
        self.records = records
        self.sources = sources
        self.targets = targets


class Task(base.Task):
    """Encoder-decoder fine-tuning on (source, target) texts (see the module docstring)."""

    RULES = {
        **base.Task.RULES,
        "data.test": config_lib.data_file(optional=True, modes=("train",)),
        "data.max_source_length": config_lib.at_least(2),
        "data.max_target_length": config_lib.at_least(2),
        "eval.num_samples": config_lib.at_least(0),
        "eval.max_new_tokens": config_lib.at_least(1),
        "eval.num_beams": config_lib.at_least(1),
        "eval.no_repeat_ngram_size": config_lib.at_least(0),
    }
    # The JSONL fields a record needs, and their types.
    FIELDS: dict[str, type] = {}
    # The field that must not be empty (the target).
    TARGET_FIELD = ""

    # --- what a task defines --------------------------------------------------------------

    def source_text(self, record: dict) -> str:
        """The source text of a record."""
        raise NotImplementedError

    def target_text(self, record: dict) -> str:
        """The text the decoder learns to produce for a record."""
        raise NotImplementedError

    def score(self, outputs: list[str], records: list[dict]) -> dict[str, float]:
        """Metrics of the decoded ``outputs`` of ``records``."""
        raise NotImplementedError

    def predict_source(self, line: str) -> dict:
        """The record of one ``--mode=predict`` input line."""
        raise NotImplementedError

    def predict_output(self, record: dict, output: str) -> dict:
        """The printed result of a record and its decoded output."""
        raise NotImplementedError

    # --- model ----------------------------------------------------------------------------

    def build(self):
        """``(model, tokenizer)`` from the registry; checks the tokenizer against the model's
        vocabulary."""
        built = self.build_model("seq2seq_lm", max_length=int(self.config.data.max_source_length))
        tokenizer = built.tokenizer
        check_vocab(tokenizer, built.config.vocab_size, self.config.model.path)
        if isinstance(tokenizer, JiebaBertTokenizer):
            # t5-pegasus's config.json keeps mT5's defaults (start 0, eos 1); the original
            # starts the decoder at [CLS] and ends at [SEP], as its tokenizer says. Training,
            # decoding (lib.generate reads model.config) and the export use the tokenizer's.
            cfg = dataclasses.replace(
                built.config, decoder_start_token_id=tokenizer.decoder_start_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            built.model.config = cfg
            self.built = built._replace(config=cfg)
        return built.model, tokenizer

    def vocab_texts(self) -> list[str]:
        """A scratch vocabulary's texts: the training sources and targets."""
        records = self.read(self.config.data.train, "data.train")
        return [self.source_text(r) + self.target_text(r) for r in records]

    # --- data -----------------------------------------------------------------------------

    def read(self, path: str, key: str) -> list[dict]:
        """The records of a JSONL file; a missing field or an empty target names file:line."""
        records = read_jsonl(path, self.FIELDS, key=key)
        if not records:
            raise UserError(f"{path}: no records (--config.{key})")
        # The line numbers of the records (read_jsonl skips blank lines).
        text = Path(path).read_bytes().decode("utf-8-sig")
        lines = [n for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        for number, record in zip(lines, records):
            if not record[self.TARGET_FIELD].strip():
                raise UserError(f'{path}:{number}: field "{self.TARGET_FIELD}" is empty (the '
                                "target must have text)")
        return records

    def arrays(self, tokenizer, records: list[dict], name: str) -> dict[str, np.ndarray]:
        """Training arrays of records with the lengths of ``config.data``."""
        d = self.config.data
        return encode_pairs(
            tokenizer, [self.source_text(r) for r in records],
            [self.target_text(r) for r in records],
            max_source_length=int(d.max_source_length),
            max_target_length=int(d.max_target_length), start_id=self.start_id(), name=name)

    def start_id(self) -> int:
        """The decoder's first input id (the model config's)."""
        if self.built is None:
            raise UserError(f"task {self.name}: build the model before its data")
        return int(self.built.config.decoder_start_token_id)

    def eval_set(self, tokenizer, path: str, key: str) -> Seq2SeqEval:
        """A split's ``Seq2SeqEval``."""
        records = self.read(path, key)
        data = ArrayDataset(self.arrays(tokenizer, records, path), name=path)
        return Seq2SeqEval(data, records, [self.source_text(r) for r in records],
                           [self.target_text(r) for r in records])

    def datasets(self, tokenizer):
        """Train ``ArrayDataset`` and eval ``Seq2SeqEval`` of ``data.train`` / ``data.eval``."""
        d = self.config.data
        train = ArrayDataset(self.arrays(tokenizer, self.read(d.train, "data.train"), d.train),
                             name=d.train)
        return train, self.eval_set(tokenizer, d.eval, "data.eval")

    def test_dataset(self, tokenizer):
        """``data.test``, scored on the best checkpoint after training (empty: none)."""
        test = self.config.data.test
        return self.eval_set(tokenizer, test, "data.test") if test else None

    # --- loss and evaluation --------------------------------------------------------------

    def loss(self, model, batch, rng):
        """Token-mean target cross-entropy (``seq2seq_loss``)."""
        return seq2seq_loss(model, batch, rng)

    def decode_settings(self) -> dict:
        """Keyword arguments of ``generate_texts`` from ``config.data`` / ``config.eval``."""
        d, e = self.config.data, self.config.eval
        return dict(max_source_length=int(d.max_source_length), batch_size=int(e.batch_size),
                    remove_spaces=bool(e.remove_spaces), max_new_tokens=int(e.max_new_tokens),
                    num_beams=int(e.num_beams), length_penalty=float(e.length_penalty),
                    no_repeat_ngram_size=int(e.no_repeat_ngram_size))

    def decode(self, model, tokenizer, sources: list[str]) -> list[str]:
        """Decoded outputs of source texts (``generate_texts`` with the eval settings)."""
        return generate_texts(model, tokenizer, sources, **self.decode_settings())

    def evaluate(self, model, eval_data: Seq2SeqEval, repeat: int = 0):
        """Target loss, the task's scores of the decoded outputs, and samples (deterministic:
        ``repeat`` changes nothing)."""
        graphdef, state = nnx.split(model)
        nll_sum, count = 0.0, 0.0
        for batch in eval_data.data.eval_batches(int(self.config.eval.batch_size)):
            valid = batch.pop(ArrayDataset.VALID)
            nll, n = _row_nll(graphdef, state, batch)
            nll_sum += float(np.sum(np.asarray(nll)[valid]))
            count += float(np.sum(np.asarray(n)[valid]))
        tokenizer = self.built.tokenizer
        outputs = self.decode(model, tokenizer, eval_data.sources)
        metrics = {"loss": nll_sum / max(count, 1.0),
                   **self.score(outputs, eval_data.records)}
        shown = range(min(int(self.config.eval.num_samples), len(outputs)))
        samples = [{"source": eval_data.sources[i], "reference": eval_data.targets[i],
                    "output": outputs[i]} for i in shown]
        return metrics, samples

    # --- inference and export -------------------------------------------------------------

    def predict(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        """Decode each input line (``predict_source``) and print ``predict_output``."""
        records = [self.predict_source(line) for line in inputs]
        outputs = self.decode(model, tokenizer, [self.source_text(r) for r in records])
        return [self.predict_output(r, o) for r, o in zip(records, outputs)]

    def export(self, model, tokenizer, out_dir: str) -> None:
        """An HF directory (``T5ForConditionalGeneration`` / mT5 / Pegasus with the
        tokenizer), or a PEFT ``SEQ_2_SEQ_LM`` adapter for a LoRA run."""
        self.export_model(model, out_dir)


def check_vocab(tokenizer: Any, model_vocab: int, path: str) -> None:
    """A tokenizer fits a model when every id it makes has an embedding row and the table is
    not larger than T5's rounding up to a multiple of 128 explains."""
    size = int(tokenizer.vocab_size)
    if not 0 <= model_vocab - size < VOCAB_ROUNDING:
        where = f"{path}: " if path else ""
        raise UserError(f"{where}the tokenizer has {size} tokens but the model's vocab_size is "
                        f"{model_vocab}: they do not belong together (check config.model.path)")


def record_of_line(line: str, field: str) -> dict:
    """A ``--mode=predict`` line: a JSON object, else the plain text as ``{field: line}``."""
    return json_object_or_none(line) or {field: line}
