"""PET and p-tuning: the verbalizer (loss against numpy, the decode rules), the [MASK] slots
found in padded batches, the attention mask in use, a pretrained masked LM against
transformers, a short train + eval + predict + export run of each task, and bad input."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import p_tuning as p_tuning_config
from configs import pet as pet_config
from lib import train
from lib.errors import UserError
from lib.tokenizer import CharVocab
from lib.verbalizer import Verbalizer, longest_common_substring, mask_loss, mask_positions
from tasks import p_tuning, pet

LABELS = ["正面", "负面"]
ROWS = ["正面\t质量很好，非常满意", "负面\t太差了，再也不买", "正面\t物流快，包装好",
        "负面\t做工粗糙，不满意"]
TASKS = {"pet": (pet_config, pet.Task), "p_tuning": (p_tuning_config, p_tuning.Task)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pet")
    (d / "train.tsv").write_text("\n".join(ROWS * 4) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text("\n".join(ROWS) + "\n", encoding="utf-8")
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return d


def tiny_config(data_dir, workdir, name="pet", **train_kw):
    module, _ = TASKS[name]
    c = module.get_config("demo")
    c.workdir = str(workdir)
    c.data.train = str(data_dir / "train.tsv")
    c.data.eval = c.data.test = str(data_dir / "dev.tsv")
    c.data.labels = str(data_dir / "labels.txt")
    c.data.max_length = 24
    c.model.hidden_size, c.model.num_hidden_layers, c.model.num_attention_heads = 32, 1, 2
    c.model.intermediate_size, c.model.min_char_freq, c.model.dropout = 64, 1, 0.0
    c.train.update({"steps": 80, "batch_size": 8, "lr": 3e-3, **train_kw})
    c.log.every, c.eval.every, c.checkpoint.every, c.eval.batch_size = 10, 40, 40, 8
    return c


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- verbalizer


def test_mask_loss_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 7)).astype(np.float32)
    targets = np.array([[1, 2], [6, 0], [3, 3]], np.int32)
    want = -np.mean([log_softmax(logits[b, k])[targets[b, k]]
                     for b in range(3) for k in range(2)])
    assert float(mask_loss(jnp.asarray(logits), jnp.asarray(targets))) == pytest.approx(
        want, rel=1e-6)


def test_longest_common_substring():
    assert longest_common_substring("正面评价", "负面评论") == 2  # 面评
    assert longest_common_substring("abc", "xyz") == 0
    assert longest_common_substring("", "abc") == 0
    assert longest_common_substring((1, 2, 3, 4), (0, 2, 3, 4, 9)) == 3


def test_decode_exact_then_longest_common_substring_then_first_label():
    vocab = CharVocab.build(["正面负面中性好坏评价"])
    verbalizer = Verbalizer(["正面", "负面", "中性评价"], vocab)
    assert verbalizer.length == 4
    ids = lambda word: [vocab.convert_tokens_to_ids(c) for c in word]
    pad = vocab.pad_id
    np.testing.assert_array_equal(verbalizer.ids[0], ids("正面") + [pad, pad])
    slots = np.array([
        ids("正面") + [pad, pad],  # exact (padding dropped)
        ids("中性评价"),  # exact, the longest word
        ids("负面好坏"),  # no exact word: 负面 shares 2 tokens, 正面 1, 中性评价 0
        ids("坏面评价"),  # 中性评价 shares 评价 (2): beats 正面 / 负面 (面, 1)
        ids("好面") + [pad, pad],  # 正面 and 负面 tie at 1: the earlier label
        ids("好坏好坏"),  # no overlap with any word: the first label
        [pad] * 4,  # nothing written at all: the first label
    ], np.int32)
    np.testing.assert_array_equal(verbalizer.decode(slots), [0, 2, 1, 2, 0, 0, 0])
    assert verbalizer.word(slots[0]) == "正面"


def test_unknown_label_word_is_an_error():
    vocab = CharVocab.build(["正面"])
    with pytest.raises(UserError, match="config.data.labels: label word '负面' has no tokens "
                                        "or an unknown one"):
        Verbalizer(["正面", "负面"], vocab)


def test_mask_positions_with_left_and_right_padding():
    m, p = 9, 0
    ids = np.array([
        [2, 5, m, m, 7, 3, p, p],  # right-padded
        [p, p, 2, 5, m, m, 7, 3],  # left-padded
        [2, m, m, 4, 4, 4, 4, 3],  # no padding, slots right after [CLS]
    ], np.int32)
    np.testing.assert_array_equal(np.asarray(mask_positions(jnp.asarray(ids), m, 2)),
                                  [[2, 3], [4, 5], [1, 2]])


def test_char_vocab_reserves_prompt_tokens(tmp_path):
    vocab = CharVocab.build(["好坏"])
    more = vocab.with_specials(["[unused1]", "[unused2]", "[MASK]"])
    assert more.tokens[: vocab.vocab_size] == vocab.tokens  # existing ids keep their meaning
    assert more.tokens[vocab.vocab_size:] == ["[unused1]", "[unused2]"]
    assert more.with_specials(["[unused1]"]) is more
    assert more.encode("好") == vocab.encode("好")
    ids = more.convert_tokens_to_ids(["[unused1]", "[unused2]"])
    assert set(ids) <= set(more.all_special_ids)
    more.save(tmp_path)
    assert CharVocab.load(tmp_path).tokens == more.tokens


# ----------------------------------------------------------------------------- the tasks


@pytest.mark.parametrize("name", list(TASKS))
def test_inputs_and_loss_against_numpy(data_dir, tmp_path, name):
    config = tiny_config(data_dir, tmp_path, name)
    task = TASKS[name][1](config)
    model, tok = task.build()
    train_data, _ = task.datasets(tok)
    ids = train_data.arrays["input_ids"][0]
    n = int(train_data.arrays["attention_mask"][0].sum())
    prompt = "[unused1][unused2][unused3][unused4][unused5][unused6]" if name == "p_tuning" else ""
    text = ("这是一条[MASK][MASK]评论：质量很好，非常满意。" if name == "pet"
            else "[MASK][MASK]质量很好，非常满意")
    assert tok.decode(ids[:n]) == "[CLS]" + prompt + text + "[SEP]"
    assert (ids[n:] == tok.pad_id).all()

    batch = {k: jnp.asarray(v) for k, v in train_data.batch(0, 8, 0, shuffle=False).items()}
    loss, aux = task.loss(model, batch, None)
    # The full masked-LM logits, read at the [MASK] columns found here in numpy.
    full = np.asarray(model(batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"]), np.float64)
    labels = np.asarray(batch["labels"])
    nll, exact = [], []
    for b in range(8):
        cols = np.flatnonzero(np.asarray(batch["input_ids"][b]) == tok.mask_id)
        word = task.verbalizer.ids[labels[b]]
        logp = log_softmax(full[b, cols])
        nll += [-logp[k, word[k]] for k in range(len(cols))]
        exact.append((full[b, cols].argmax(-1) == word).all())
    assert float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
    assert float(aux["accuracy"]) == pytest.approx(np.mean(exact))


@pytest.mark.parametrize("name", list(TASKS))
def test_padding_changes_nothing(data_dir, tmp_path, name):
    """The attention mask is used: more padding leaves the slot logits as they were (and
    without the mask they would change)."""
    config = tiny_config(data_dir, tmp_path, name)
    config.data.max_length = 40
    task = TASKS[name][1](config)
    model, tok = task.build()
    texts = ["质量很好，非常满意", "太差了"]
    task.max_length = 24
    short = {k: jnp.asarray(v) for k, v in task.encode(tok, texts).items()}
    task.max_length = 40
    long = {k: jnp.asarray(v) for k, v in task.encode(tok, texts).items()}
    assert long["input_ids"].shape == (2, 40)
    a, b = np.asarray(task.slot_logits(model, short)), np.asarray(task.slot_logits(model, long))
    assert np.abs(a - b).max() < 1e-5
    unmasked = dict(long, attention_mask=jnp.ones_like(long["attention_mask"]))
    assert np.abs(a - np.asarray(task.slot_logits(model, unmasked))).max() > 1e-3


@pytest.mark.parametrize("name", list(TASKS))
def test_train_eval_predict_export(data_dir, tmp_path, name, capsys):
    config = tiny_config(data_dir, tmp_path, name)
    metrics = train.train(config, tmp_path, TASKS[name][1].create(config))
    # Four distinct texts, seen 80 times each: learned exactly.
    assert metrics["accuracy"] == metrics["f1"] == metrics["f1/正面"] == metrics["f1/负面"] == 1.0
    out = capsys.readouterr().out
    assert "global step 10, epoch: 5, loss: " in out and " step/s" in out
    assert "best F1 performance updated: - --> " in out
    prefix = "Each Class Metrics are: "
    per_class = json.loads([line for line in out.splitlines()
                            if line.startswith(prefix)][-1][len(prefix):])
    assert per_class == {"正面": {"precision": 1.0, "recall": 1.0, "f1": 1.0},
                         "负面": {"precision": 1.0, "recall": 1.0, "f1": 1.0}}
    assert sorted(train.read_evals(tmp_path)) == [40, 80]

    task = TASKS[name][1].create(config, "predict")
    model, tok, step = train.restore_model(task, tmp_path)
    assert step == 80
    recs = task.predict(model, tok, ["质量很好，非常满意", "太差了，再也不买"])
    assert [(r["label"], r["word"]) for r in recs] == [("正面", "正面"), ("负面", "负面")]

    # The export is a plain HF masked LM giving the same slot logits.
    task.export(model, tok, str(tmp_path / "export"))
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "export").eval()
    arrays = task.encode(tok, ["质量很好，非常满意", "太差了"])
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(arrays["input_ids"], dtype=torch.long),
                    attention_mask=torch.tensor(arrays["attention_mask"])).logits.numpy()
    ours = np.asarray(task.slot_logits(model, {k: jnp.asarray(v) for k, v in arrays.items()}))
    cols = np.argwhere(arrays["input_ids"] == tok.mask_id)
    assert np.abs(theirs[cols[:, 0], cols[:, 1]].reshape(ours.shape) - ours).max() < 1e-4


@pytest.fixture(scope="module", params=["bert", "ernie"])
def hf_mlm(tmp_path_factory, request):
    """A tiny random HF BERT (or ERNIE 3.0) masked LM with a vocab.txt of the test's
    characters and the reserved [unused1..6] tokens."""
    d = tmp_path_factory.mktemp("hf_mlm")
    chars = sorted(set("".join(ROWS) + "这是一条评论：。"))
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 7)] + ["[UNK]", "[CLS]", "[SEP]",
                                                                    "[MASK]"] + chars
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizer.from_pretrained(d).save_pretrained(d)
    torch.manual_seed(0)
    sizes = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
    if request.param == "ernie":
        cfg = transformers.ErnieConfig(**sizes, use_task_id=True, task_type_vocab_size=3)
        model = transformers.ErnieForMaskedLM(cfg).eval()
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(**sizes)).eval()
    model.save_pretrained(d)
    return d, model


@pytest.mark.parametrize("name", list(TASKS))
def test_pretrained_masked_lm_matches_transformers(data_dir, tmp_path, hf_mlm, name):
    directory, ref = hf_mlm
    config = tiny_config(data_dir, tmp_path, name)
    config.model.path = str(directory)
    task = TASKS[name][1].create(config)
    model, tok = task.build()
    arrays = task.encode(tok, ["质量很好，非常满意", "太差了"])
    if name == "p_tuning":
        np.testing.assert_array_equal(arrays["input_ids"][:, 1:7], [list(range(1, 7))] * 2)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(arrays["input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(arrays["attention_mask"])).logits.numpy()
    ours = np.asarray(task.slot_logits(model, {k: jnp.asarray(v) for k, v in arrays.items()}))
    cols = np.argwhere(arrays["input_ids"] == tok.mask_token_id)
    diff = np.abs(theirs[cols[:, 0], cols[:, 1]].reshape(ours.shape) - ours).max()
    assert ours.shape == (2, 2, len(tok)) and diff < 1e-4

    # An HF tokenizer reads "[MASK]" in a text as the token: it becomes [UNK], not a slot.
    tricky = task.encode(tok, ["好[MASK]好"])["input_ids"][0]
    assert tok.encode("好[MASK]好", add_special_tokens=False)[1] == tok.mask_token_id
    assert (tricky == tok.mask_token_id).sum() == 2 and tok.unk_token_id in tricky

    if name == "p_tuning":
        config.model.prompt_tokens = 7
        with pytest.raises(UserError, match=r"prompt_tokens=7: the model's vocabulary has no "
                                            r"\[unused7\] token"):
            TASKS[name][1].create(config).build()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("template", ["这是一条评论：{textA}。", "{MASK}{MASK}{textA}", "{MASK}"])
def test_bad_template_is_one_line(data_dir, tmp_path, template):
    config = tiny_config(data_dir, tmp_path)
    config.data.template = template
    with pytest.raises(UserError, match=r"config.data.template=.*: must hold \{MASK\} and "
                                        r"\{textA\} once each"):
        pet.Task.create(config)


def test_bad_values_name_their_key_or_line(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path, "p_tuning")
    config.model.prompt_tokens = 0
    with pytest.raises(UserError, match="config.model.prompt_tokens=0: must be >= 1"):
        p_tuning.Task.create(config)

    bad = tmp_path / "bad.tsv"
    bad.write_text("正面\t很好\n中性\t一般\n", encoding="utf-8")
    config = tiny_config(data_dir, tmp_path)
    config.data.train = str(bad)
    with pytest.raises(UserError, match=f"{bad}:2: label '中性' is not one of 正面, 负面"):
        pet.Task.create(config).build()

    config = tiny_config(data_dir, tmp_path)
    config.data.max_length = 13  # [CLS] 这是一条 [MASK]x2 评论： (text) 。 [SEP]: 12 + the text
    task = pet.Task.create(config)
    _, tok = task.build()
    assert task.encode(tok, ["好好"])["attention_mask"].sum() == 13  # cut to one character
    task.max_length = 12
    with pytest.raises(UserError, match="config.data.max_length=12 leaves no room for the "
                                        "text: the prompt, 2 .MASK. slots and .CLS./.SEP. "
                                        "take 12 tokens"):
        task.encode(tok, ["好"])
