"""SimCSE / ESimCSE: word repetition against a plain loop, the contrastive loss against numpy,
padding that changes nothing, one tiny ESimCSE training with its metrics recomputed (sklearn,
scipy or numpy), predict, the HF export, and bad input."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import simcse as simcse_config
from lib import pairs, train
from lib.errors import UserError
from tasks.simcse import (
    Task,
    contrastive_loss,
    repeat_tokens,
    repetition_choice,
    word_repetition,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("simcse")
    lines = (ROOT / "data/simcse/train.txt").read_text(encoding="utf-8").splitlines()
    (d / "train.txt").write_text("\n".join(lines[:64]) + "\n", encoding="utf-8")
    pairs_ = (ROOT / "data/matching/dev.tsv").read_text(encoding="utf-8").splitlines()
    (d / "dev.tsv").write_text("\n".join(pairs_[:24]) + "\n", encoding="utf-8")
    return d


def tiny_config(data_dir, workdir, variant="demo", **train_kw):
    c = simcse_config.get_config(variant)
    c.workdir = str(workdir)
    c.data.train = str(data_dir / "train.txt")
    c.data.eval = c.data.test = str(data_dir / "dev.tsv")
    c.data.max_length = 32
    c.model.hidden_size, c.model.num_hidden_layers, c.model.num_attention_heads = 16, 1, 2
    c.model.intermediate_size, c.model.min_char_freq, c.model.projection = 32, 1, 8
    c.train.update({"steps": 4, "batch_size": 8, **train_kw})
    c.log.every, c.eval.every, c.checkpoint.every, c.eval.batch_size = 2, 4, 4, 8
    c.predict.candidates = ("北京举行新年音乐会", "明天气象预报", "江泽民会见美国客人")
    return c


# ----------------------------------------------------------------------------- pure parts


def repeat_reference(ids, mask, repeat):
    """The original's loop: write each chosen token twice, pad; cut to the width keeping
    [SEP] last."""
    out_ids, out_mask = [], []
    for row, m, r in zip(ids, mask, repeat):
        n = int(m.sum())
        seq = []
        for j in range(n):
            seq += [row[j]] * (2 if r[j] else 1)
        if len(seq) > len(row):
            seq = seq[: len(row) - 1] + [row[n - 1]]
        out_ids.append(seq + [0] * (len(row) - len(seq)))
        out_mask.append([1] * len(seq) + [0] * (len(row) - len(seq)))
    return np.array(out_ids), np.array(out_mask)


def test_repeat_tokens_against_a_loop():
    ids = np.array([[2, 11, 12, 13, 3, 0, 0, 0], [2, 21, 22, 23, 24, 25, 26, 3]], np.int32)
    mask = (ids > 0).astype(np.int32)
    repeat = np.array([[0, 1, 0, 1, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0, 1, 0]], np.int32)
    got_ids, got_mask = repeat_tokens(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(repeat))
    want_ids, want_mask = repeat_reference(ids, mask, repeat)
    # Row 0: 11 and 13 doubled (the padding's flags are ignored); row 1 is cut to 8, [SEP] last.
    np.testing.assert_array_equal(want_ids, [[2, 11, 11, 12, 13, 13, 3, 0],
                                             [2, 21, 21, 22, 22, 23, 24, 3]])
    np.testing.assert_array_equal(np.asarray(got_ids), want_ids)
    np.testing.assert_array_equal(np.asarray(got_mask), want_mask)


def test_repetition_choice_picks_at_most_rate_times_length_inner_tokens():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=64)
    mask = (np.arange(48)[None] < lengths[:, None]).astype(np.int32)
    counts = []
    for seed in range(4):
        choice = np.asarray(repetition_choice(jax.random.key(seed), jnp.asarray(mask), 0.32))
        for row, n in zip(choice, lengths):
            assert not row[0] and not row[n - 1:].any()  # never [CLS], [SEP] or padding
            assert row.sum() <= int(0.32 * n)
            counts.append(int(row.sum()))
    # k is uniform over 0..floor(0.32 n): both ends occur.
    assert min(counts) == 0 and max(counts) == int(0.32 * lengths.max())
    ids = np.where(mask > 0, 5, 0)
    out, out_mask = word_repetition(jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask), 0.32)
    choice = np.asarray(repetition_choice(jax.random.key(0), jnp.asarray(mask), 0.32))
    np.testing.assert_array_equal(np.asarray(out_mask).sum(1), lengths + choice.sum(1))


def test_contrastive_loss_against_numpy():
    rng = np.random.default_rng(1)
    u, v = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 6, 5)))
    logits = 20.0 * u @ v.T
    logits -= logits.max(1, keepdims=True)
    want = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
    got = float(contrastive_loss(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32), 20.0))
    assert got == pytest.approx(want, rel=1e-5)


def test_task_loss_and_the_attention_mask(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path)
    config.model.sentence_pooling = ""  # the original's pooler output
    task = Task(config)
    model, tok = task.build()
    assert model.pooling == "pooler" and model.projection_size == 8
    train_data, _ = task.datasets(tok)
    batch = {k: jnp.asarray(v) for k, v in train_data.batch(0, 8, 0, shuffle=False).items()}
    u = np.asarray(model.embed(batch["input_ids"], batch["attention_mask"]), np.float64)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-5)
    loss, aux = task.loss(model, batch, None)  # no dropout: the two views are one
    logits = 20.0 * u @ u.T
    want = np.mean(np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
                   + logits.max(1) - np.diag(logits))
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert 0.0 <= float(aux["accuracy"]) <= 1.0
    # Dropout views differ: the loss is larger than with identical views.
    assert float(task.loss(model, batch, jax.random.key(0))[0]) > float(loss)
    # Padding is masked out: the same sentences padded to 32 or to 20 give the same vectors
    # (and different sentences different ones).
    texts = ["北京举行新年音乐会", "明天气象预报", "江泽民会见美国客人"]
    wide, narrow = (pairs.encode_texts(tok, texts, n) for n in (32, 20))
    a, b = (np.asarray(model.embed(jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"])))
            for x in (wide, narrow))
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a[0] - a[1]).max() > 1e-4


# ----------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One ESimCSE run (word repetition inside the sharded step), restored for predict."""
    workdir = tmp_path_factory.mktemp("esimcse-run")
    config = tiny_config(data_dir, workdir, "esimcse-demo")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        metrics = train.train(config, workdir, Task.create(config))
    task = Task.create(config, "predict")
    model, tok, step = train.restore_model(task, workdir)
    assert step == 4
    return config, workdir, metrics | {"log": log.getvalue()}, (task, model, tok)


def spearman_reference(x, y):
    try:
        from scipy.stats import spearmanr
    except ImportError:  # average ranks of ties, then Pearson
        def ranks(a):
            a = np.asarray(a, np.float64)
            order = np.argsort(a, kind="stable")
            r = np.empty(len(a))
            r[order] = np.arange(1, len(a) + 1)
            for value in np.unique(a):
                r[a == value] = r[a == value].mean()
            return r
        return float(np.corrcoef(ranks(x), ranks(y))[0, 1])
    return float(spearmanr(x, y).statistic)


def test_train_eval_and_metrics_recomputed(trained):
    config, workdir, metrics, (_, model, tok) = trained
    assert config.loss.word_repetition == 0.32
    assert "global step 2, epoch: 1, loss: " in metrics["log"] and " step/s" in metrics["log"]
    assert "best F1 performance updated: - --> " in metrics["log"]
    assert sorted(train.read_evals(workdir)) == [4]
    assert (workdir / "plots" / "curves.png").is_file()
    eval_set = pairs.read_pair_set(config.data.eval, "data.eval", tok, 32, towers=True)
    a, b = (model.embed(**{k: jnp.asarray(v) for k, v in pairs.side(eval_set.data.arrays,
                                                                    p).items()})
            for p in pairs.SIDES)
    cos = np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=1)
    gold = eval_set.data.arrays["labels"]
    pred = (cos > 0.5).astype(int)
    sklearn = pytest.importorskip("sklearn.metrics")
    p, r, f1, _ = sklearn.precision_recall_fscore_support(gold, pred, average="macro",
                                                           zero_division=0)
    assert metrics["precision"] == pytest.approx(p) and metrics["recall"] == pytest.approx(r)
    assert metrics["f1"] == pytest.approx(f1)
    assert metrics["accuracy"] == pytest.approx(np.mean(pred == gold))
    assert metrics["spearman"] == pytest.approx(spearman_reference(cos, gold), abs=1e-5)


def test_predict_pairs_and_ranking(trained, capsys):
    config, _, _, (task, model, tok) = trained
    capsys.readouterr()
    pair, ranking = task.predict(model, tok, ["北京举行新年音乐会\t明天气象预报", "新年音乐会"])
    assert capsys.readouterr().err.count("Used ") == 1
    assert set(pair) == {"s1", "s2", "cosine"} and -1 <= pair["cosine"] <= 1
    assert {c for c, _ in ranking["ranking"]} == set(config.predict.candidates)
    scores = [s for _, s in ranking["ranking"]]
    assert scores == sorted(scores, reverse=True)
    # The ranking's cosine of a candidate is the pair cosine of the same two texts.
    (again,) = task.predict(model, tok, ["新年音乐会\t" + ranking["ranking"][0][0]])
    assert again["cosine"] == pytest.approx(scores[0], abs=2e-4)
    with pytest.raises(UserError, match="predict input line 1: expected one text, or two"):
        task.predict(model, tok, ["a\tb\tc"])


def test_export_reloads_in_transformers(trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, _, _, (task, model, tok) = trained
    task.export(model, tok, str(tmp_path / "export"))
    hf = transformers.BertModel.from_pretrained(tmp_path / "export").eval()
    arrays = pairs.encode_texts(tok, ["北京举行新年音乐会", "明天气象预报"], 16)
    states, pooled = model.encoder(jnp.asarray(arrays["input_ids"]),
                                   jnp.asarray(arrays["attention_mask"]))
    with torch.no_grad():
        out = hf(**{k: torch.tensor(v, dtype=torch.long) for k, v in arrays.items()})
    mask = arrays["attention_mask"][..., None] > 0
    np.testing.assert_allclose(np.asarray(states) * mask, out.last_hidden_state.numpy() * mask,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_a_tab_in_the_sentences_is_one_line_via_the_cli(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("一个句子。\n两个\t句子。\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/simcse.py", f"--workdir={tmp_path}/w",
         f"--config.data.train={bad}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {bad}:2: expected 1 tab-separated columns (text), "
                                   "got 2")


def test_config_rules(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path)
    config.loss.word_repetition = 1.5
    with pytest.raises(UserError, match=r"loss.word_repetition=1.5: must be in \[0, 1\)"):
        Task.create(config)
    config = tiny_config(data_dir, tmp_path)
    config.model.sentence_pooling = "max"
    with pytest.raises(UserError, match="model.sentence_pooling='max': choose one of"):
        Task.create(config)
    for variant in ("bert-base-chinese", "roberta-wwm-ext", "ernie-3.0-base"):
        c = simcse_config.get_config(variant)
        assert c.model.hub_id and c.model.sentence_pooling == "" and c.loss.scale == 20.0
    assert simcse_config.get_config("demo").loss.word_repetition == 0.0
