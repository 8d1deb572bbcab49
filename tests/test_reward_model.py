"""Reward model task: lists scored text by text, the loss, a tiny run with its eval line,
predict and export (reloaded in transformers with the same scores), and a bad data line
reported through the command line. The rank loss itself is checked in test_rl.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_data import _readme_counts

import tasks
from configs import reward_model as rm_config
from lib import cli
from lib.errors import UserError
from scripts import build_reward_data
from tasks.reward_model import Task, read_lists

ROOT = Path(__file__).resolve().parents[1]
GOOD, BAD = ["质量很好", "物流很快", "非常满意"], ["太差了", "做工粗糙", "再也不买"]


@pytest.fixture
def data_dir(tmp_path):
    rows = []
    for i in range(3):
        slots = list(GOOD)
        texts = [" ".join(slots)]
        for s in (i, (i + 1) % 3, (i + 2) % 3):
            slots[s] = BAD[s]
            texts.append(" ".join(slots))
        rows.append("\t".join(texts))
    (tmp_path / "train.tsv").write_text("\n".join(rows * 4) + "\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path


def tiny_config(data_dir, workdir, **train_kw):
    c = rm_config.get_config("demo")
    c.workdir = str(workdir)
    c.data.train = str(data_dir / "train.tsv")
    c.data.eval = str(data_dir / "dev.tsv")
    c.data.max_length = 24
    c.model.hidden_size, c.model.num_hidden_layers, c.model.num_attention_heads = 16, 1, 2
    c.model.intermediate_size, c.model.min_char_freq, c.model.dropout = 32, 1, 0.0
    c.train.update({"steps": 12, "batch_size": 8, "lr": 3e-3, **train_kw})
    c.log.every, c.eval.every, c.checkpoint.every, c.eval.batch_size = 4, 12, 12, 2
    return c


def test_lists_are_scored_text_by_text(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path)
    task = Task(config)
    model, tok = task.build()
    train_data, eval_set = task.datasets(tok)
    assert train_data.arrays["input_ids"].shape == (12, 4, 24)
    batch = {k: jnp.asarray(v) for k, v in train_data.batch(0, 3, 0, shuffle=False).items()}
    rewards = np.asarray(task.scores(model, batch), np.float64)
    assert rewards.shape == (3, 4)
    # Each text alone gets the score it has inside its list.
    alone = task.predict(model, tok, eval_set.lists[1])
    np.testing.assert_allclose([p["score"] for p in alone], rewards[1], atol=1e-5)
    pairs = [np.log1p(np.exp(-(r[i] - r[j]))) for r in rewards
             for i in range(4) for j in range(i + 1, 4)]
    loss, aux = task.loss(model, batch, None)
    assert abs(float(loss) - np.mean(pairs)) < 1e-5
    ordered = np.mean([all(r[k] > r[k + 1] for k in range(3)) for r in rewards])
    assert float(aux["ranking_accuracy"]) == pytest.approx(ordered)


def test_train_eval_predict_export(data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, workdir, steps=40)
    metrics = tasks.create(config).run(workdir)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("Evaluation acc: "))
    assert float(line.split(": ")[1]) == pytest.approx(metrics["ranking_accuracy"], abs=1e-4)
    assert set(metrics) == {"ranking_accuracy", "pairwise_accuracy", "loss"}
    assert metrics["pairwise_accuracy"] > 0.5  # the tiny set is learnable
    saved = json.loads((workdir / "eval/step_40.json").read_text())
    assert saved["metrics"] == metrics and len(saved["samples"]) == 3

    # No spaces: the character vocabulary keeps them as tokens, HF's BertTokenizer drops them.
    texts = ["质量很好物流很快", "太差了做工粗糙"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    config.predict.input = str(tmp_path / "in.txt")
    cli.run(config, workdir, "predict")
    preds = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("{")]
    assert [p["text"] for p in preds] == texts
    assert all(isinstance(p["score"], float) for p in preds)

    cli.run(config, workdir, "export")
    import torch
    from transformers import BertForSequenceClassification, BertTokenizer

    hf = BertForSequenceClassification.from_pretrained(workdir / "export").eval()
    assert hf.config.num_labels == 1
    tok = BertTokenizer.from_pretrained(workdir / "export")
    enc = tok(texts, max_length=24, truncation=True, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        scores = hf(**enc).logits[:, 0].numpy()
    np.testing.assert_allclose(scores, [p["score"] for p in preds], atol=1e-4)


def test_bad_line_is_one_error_through_the_cli(data_dir, tmp_path):
    bad = tmp_path / "bad.tsv"
    lines = (data_dir / "train.tsv").read_text(encoding="utf-8").splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:3])
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cmd = [sys.executable, "main.py", "--config=configs/reward_model.py",
           f"--workdir={tmp_path / 'run'}", f"--config.data.train={bad}",
           f"--config.data.eval={data_dir / 'dev.tsv'}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}:3: expected 4 tab-separated columns (text1, text2, text3, text4), got 3"
    ]
    lines[2] = "好\t\t差\t很差"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.tsv:3: column text2 is empty"):
        read_lists(str(bad), "data.train")


def test_demo_data_is_ranked_by_construction(tmp_path):
    """The build is deterministic, and every list steps from 3 positive reviews to 3 negative
    ones by one slot at a time."""
    counts = build_reward_data.build(ROOT / "data/reviews", tmp_path)
    assert counts == {"train": 4000, "dev": 300}
    listed = _readme_counts()
    assert {s: listed[f"reward/{s}.tsv"] for s in counts} == counts
    for split in counts:
        assert (tmp_path / f"{split}.tsv").read_bytes() == \
            (ROOT / f"data/reward/{split}.tsv").read_bytes()
    labels = {}
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        for line in (ROOT / "data/reviews" / name).read_text(encoding="utf-8").splitlines():
            label, text = line.split("\t")
            labels[text] = label
    for line in (tmp_path / "dev.tsv").read_text(encoding="utf-8").splitlines()[:50]:
        texts = line.split("\t")
        positives = [sum(labels[s] == "1" for s in _slots(t, labels)) for t in texts]
        assert positives == [3, 2, 1, 0]


def _slots(text: str, labels: dict) -> list[str]:
    """Split a list text back into its 3 reviews (reviews may hold spaces: try the splits)."""
    words = text.split(" ")
    for i in range(1, len(words)):
        for j in range(i + 1, len(words)):
            parts = [" ".join(words[:i]), " ".join(words[i:j]), " ".join(words[j:])]
            if all(p in labels for p in parts):
                return parts
    raise AssertionError(f"not 3 reviews: {text}")
