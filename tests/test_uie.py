"""UIE: the pointer-head checkpoint against PyTorch (parity, strict load, export), the span
decoder on fixed probabilities, the span scores, the loss against numpy, data errors naming
file:line, and a short train / eval / predict / export run."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from configs import uie as uie_config
from lib import hf, spans, train
from lib.errors import UserError
from lib.models import bert
from lib.tokenizer import CharVocab
from tasks.uie import Task, read_records, span_scores

ERNIE = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=24, max_position_embeddings=32, use_task_id=True,
             task_type_vocab_size=3)


# ----------------------------------------------------------------------------- checkpoint


def _torch_uie(seed=0):
    """The PyTorch UIE of the conversions: ``encoder`` (an ErnieModel with its pooler) and two
    Linear(hidden, 1) pointer heads."""
    torch.manual_seed(seed)
    encoder = transformers.ErnieModel(transformers.ErnieConfig(**ERNIE)).eval()
    heads = torch.nn.ModuleDict({"linear_start": torch.nn.Linear(16, 1),
                                 "linear_end": torch.nn.Linear(16, 1)})
    return encoder, heads


def _save_uie(path, encoder, heads, drop=(), extra=None):
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({k: v for k, v in heads.state_dict().items()})
    state.update(extra or {})
    for key in drop:
        del state[key]
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    cfg = dict(encoder.config.to_dict(), architectures=["UIE"])
    (path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return path


def _inputs():
    rng = np.random.RandomState(0)
    mask = np.ones((2, 10), np.int64)
    mask[1, 6:] = 0
    types = np.zeros((2, 10), np.int64)
    types[:, 4:] = 1
    return dict(input_ids=rng.randint(1, 60, (2, 10)) * mask, attention_mask=mask,
                token_type_ids=types)


def _torch_probs(encoder, heads, batch):
    with torch.no_grad():
        x = encoder(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
        return [torch.sigmoid(heads[n](x)[..., 0]).numpy() for n in ("linear_start",
                                                                      "linear_end")]


def _our_probs(model, batch):
    start, end = model(**{k: jnp.asarray(v) for k, v in batch.items()})
    return [1 / (1 + np.exp(-np.asarray(x, np.float64))) for x in (start, end)]


def test_uie_checkpoint_parity_and_export(tmp_path):
    encoder, heads = _torch_uie()
    src = _save_uie(tmp_path / "uie", encoder, heads)
    model, cfg = bert.load_pretrained(src, bert.BertForUIE)
    assert cfg.model_type == "ernie" and cfg.use_task_id
    batch = _inputs()
    for theirs, ours in zip(_torch_probs(encoder, heads, batch), _our_probs(model, batch)):
        diff = float(np.abs(theirs - ours).max())
        print(f"UIE start/end probability max abs diff {diff:.2e}")
        assert diff <= 1e-5
    # Export writes the same layout back: the same keys, the same values, architectures UIE.
    out = bert.export_pretrained(model, cfg, tmp_path / "export")
    theirs, ours = hf.load_state_dict(src), hf.load_state_dict(out)
    assert sorted(ours) == sorted(theirs)
    assert max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours) == 0.0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["UIE"]


def test_uie_strict_load(tmp_path, caplog):
    encoder, heads = _torch_uie()
    extra = _save_uie(tmp_path / "extra", encoder, heads,
                      extra={"linear_mid.weight": torch.zeros(1, 16)})
    with pytest.raises(UserError, match=r"unexpected keys \[linear_mid.weight\]"):
        bert.load_pretrained(extra, bert.BertForUIE)
    half = _save_uie(tmp_path / "half", encoder, heads, drop=("linear_end.bias",))
    with pytest.raises(UserError, match=r"missing keys \[linear_end.bias\]"):
        bert.load_pretrained(half, bert.BertForUIE)
    # A plain ERNIE (ernie.* keys, no pointer heads) is an encoder to fine-tune: fresh heads.
    plain = tmp_path / "plain"
    transformers.ErnieForMaskedLM(transformers.ErnieConfig(**ERNIE)).save_pretrained(plain)
    with caplog.at_level(logging.WARNING):
        model, _ = bert.load_pretrained(plain, bert.BertForUIE)
    assert "checkpoint has no linear_start: initialized randomly" in caplog.text
    # Fresh heads start at the 1% prior: sigmoid(bias) = 0.01.
    np.testing.assert_allclose(1 / (1 + np.exp(-np.asarray(model.linear_end.bias[...]))), [0.01],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- span decoding

VOCAB = CharVocab.build(["人物张三在北京会见李四。的"])


def _window(content="张三在北京会见李四。", prompt="人物", max_length=16, stride=0):
    return spans.windows(VOCAB, prompt, content, max_length, stride)


def test_windows_layout():
    (w,) = _window()
    # [CLS] 人 物 [SEP] 张 三 在 北 京 会 见 李 四 。 [SEP] [PAD]
    assert VOCAB.decode(w.input_ids[:15]) == "[CLS]人物[SEP]张三在北京会见李四。[SEP]"
    assert w.token_type_ids.tolist() == [0] * 4 + [1] * 11 + [0]
    assert w.char_start.tolist() == [-1] * 4 + list(range(10)) + [-1, -1]
    start, end = spans.targets(w, [(0, 2), (7, 9)])
    assert np.flatnonzero(start).tolist() == [4, 11] and np.flatnonzero(end).tolist() == [5, 12]


def test_windows_of_a_wordpiece_tokenizer_map_tokens_to_characters(tmp_path):
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "人", "物", "ab", "##c", "张",
                   "三", "在"]) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizer.from_pretrained(tmp_path)  # what load_hf_tokenizer gives
    content = "ABC 张三在"  # lowercased wordpieces ab ##c, then a space that is no token
    (w,) = spans.windows(tok, "人物", content, 12, 0)
    assert tok.convert_ids_to_tokens(w.input_ids[:10].tolist()) == [
        "[CLS]", "人", "物", "[SEP]", "ab", "##c", "张", "三", "在", "[SEP]"]
    assert list(zip(w.char_start[4:9], w.char_end[4:9])) == [(0, 2), (2, 3), (4, 5), (5, 6),
                                                             (6, 7)]
    start, end = spans.targets(w, [(0, 3), (4, 6)])
    assert np.flatnonzero(start).tolist() == [4, 6] and np.flatnonzero(end).tolist() == [5, 7]
    assert [(s, e) for s, e, _ in spans.decode(w, start, end)] == [(0, 3), (4, 6)]


def test_pairing_is_nearest_first():
    # Each end takes the last start before it (after the previous end); leftovers are dropped.
    assert spans.pair([1, 3], [5]) == [(3, 5)]
    assert spans.pair([1, 3], [2, 5]) == [(1, 2), (3, 5)]
    assert spans.pair([1], [2, 5]) == [(1, 2)]
    assert spans.pair([4], [2, 5]) == [(4, 5)]
    assert spans.pair([2, 2], [2]) == [(2, 2)]
    assert spans.pair([6], [1, 3]) == []


def test_decode_threshold_and_prompt_spans():
    (w,) = _window()
    start, end = np.zeros(16), np.zeros(16)
    start[[4, 11]] = [0.9, 0.8]  # 张, 李
    end[[5, 12]] = [0.7, 0.5]  # 三, 四 (0.5 is not above the threshold)
    assert spans.decode(w, start, end) == [(0, 2, pytest.approx(0.63))]
    end[12] = 0.51
    assert [s[:2] for s in spans.decode(w, start, end)] == [(0, 2), (7, 9)]
    # A start in the prompt pairs with the nearest end, and that span is dropped.
    start[:] = 0
    start[[1, 7]] = 0.9
    end[:] = 0
    end[[5, 8]] = 0.9
    assert [s[:2] for s in spans.decode(w, start, end)] == [(3, 5)]  # 北京; 物..三 dropped


def test_windows_cut_and_merge():
    content = "张三在北京会见李四。张三在北京会见李四。"
    ws = _window(content, max_length=12, stride=4)
    # 7 content tokens per window, a new window every 3 tokens.
    assert [(w.first, w.end) for w in ws] == [(0, 7), (3, 10), (6, 13), (9, 16), (12, 19),
                                              (15, 20)]
    assert [(w.cut_left, w.cut_right) for w in ws] == [(False, True)] + [(True, True)] * 4 \
        + [(True, False)]
    w0, w1 = ws[0], ws[1]
    at0 = lambda char: 4 + char  # noqa: E731 - window 0's position of a content character
    at1 = lambda char: 4 + char - 3  # noqa: E731
    p0s, p0e, p1s, p1e = (np.zeros(12) for _ in range(4))
    p0s[at0(1)], p0e[at0(2)] = 0.9, 0.9  # 三在, whole in window 0 only
    p0s[at0(4)], p0e[at0(5)] = 0.9, 0.9  # 京会 (chars 4-6), whole in both windows
    p0s[at0(6)], p0e[at0(6)] = 0.9, 0.9  # 见, window 0's last token: cut, dropped
    p1s[at1(3)], p1e[at1(3)] = 0.9, 0.9  # 北, window 1's first token: cut, dropped
    p1s[at1(4)], p1e[at1(5)] = 0.95, 0.95  # 京会 again, probability 0.9025
    p1s[at1(6)], p1e[at1(6)] = 0.9, 0.9  # 见, whole inside window 1
    found = [spans.decode(w0, p0s, p0e), spans.decode(w1, p1s, p1e)]
    assert [s[:2] for s in found[0]] == [(1, 3), (4, 6)]
    assert [s[:2] for s in found[1]] == [(4, 6), (6, 7)]
    merged = spans.merge(found)
    assert [(s, e) for s, e, _ in merged] == [(1, 3), (4, 6), (6, 7)]
    assert [p for _, _, p in merged] == pytest.approx([0.81, 0.9025, 0.81])
    # Without overlap (stride 0) nothing lies whole in a neighbour: edge spans are kept.
    assert [s[:2] for s in spans.decode(w0, p0s, p0e, overlap=False)] == [(1, 3), (4, 6),
                                                                            (6, 7)]


def test_span_scores_on_fixed_sets():
    pred = [{(0, 2), (5, 7)}, set(), {(1, 3)}, {(2, 4)}]
    gold = [{(0, 2)}, {(4, 6)}, {(1, 3), (8, 9)}, set()]
    prompts = ["人物", "人物", "地点", "新华社的记者"]
    out = span_scores(pred, gold, prompts, ("人物", "地点", "机构"))
    # All: 2 correct of 4 predicted and 4 gold. 人物: 1 of 2 and 2. 地点: 1 of 1 and 2.
    assert out == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "f1/人物": 0.5,
                                 "f1/地点": 2 / 3, "f1/relation": 0.0}, abs=1e-12)


# ----------------------------------------------------------------------------- task

# One prompt per content: the tiny model learns them in a few dozen steps (telling two prompts
# about one content apart takes a scratch model far longer).
RECORDS = [
    ("张三在北京会见李四。", "人物", [(0, 2), (7, 9)]),
    ("王五到上海。", "地点", [(3, 5)]),
    ("新华社记者赵六报道。", "新华社的记者", [(5, 7)]),
    ("今天下雨。", "人物", []),
    ("李四去广州开会。", "人物", [(0, 2)]),
    ("天津很冷。", "地点", [(0, 2)]),
]


def _line(content, prompt, found):
    return json.dumps({"content": content, "prompt": prompt, "result_list": [
        {"text": content[s:e], "start": s, "end": e} for s, e in found]}, ensure_ascii=False)


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(_line(*r) for r in RECORDS * 4) + "\n",
                                   encoding="utf-8")
    (d / "dev.jsonl").write_text("\n".join(_line(*r) for r in RECORDS) + "\n", encoding="utf-8")
    return d


def tiny_config(data_dir, workdir, **train_kw):
    c = uie_config.get_config("demo")
    c.workdir = str(workdir)
    c.data.train = str(data_dir / "train.jsonl")
    c.data.eval = c.data.test = str(data_dir / "dev.jsonl")
    c.data.max_length, c.data.stride = 16, 0
    c.model.hidden_size, c.model.num_hidden_layers, c.model.num_attention_heads = 32, 1, 2
    c.model.intermediate_size, c.model.min_char_freq, c.model.dropout = 64, 1, 0.0
    c.schema.entities = ("人物", "地点")
    c.schema.relations = {"机构": ("记者",)}
    c.train.update({"steps": 60, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0,
                    **train_kw})
    c.log.every, c.eval.every, c.checkpoint.every, c.eval.batch_size = 20, 30, 30, 8
    return c


def test_loss_against_numpy(data_dir, tmp_path):
    task = Task(tiny_config(data_dir, tmp_path))
    model, tok = task.build()
    train_data, _ = task.datasets(tok)
    batch = {k: jnp.asarray(v) for k, v in train_data.batch(0, 8, 0, shuffle=False).items()}
    loss, aux = task.loss(model, batch, None)
    start, end = (np.asarray(x, np.float64) for x in model(
        batch["input_ids"], attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"]))
    mask = np.asarray(batch["attention_mask"], np.float64)

    def bce(logits, labels):
        p = 1 / (1 + np.exp(-logits))
        return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))

    per_token = (bce(start, np.asarray(batch["start_labels"]))
                 + bce(end, np.asarray(batch["end_labels"]))) / 2
    assert float(loss) == pytest.approx((per_token * mask).sum() / mask.sum(), rel=1e-5)
    assert float(aux["weight"]) == mask.sum()


def test_data_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = _line("张三在北京。", "人物", [(0, 2)])
    bad.write_text(good + "\n\n" + '{"content": "张三", "result_list": []}\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_records(str(bad), "data.train")
    assert str(e.value) == f'{bad}:3: field "prompt" is missing (expected str)'
    wrong = json.dumps({"content": "张三在北京。", "prompt": "地点", "result_list": [
        {"text": "北京", "start": 2, "end": 4}]}, ensure_ascii=False)
    bad.write_text(good + "\n" + wrong + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_records(str(bad), "data.train")
    assert str(e.value) == (f"{bad}:2: result_list[0] '北京' does not match content[2:4] = "
                            "'在北' (start/end are character offsets into content, end "
                            "exclusive)")
    bad.write_text(_line("张三", " ", []) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:1: the prompt is empty"):
        read_records(str(bad), "data.train")
    bad.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl: no records .*--config.data.eval"):
        read_records(str(bad), "data.eval")


def test_train_eval_predict_export(data_dir, tmp_path, capsys):
    config = tiny_config(data_dir, tmp_path)
    metrics = train.train(config, tmp_path, Task.create(config))
    out = capsys.readouterr().out
    assert "global step 20, epoch: " in out and " step/s" in out
    assert "best F1 performance updated: - --> " in out
    evals = train.read_evals(tmp_path)
    assert sorted(evals) == [30, 60]
    print("dev metrics", evals)
    # The 6 gold spans of the 6 records (the training records) are found, and nothing else.
    assert metrics == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "f1/人物": 1.0,
                       "f1/地点": 1.0, "f1/relation": 1.0}

    task = Task.create(config, "predict")
    model, tok, step = train.restore_model(task, tmp_path)
    assert step in evals
    # Evaluation and prediction decode the same way: the scores of the answers of `ask`.
    records = read_records(config.data.eval, "data.eval")
    answers = task.ask(model, tok, [(r["content"], r["prompt"]) for r in records])
    pred = [{(a["start"], a["end"]) for a in found} for found in answers]
    gold = [{(s["start"], s["end"]) for s in r["result_list"]} for r in records]
    assert span_scores(pred, gold, [r["prompt"] for r in records], ("人物", "地点")) == \
        pytest.approx(metrics)

    # 人物 was asked of this content in training (地点 never was: no answer is checked for it).
    (rec,) = task.predict(model, tok, ["张三在北京会见李四。"])
    assert capsys.readouterr().err.startswith("[+] NER Results: {'人物': ['张三', '李四'], ")
    assert [(a["start"], a["end"]) for a in rec["entities"]["人物"]] == [(0, 2), (7, 9)]
    text = "新华社记者赵六报道。"
    (rec,) = task.predict(model, tok, [json.dumps({"text": text}, ensure_ascii=False)])
    err = capsys.readouterr().err.splitlines()
    ner = {t: [a["text"] for a in found]
           for t, found in zip(("人物", "地点"), task.ask(model, tok, [(text, "人物"),
                                                                      (text, "地点")]))}
    subjects = [a["text"] for a in task.ask(model, tok, [(text, "机构")])[0]]
    relations = {s: {"记者": [a["text"] for a in task.ask(model, tok, [(text, f"{s}的记者")])[0]]}
                 for s in subjects}
    assert err == [f"[+] NER Results: {ner}", f"[+] Information-Extraction Results: {relations}"]
    assert {t: [a["text"] for a in v] for t, v in rec["entities"].items()} == ner
    assert all(text[a["start"]:a["end"]] == a["text"] and 0 < a["probability"] <= 1
               for v in rec["entities"].values() for a in v)

    # The export is the PyTorch UIE layout: transformers' encoder + two Linear layers read it
    # strictly and give the same probabilities.
    export = tmp_path / "export"
    task.export(model, tok, str(export))
    state = load_file(str(export / "model.safetensors"))
    encoder = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(export))
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items()
                             if k.startswith("encoder.")})
    heads = torch.nn.ModuleDict({n: torch.nn.Linear(32, 1) for n in ("linear_start",
                                                                      "linear_end")})
    heads.load_state_dict({k: v for k, v in state.items() if k.startswith("linear_")})
    batch = task.encode(tok, [{"content": "张三在北京。", "prompt": "人物", "result_list": []}],
                        False)[2]
    batch = {k: v.astype(np.int64) for k, v in batch.items()}
    for theirs, ours in zip(_torch_probs(encoder.eval(), heads, batch), _our_probs(model, batch)):
        assert float(np.abs(theirs - ours).max()) <= 1e-5
