"""UIE (universal information extraction): a BERT/ERNIE encoder with start/end pointer heads
answers a prompt about a text with spans of that text.

Data: JSON Lines, one record per (content, prompt) as PaddleNLP's UIE writes them,
``{"content": "...", "result_list": [{"text", "start", "end"}], "prompt": "人物"}``, offsets in
characters of ``content``; a negative has an empty ``result_list``. The model reads
``[CLS] prompt [SEP] content [SEP]``; a content longer than ``data.max_length`` leaves room for
is cut into windows sharing ``data.stride`` tokens (``lib.spans``).

Training: binary cross-entropy of the start and end logits against 0/1 labels at the first and
last token of each answer span, averaged over the real tokens (the original averaged over the
padding too). Evaluation: every record decoded (threshold ``eval.threshold``, nearest-first
pairing, spans in the prompt dropped, windows merged) and scored by exact-match micro P/R/F1
(``lib.metrics.span_prf``), overall and per entity type of ``schema.entities`` (other prompts
count as ``relation``). Predict: for each input text, the entity prompts of
``schema.entities``, then for each subject found of a type in ``schema.relations`` the
prompts ``{subject}的{predicate}`` (two-stage relation extraction).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lib import config as config_lib
from lib import metrics as metrics_lib
from lib import spans as spans_lib
from lib.data import ArrayDataset, json_object_or_none, read_jsonl
from lib.errors import UserError
from tasks import base

FIELDS = {"content": str, "result_list": list, "prompt": str}
RELATION = "relation"


def _nonblank_line_numbers(path: str) -> list[int]:
    """1-based numbers of the non-blank lines of ``path`` (the lines ``read_jsonl`` reads)."""
    with open(path, "rb") as f:
        return [n for n, raw in enumerate(f, start=1) if raw.strip()]


def read_records(path: str, key: str) -> list[dict]:
    """UIE records; a missing field, an empty prompt or a span whose ``text`` is not
    ``content[start:end]`` is a ``UserError`` naming ``file:line``."""
    records = read_jsonl(path, FIELDS, key=key)
    if not records:
        raise UserError(f"{path}: no records (one JSON object per line; set --config.{key})")
    for number, record in zip(_nonblank_line_numbers(path), records):
        where = f"{path}:{number}"
        if not record["prompt"].strip():
            raise UserError(f"{where}: the prompt is empty")
        content = record["content"]
        for i, item in enumerate(record["result_list"]):
            if not (isinstance(item, dict) and isinstance(item.get("text"), str)
                    and all(type(item.get(k)) is int for k in ("start", "end"))):
                raise UserError(f'{where}: result_list[{i}] must be {{"text": str, "start": '
                                f'int, "end": int}}, got {json.dumps(item, ensure_ascii=False)}')
            start, end, text = item["start"], item["end"], item["text"]
            if not 0 <= start < end <= len(content) or content[start:end] != text:
                raise UserError(
                    f"{where}: result_list[{i}] {text!r} does not match content[{start}:{end}] "
                    f"= {content[max(start, 0):max(end, 0)]!r} (start/end are character offsets "
                    f"into content, end exclusive)")
    return records


def span_scores(pred: list[set], gold: list[set], prompts: list[str],
                entities: tuple[str, ...]) -> dict[str, float]:
    """Micro precision / recall / F1 of exact spans over all records, and ``f1/<type>`` over
    the records of each entity type (prompt) and ``f1/relation`` over the other prompts."""
    out = metrics_lib.span_prf(pred, gold)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt if prompt in entities else RELATION].append(i)
    for name in (*entities, RELATION):
        if groups.get(name):
            part = metrics_lib.span_prf([pred[i] for i in groups[name]],
                                        [gold[i] for i in groups[name]])
            out[f"f1/{name}"] = part["f1"]
    return out


class EvalSet:
    """Records and the model inputs of their windows (``owner[i]``: the record of window i)."""

    def __init__(self, records: list[dict], windows: list[spans_lib.Window], owner: list[int],
                 arrays: dict[str, np.ndarray], name: str):
        self.records = records
        self.windows = windows
        self.owner = owner
        self.data = ArrayDataset(arrays, name=name)


def _entities_problem(value, config) -> str | None:
    if value and all(isinstance(t, str) and t.strip() for t in value):
        return None
    return "give at least one entity type (a non-empty prompt), e.g. ('人物', '地点')"


def _relations_problem(value, config) -> str | None:
    for subject, predicates in dict(value).items():
        if not subject or not predicates or not all(isinstance(p, str) and p
                                                    for p in predicates):
            return ("map each subject type to a non-empty tuple of predicate names, e.g. "
                    "{'机构': ('发言人',)}")
    return None


class Task(base.Task):
    """UIE on a BERT/ERNIE encoder (see the module docstring)."""

    RULES = {
        **base.Task.RULES,
        "data.test": config_lib.data_file(optional=True, modes=("train",)),
        "data.max_length": config_lib.at_least(8),
        "data.stride": config_lib.at_least(0),
        "eval.threshold": config_lib.interval(0, 1),
        "schema.entities": config_lib.Rule(_entities_problem),
        "schema.relations": config_lib.Rule(_relations_problem),
    }

    def __init__(self, config):
        super().__init__(config)
        self.max_length = int(config.data.max_length)
        self.stride = int(config.data.stride)
        if self.stride >= self.max_length - 4:
            raise UserError(f"config.data.stride={self.stride} must be smaller than "
                            f"data.max_length - 4 = {self.max_length - 4}")
        self.threshold = float(config.eval.threshold)
        self.entities = tuple(config.schema.entities)
        self.relations = {k: tuple(v) for k, v in dict(config.schema.relations).items()}
        self.eval_batch_size = int(config.eval.batch_size)
        if config.model.hub_id and not config.model.path:
            raise UserError(f"variant {config.variant!r} fine-tunes {config.model.hub_id}: set "
                            "--config.model.path=DIR to a download of it")

    # --- model and data -------------------------------------------------------------------

    def build(self):
        """``(model, tokenizer)``: an encoder with UIE pointer heads (``lib.models.bert``)."""
        built = self.build_model("uie", max_length=self.max_length)
        return built.model, built.tokenizer

    def vocab_texts(self) -> list[str]:
        """Contents and prompts of the training records and the schema's prompt words (a
        scratch model's vocabulary)."""
        records = read_records(self.config.data.train, "data.train")
        schema = [*self.entities, *self.relations, *(p for ps in self.relations.values()
                                                      for p in ps)]
        return [r["content"] for r in records] + [r["prompt"] for r in records] + schema

    def encode(self, tokenizer, records: list[dict], with_targets: bool):
        """The windows of ``records``, their owner record and their arrays."""
        windows, owner = [], []
        for i, r in enumerate(records):
            for w in spans_lib.windows(tokenizer, r["prompt"], r["content"], self.max_length,
                                       self.stride):
                windows.append(w)
                owner.append(i)
        arrays = {k: np.stack([getattr(w, k) for w in windows])
                  for k in ("input_ids", "token_type_ids", "attention_mask")}
        if with_targets:
            labels = [spans_lib.targets(w, [(s["start"], s["end"])
                                            for s in records[i]["result_list"]])
                      for w, i in zip(windows, owner)]
            arrays["start_labels"] = np.stack([s for s, _ in labels])
            arrays["end_labels"] = np.stack([e for _, e in labels])
        return windows, owner, arrays

    def _eval_set(self, tokenizer, key: str) -> EvalSet:
        path = config_lib.lookup(self.config, key)
        records = read_records(path, key)
        windows, owner, arrays = self.encode(tokenizer, records, with_targets=True)
        return EvalSet(records, windows, owner, arrays, path)

    def datasets(self, tokenizer):
        """Train windows (``data.train``) as an ``ArrayDataset``; ``data.eval`` as an
        ``EvalSet``."""
        train = self._eval_set(tokenizer, "data.train")
        return train.data, self._eval_set(tokenizer, "data.eval")

    def test_dataset(self, tokenizer) -> EvalSet | None:
        """``data.test`` (empty: none), scored on the best checkpoint after training."""
        return self._eval_set(tokenizer, "data.test") if self.config.data.test else None

    # --- training and evaluation ----------------------------------------------------------

    def loss(self, model, batch, rng):
        """Pointer BCE: the mean over real tokens of the start and end sigmoid cross-entropies
        (averaged); ``aux``: the token count (``weight``)."""
        rngs = None if rng is None else nnx.Rngs(dropout=rng)
        start, end = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"], rngs=rngs)
        mask = batch["attention_mask"].astype(jnp.float32)
        bce = (optax.sigmoid_binary_cross_entropy(start, batch["start_labels"])
               + optax.sigmoid_binary_cross_entropy(end, batch["end_labels"])) / 2
        weight = jnp.sum(mask)
        return jnp.sum(bce * mask) / jnp.maximum(weight, 1.0), {"weight": weight}

    def probabilities(self, model, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """Start and end probabilities ``[windows, max_length]``, batched and jitted."""

        def forward(m, b):
            start, end = m(b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b["token_type_ids"])
            return jax.nn.sigmoid(start), jax.nn.sigmoid(end)

        forward = nnx.jit(forward)
        keys = ("input_ids", "token_type_ids", "attention_mask")
        data = ArrayDataset({k: arrays[k] for k in keys}, name="windows")
        return data.map_eval(lambda b: tuple(forward(model, b)), self.eval_batch_size)

    def extract(self, model, windows, owner, arrays, n_records: int) -> list[list[tuple]]:
        """The merged spans ``(start, end, probability)`` of each record."""
        start, end = self.probabilities(model, arrays)
        per_record: list[list] = [[] for _ in range(n_records)]
        for i, (w, record) in enumerate(zip(windows, owner)):
            per_record[record].append(spans_lib.decode(w, start[i], end[i], self.threshold,
                                                       overlap=self.stride > 0))
        return [spans_lib.merge(found) for found in per_record]

    def evaluate(self, model, eval_data: EvalSet, repeat: int = 0):
        """Span exact-match micro P/R/F1, overall and ``f1/<type>`` per entity type and for
        relation prompts; 8 samples."""
        found = self.extract(model, eval_data.windows, eval_data.owner, eval_data.data.arrays,
                             len(eval_data.records))
        pred = [{(s, e) for s, e, _ in spans} for spans in found]
        gold = [{(s["start"], s["end"]) for s in r["result_list"]} for r in eval_data.records]
        out = span_scores(pred, gold, [r["prompt"] for r in eval_data.records], self.entities)
        samples = [{"prompt": r["prompt"], "content": r["content"][:80],
                    "gold": [s["text"] for s in r["result_list"]],
                    "pred": [r["content"][s:e] for s, e, _ in spans]}
                   for r, spans in list(zip(eval_data.records, found))[:8]]
        return out, samples

    # --- inference ------------------------------------------------------------------------

    def ask(self, model, tokenizer, questions: list[tuple[str, str]]) -> list[list[dict]]:
        """Answer ``(content, prompt)`` questions: ``{"text", "start", "end", "probability"}``
        spans of each content."""
        if not questions:
            return []
        records = [{"content": c, "prompt": p, "result_list": []} for c, p in questions]
        windows, owner, arrays = self.encode(tokenizer, records, with_targets=False)
        found = self.extract(model, windows, owner, arrays, len(records))
        return [[{"text": c[s:e], "start": s, "end": e, "probability": round(p, 4)}
                 for s, e, p in spans] for (c, _), spans in zip(questions, found)]

    def predict(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        """Each line a text (or ``{"text": ...}``): the entities of ``schema.entities`` and the
        relations of ``schema.relations`` (subjects first, then ``{subject}的{predicate}``).
        Prints the originals' ``[+] NER Results`` / ``[+] Information-Extraction Results``
        lines on stderr."""
        out = []
        types = list(dict.fromkeys([*self.entities, *self.relations]))
        for number, line in enumerate(inputs, start=1):
            record = json_object_or_none(line)
            text = line if record is None else record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise UserError(f'predict input line {number}: expected a text or '
                                '{"text": ...}')
            found = dict(zip(types, self.ask(model, tokenizer, [(text, t) for t in types])))
            questions, keys = [], []
            for kind, predicates in self.relations.items():
                for subject in dict.fromkeys(s["text"] for s in found[kind]):
                    for predicate in predicates:
                        questions.append((text, f"{subject}的{predicate}"))
                        keys.append((subject, predicate))
            relations: dict[str, dict[str, list]] = {}
            for (subject, predicate), answer in zip(keys, self.ask(model, tokenizer,
                                                                   questions)):
                relations.setdefault(subject, {})[predicate] = answer
            ner = {t: found[t] for t in self.entities}
            print("[+] NER Results: " + str({t: [s["text"] for s in v] for t, v in ner.items()}),
                  file=sys.stderr, flush=True)
            shown = {s: {p: [a["text"] for a in v] for p, v in preds.items()}
                     for s, preds in relations.items()}
            print(f"[+] Information-Extraction Results: {shown}", file=sys.stderr, flush=True)
            out.append({"text": text, "entities": ner, "relations": relations})
        return out

    def export(self, model, tokenizer, out_dir: str) -> None:
        """The PyTorch UIE layout (``encoder.*``, ``linear_start``, ``linear_end``)."""
        self.export_model(model, out_dir)
