"""The sequence-to-sequence tasks (summarization, t5_qa, t5_filling) on ``tasks.seq2seq``:
example encoding and truncation, the loss against numpy (padding never counted), a short
train + eval + predict run per task, bad input, corpus BLEU against the formula, and a LoRA run
on a tiny HF T5 checkpoint exported as a PEFT ``SEQ_2_SEQ_LM`` adapter."""

from __future__ import annotations

import importlib
import json
import math
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import tasks
from lib import metrics, train
from lib.errors import UserError
from lib.tokenizer import CharVocab
from tasks import seq2seq

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("summarization", "t5_qa", "t5_filling")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The first 40 training and 8 dev records of each demo dataset."""
    d = tmp_path_factory.mktemp("seq2seq")
    for name in TASKS:
        lines = (ROOT / f"data/{name}/train.jsonl").read_text(encoding="utf-8").splitlines()
        (d / name).mkdir()
        (d / name / "train.jsonl").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
        (d / name / "dev.jsonl").write_text("\n".join(lines[40:48]) + "\n", encoding="utf-8")
    return d


def tiny_config(name, data_dir, workdir, **train_kw):
    c = importlib.import_module(f"configs.{name}").get_config("demo")
    c.workdir = str(workdir)
    c.data.train = str(data_dir / name / "train.jsonl")
    c.data.eval = str(data_dir / name / "dev.jsonl")
    c.data.test = ""
    c.data.max_source_length, c.data.max_target_length = 40, 12
    c.model.hidden_size, c.model.num_hidden_layers, c.model.num_attention_heads = 16, 1, 2
    c.model.intermediate_size, c.model.min_char_freq = 32, 1
    c.train.update({"steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, **train_kw})
    c.log.every, c.eval.count, c.eval.every, c.checkpoint.every = 3, 0, 0, 0
    c.eval.batch_size, c.eval.num_samples, c.eval.max_new_tokens = 8, 3, 6
    return c


# ----------------------------------------------------------------------------- examples


def test_examples_frame_shift_and_cut(capsys):
    vocab = CharVocab.build(["甲乙丙丁戊己"])
    ids = {c: vocab.token_to_id[c] for c in "甲乙丙丁戊己"}
    cls, sep, eos, pad, start = vocab.cls_id, vocab.sep_id, vocab.eos_id, 0, vocab.bos_id
    arrays = seq2seq.encode_pairs(vocab, ["甲乙", "甲乙丙丁戊己"], ["丙", "丁戊己甲"],
                                  max_source_length=5, max_target_length=4, start_id=start,
                                  name="x.jsonl")
    a, b, c, d = (ids[k] for k in "甲乙丙丁")
    # Sources keep their frame; the long one keeps its head and its closing [SEP].
    np.testing.assert_array_equal(arrays["input_ids"], [[cls, a, b, sep, pad],
                                                        [cls, a, b, c, sep]])
    np.testing.assert_array_equal(arrays["attention_mask"], [[1, 1, 1, 1, 0], [1] * 5])
    # Targets: text + EOS (the long one cut, EOS kept); the decoder reads start + target[:-1].
    e, f = ids["戊"], ids["己"]
    np.testing.assert_array_equal(arrays["labels"], [[c, eos, -100, -100], [d, e, f, eos]])
    np.testing.assert_array_equal(arrays["decoder_input_ids"], [[start, c, pad, pad],
                                                                [start, d, e, f]])
    np.testing.assert_array_equal(arrays["decoder_attention_mask"], [[1, 1, 0, 0], [1] * 4])
    out = capsys.readouterr().out
    assert "x.jsonl: 2 examples; 1 sources cut to 5 tokens" in out
    assert "1 targets cut to 4" in out


def test_loss_against_numpy_and_padding(data_dir, tmp_path):
    config = tiny_config("summarization", data_dir, tmp_path)
    task = tasks.create(config)
    model, tok = task.build()
    train_data, _ = task.datasets(tok)
    batch = train_data.batch(0, 4, 0, shuffle=False)
    loss, aux = task.loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    logits = np.asarray(model(batch["input_ids"], batch["attention_mask"],
                              batch["decoder_input_ids"], batch["decoder_attention_mask"]),
                        np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    target = batch["labels"] != -100
    picked = np.take_along_axis(logp, np.where(target, batch["labels"], 0)[..., None], -1)[..., 0]
    want = -(picked * target).sum() / target.sum()
    assert abs(float(loss) - want) < 1e-5
    assert float(aux["weight"]) == target.sum()
    # Twice the target padding (and a different pad id in the decoder input): same loss.
    wide = {k: np.pad(v, ((0, 0), (0, 12)), constant_values={"labels": -100}.get(k, 7))
            if k.startswith("decoder") or k == "labels" else v for k, v in batch.items()}
    wide["decoder_attention_mask"][:, -12:] = 0
    wide_loss, _ = task.loss(model, {k: jnp.asarray(v) for k, v in wide.items()}, None)
    assert abs(float(wide_loss) - float(loss)) < 1e-5


# ----------------------------------------------------------------------------- end to end


PREDICT = {
    "summarization": (["1月24日清晨，川西平原寒风凛冽。"], {"text", "summary"}),
    "t5_qa": (["文中提到的人物是谁？\t记者采访了谢世杰。"], {"Q", "C", "A"}),
    "t5_filling": (['{"masked": "今天[MASK]很好。"}'], {"masked", "filling", "text"}),
}


@pytest.mark.parametrize("name", TASKS)
def test_train_eval_predict(name, data_dir, tmp_path, capsys):
    config = tiny_config(name, data_dir, tmp_path)
    task = tasks.create(config)
    final = task.run(tmp_path)
    out = capsys.readouterr().out
    assert "train.jsonl: 40 examples;" in out and "sources cut to 40 tokens" in out
    history = json.loads((tmp_path / "plots/history.json").read_text())
    losses = [p["loss"] for p in history["train"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    written = json.loads((tmp_path / "eval/step_6.json").read_text())
    assert written["metrics"] == pytest.approx(final)
    # The metrics are the task's scores of the checkpoint's decoded outputs.
    again = tasks.create(config, "eval")
    model, tok, step = train.restore_model(again, tmp_path)
    assert step == 6
    _, dev = again.datasets(tok)
    outputs = again.decode(model, tok, dev.sources)
    assert [s["output"] for s in written["samples"]] == outputs[:3]
    scores = again.score(outputs, dev.records)
    assert {k: final[k] for k in scores} == pytest.approx(scores)
    assert math.log(tok.vocab_size) > final["loss"] > 0
    lines, keys = PREDICT[name]
    predicted = again.predict(model, tok, lines)
    assert len(predicted) == 1 and set(predicted[0]) == keys
    if name == "t5_filling":
        assert predicted[0]["text"] == "今天" + predicted[0]["filling"] + "很好。"


def test_metric_names(data_dir, tmp_path):
    records = [{"answer": "四川", "question": "q", "context": "c"},
               {"answer": "谢世杰", "question": "q", "context": "c"}]
    qa = tasks.task_class("t5_qa")(tiny_config("t5_qa", data_dir, tmp_path))
    scores = qa.score(["答案：四川", "谢世"], records)
    assert scores["exact_match"] == 50.0
    assert scores == pytest.approx({**metrics.corpus_bleu_n(["四川", "谢世"], ["四川", "谢世杰"]),
                                    "exact_match": 50.0})
    fill = tasks.task_class("t5_filling")(tiny_config("t5_filling", data_dir, tmp_path))
    scores = fill.score(["采访", "中，要"], [{"target": "采访", "masked": ""},
                                           {"target": "中，", "masked": ""}])
    assert scores == {"exact_match": 50.0,
                      **metrics.rouge_zh(["采访", "中，要"], ["采访", "中，"])}
    assert scores["rouge-1"] > 50.0


# ----------------------------------------------------------------------------- bad input


def test_bad_records_name_file_and_line(data_dir, tmp_path):
    config = tiny_config("t5_qa", data_dir, tmp_path)
    bad = tmp_path / "bad.jsonl"
    good = '{"context": "c", "answer": "a", "question": "q"}'
    bad.write_text(good + "\n\n" + '{"context": "c", "question": "q"}\n', encoding="utf-8")
    task = tasks.create(config)
    with pytest.raises(UserError, match=r'bad.jsonl:3: field "answer" is missing'):
        task.read(str(bad), "data.train")
    bad.write_text(good + "\n" + good.replace('"a"', '" "') + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r'bad.jsonl:2: field "answer" is empty'):
        task.read(str(bad), "data.train")
    config.data.max_source_length = 1
    with pytest.raises(UserError, match="max_source_length"):
        tasks.create(config)


def test_vocab_size_mismatch_names_both_sizes():
    vocab = CharVocab.build(["甲乙丙"])
    seq2seq.check_vocab(vocab, vocab.vocab_size, "")
    seq2seq.check_vocab(vocab, vocab.vocab_size + 127, "")  # T5's rounding up
    with pytest.raises(UserError, match=rf"m: the tokenizer has {vocab.vocab_size} tokens but "
                                        rf"the model's vocab_size is {vocab.vocab_size - 1}"):
        seq2seq.check_vocab(vocab, vocab.vocab_size - 1, "m")
    with pytest.raises(UserError, match="vocab_size is 500"):
        seq2seq.check_vocab(vocab, 500, "m")


# ----------------------------------------------------------------------------- BLEU


def _bleu_by_formula(hyps, refs, n_max):
    """Corpus BLEU (Papineni et al.): clipped n-gram precisions summed over the corpus, their
    geometric mean with weights 1/n_max, times exp(1 - r/c) when c < r. As nltk, a hypothesis
    shorter than n counts one n-gram in the denominator (Papineni's count would be 0)."""
    log_p = 0.0
    for n in range(1, n_max + 1):
        hit = total = 0
        for h, r in zip(hyps, refs):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            hit += sum(min(c, rc[g]) for g, c in hc.items())
            total += max(len(h) - n + 1, 1)
        if hit == 0:
            return 0.0
        log_p += math.log(hit / total) / n_max
    c, r = sum(map(len, hyps)), sum(map(len, refs))
    return 100.0 * math.exp(log_p) * (1.0 if c > r else math.exp(1 - r / c))


def test_corpus_bleu_matches_the_formula():
    hyps = ["北京音乐厅频传喜讯", "四川省委领导参加劳动", "谢世杰", "今天天气很好"]
    refs = ["北京音乐厅喜讯频传", "四川省领导参加水利劳动", "谢世杰", "明天天气很好啊"]
    ours = metrics.corpus_bleu_n(hyps, refs)
    want = {f"bleu-{n}": _bleu_by_formula(hyps, refs, n) for n in range(1, 5)}
    assert ours == pytest.approx(want, abs=1e-9)
    assert [round(ours[k], 4) for k in sorted(ours)] == [round(want[k], 4) for k in sorted(want)]
    assert 0 < ours["bleu-4"] < ours["bleu-1"] < 100


# ----------------------------------------------------------------------------- LoRA / PEFT


def _tiny_uer_t5(directory: Path) -> transformers.T5ForConditionalGeneration:
    """A tiny random T5 v1.0 laid out as UER's Chinese T5 (a BERT vocab.txt of the demo
    characters, eos [SEP], decoder start [CLS]) whose config.json keeps T5's defaults (start
    0, eos 1), as t5-pegasus's does."""
    chars = sorted({c for line in (ROOT / "data/t5_qa/train.jsonl").read_text(
        encoding="utf-8").splitlines()[:48] for c in json.loads(line)["context"]
        + json.loads(line)["answer"] + json.loads(line)["question"]} | set("问题答案原文：")
                   - {" "})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, feed_forward_proj="relu"))
    ref.save_pretrained(directory)
    return ref


def test_lora_run_exports_a_peft_seq2seq_adapter(data_dir, tmp_path):
    ckpt = tmp_path / "uer-t5"
    ckpt.mkdir()
    _tiny_uer_t5(ckpt)
    config = tiny_config("t5_qa", data_dir, tmp_path / "run", steps=3)
    config.model.path = str(ckpt)
    config.model.lora.rank, config.model.lora.dropout = 4, 0.0
    task = tasks.create(config)
    task.run(tmp_path / "run")
    again = tasks.create(config, "export")
    model, tok, _ = train.restore_model(again, tmp_path / "run")
    # The tokenizer's start and end replace the config's (0 and 1).
    assert (model.config.decoder_start_token_id, model.config.eos_token_id) == (2, 3)
    assert (tok.decoder_start_token_id, tok.eos_token_id) == (2, 3)
    again.export(model, tok, str(tmp_path / "adapter"))
    adapter = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert sorted(adapter["target_modules"]) == ["q", "v"]
    _, dev = again.datasets(tok)
    b = next(dev.data.eval_batches(4))
    base = transformers.T5ForConditionalGeneration.from_pretrained(ckpt).eval()
    with torch.no_grad():
        plain = base(input_ids=torch.tensor(b["input_ids"]).long(),
                     attention_mask=torch.tensor(b["attention_mask"]).long(),
                     decoder_input_ids=torch.tensor(b["decoder_input_ids"]).long()).logits
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ours = np.asarray(model(b["input_ids"], b["attention_mask"], b["decoder_input_ids"],
                            b["decoder_attention_mask"]))
    with torch.no_grad():
        theirs = with_adapter(
            input_ids=torch.tensor(b["input_ids"]).long(),
            attention_mask=torch.tensor(b["attention_mask"]).long(),
            decoder_input_ids=torch.tensor(b["decoder_input_ids"]).long(),
            decoder_attention_mask=torch.tensor(b["decoder_attention_mask"]).long(),
        ).logits.numpy()
    mask = b["decoder_attention_mask"].astype(bool)
    assert np.abs(ours - theirs)[mask].max() < 1e-4
    # The adapters were trained: the base model alone gives other logits.
    assert np.abs(plain.numpy() - theirs)[mask].max() > 1e-4
    # A vocab.txt that does not belong to the checkpoint: both sizes named.
    (ckpt / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    with pytest.raises(UserError, match="the tokenizer has 5 tokens but the model's vocab_size"):
        tasks.create(config).build()
