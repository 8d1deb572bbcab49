"""Text matching: the poolers, each variant's loss against numpy, a tiny training run per
variant with its predict output, the HF export of the pointwise model, and bad input."""

import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configs import matching as matching_config
from lib import train
from lib.models.pooling import cosine, mean_pool, pair_features, pool
from lib.pairs import read_pairs
from tasks.matching import Task

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("pointwise", "dssm", "sentence-transformer")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("matching")
    lines = (ROOT / "data/matching/train.tsv").read_text(encoding="utf-8").splitlines()
    (d / "train.tsv").write_text("\n".join(lines[:48]) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text("\n".join(lines[48:64]) + "\n", encoding="utf-8")
    return d


def tiny_config(data_dir, workdir, variant="pointwise", **train_kw):
    c = matching_config.get_config(variant)
    c.workdir = str(workdir)
    c.data.train = str(data_dir / "train.tsv")
    c.data.eval = c.data.test = str(data_dir / "dev.tsv")
    c.data.max_length = 32
    c.model.hidden_size, c.model.num_hidden_layers, c.model.num_attention_heads = 16, 1, 2
    c.model.intermediate_size, c.model.min_char_freq, c.model.dropout = 32, 1, 0.0
    c.train.update({"steps": 4, "batch_size": 8, **train_kw})
    c.log.every, c.eval.every, c.checkpoint.every, c.eval.batch_size = 2, 4, 4, 8
    c.predict.candidates = ("北京举行新年音乐会", "明天气象预报", "江泽民会见美国客人")
    return c


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True))
                                                  .sum(-1, keepdims=True))


def test_poolers_and_pair_features():
    states = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int32)
    # Padding never counts: row 0 is the mean of its first two positions only.
    want = np.stack([states[0, :2].mean(0), states[1].mean(0)])
    np.testing.assert_allclose(np.asarray(mean_pool(jnp.asarray(states), jnp.asarray(mask))),
                               want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pool("cls", states, None, mask)), states[:, 0])
    pooled = np.ones((2, 3), np.float32)
    assert pool("pooler", states, pooled, mask) is pooled
    u, v = np.array([[1.0, 2.0, 2.0]]), np.array([[2.0, 0.0, 1.0]])
    np.testing.assert_allclose(np.asarray(cosine(u, v)), [4.0 / (3.0 * np.sqrt(5.0))], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pair_features(u, v)),
                                  [[1, 2, 2, 2, 0, 1, 1, 2, 1]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_against_numpy(data_dir, tmp_path, variant):
    config = tiny_config(data_dir, tmp_path, variant)
    config.model.sentence_pooling = ""  # the originals': DSSM the pooler, ST the mean
    task = Task(config)
    model, tok = task.build()
    if variant != "pointwise":
        assert model.pooling == ("pooler" if variant == "dssm" else "mean")
    train_data, _ = task.datasets(tok)
    batch = {k: jnp.asarray(v) for k, v in train_data.batch(0, 8, 0, shuffle=False).items()}
    labels = np.asarray(batch["labels"])
    loss, aux = task.loss(model, batch, None)
    if variant == "pointwise":
        logits = np.asarray(task.outputs(model, batch))
        want = -log_softmax(logits)[np.arange(8), labels].mean()
        pred = logits.argmax(-1)
    else:
        u, v = (np.asarray(model.embed(**{k[2:]: batch[k] for k in batch if k.startswith(p)}),
                           np.float64) for p in ("a_", "b_"))
        if variant == "dssm":
            cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
            want = ((cos - labels) ** 2).mean()
            pred = cos >= 0.5
        else:
            kernel = np.asarray(model.classifier.kernel[...], np.float64)
            bias = np.asarray(model.classifier.bias[...], np.float64)
            logits = np.concatenate([u, v, np.abs(u - v)], -1) @ kernel + bias
            want = -log_softmax(logits)[np.arange(8), labels].mean()
            pred = logits.argmax(-1)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(aux["accuracy"]) == pytest.approx(np.mean(pred == labels))


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_and_predict(data_dir, tmp_path, variant, capsys):
    config = tiny_config(data_dir, tmp_path, variant)
    metrics = train.train(config, tmp_path, Task.create(config))
    assert {"accuracy", "precision", "recall", "f1"} <= set(metrics)
    out = capsys.readouterr().out
    assert "global step 2, epoch: 1, loss: " in out and " step/s" in out
    assert "best F1 performance updated: - --> " in out
    assert (tmp_path / "plots" / "curves.png").is_file()
    assert sorted(train.read_evals(tmp_path)) == [4]

    task = Task.create(config, "predict")
    model, tok, step = train.restore_model(task, tmp_path)
    assert step == 4
    if variant == "pointwise":
        (rec,) = task.predict(model, tok, ["北京举行新年音乐会\t今晚的长安街流光溢彩。"])
        assert set(rec) == {"query", "doc", "logits", "label"} and len(rec["logits"]) == 2
        assert rec["label"] == int(np.argmax(rec["logits"]))
        return
    recs = task.predict(model, tok, ["新年音乐会", "天气"])
    assert capsys.readouterr().err.count("Used ") == 2
    cands = set(config.predict.candidates)
    for rec in recs:
        if variant == "dssm":
            scores = [s for _, s in rec["ranking"]]
            assert {c for c, _ in rec["ranking"]} == cands and scores == sorted(scores)[::-1]
        else:
            assert {c for c, _ in rec["matches"]} <= cands
            assert all(s > 0.5 for _, s in rec["matches"])


def test_pointwise_export_reloads_in_transformers(data_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = tiny_config(data_dir, tmp_path, steps=2)
    task = Task.create(config)
    train.train(config, tmp_path, task)
    model, tok, _ = train.restore_model(task, tmp_path)
    task.export(model, tok, str(tmp_path / "export"))
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    arrays = task.encode(tok, ["北京举行新年音乐会", "明天气象预报"],
                         ["今晚的长安街流光溢彩。", "江南将有小到中雨。"])
    ours = task.scores(model, arrays)
    with torch.no_grad():
        theirs = hf(**{k: torch.tensor(v, dtype=torch.long) for k, v in arrays.items()}).logits
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)


def test_wrong_columns_is_one_line_via_the_cli(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("标题\t句子。\t1\n只有两列\t1\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/matching.py", f"--workdir={tmp_path}/w",
         f"--config.data.train={bad}", f"--config.data.eval={bad}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {bad}:2: expected 3 tab-separated columns "
                                   "(query, doc, label), got 2")


def test_config_rules(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path, "dssm")
    config.model.matching = "listwise"
    with pytest.raises(Exception, match="model.matching='listwise': choose one of"):
        Task.create(config)
    config = tiny_config(data_dir, tmp_path, "dssm")
    config.predict.candidates = ()
    with pytest.raises(Exception, match="predict.candidates"):
        Task.create(config, "predict")
    for variant in ("bert-base-chinese", "roberta-wwm-ext", "ernie-3.0-base-zh"):
        assert matching_config.get_config(variant).model.hub_id


def test_shipped_data_is_counted_balanced_and_split_by_article():
    readme = (ROOT / "data/README.md").read_text(encoding="utf-8")
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^\| `(matching/\w+\.tsv)` \| (\d+) \|",
                                                   readme, re.M)}
    owner: dict[str, str] = {}
    for split in ("train", "dev", "test"):
        rows = read_pairs(str(ROOT / f"data/matching/{split}.tsv"))
        assert len(rows) == counts[f"matching/{split}.tsv"]
        assert sum(r["label"] for r in rows) * 2 == len(rows)
        for r in rows:  # an article's headline (and so the article) is in one split only
            assert owner.setdefault(r["query"], split) == split
