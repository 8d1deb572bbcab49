"""Text classification task: loss options, the trainer stopping on a NaN loss, and the
cross-entropy vs focal loss sweep end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tasks
from configs import classification as cls_config
from lib import cli, train
from lib.data import ArrayDataset
from lib.errors import UserError
from tasks.classification import Task, clip_text

LABELS = ["负面", "正面"]


@pytest.fixture
def data_dir(tmp_path):
    rows = ["1\t质量很好，非常满意", "0\t太差了，再也不买", "1\t物流快，包装好", "0\t做工粗糙"] * 6
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:8]) + "\n", encoding="utf-8")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return tmp_path


def tiny_config(data_dir, workdir, variant="demo", **train_kw):
    c = cls_config.get_config(variant)
    c.workdir = str(workdir)
    c.data.train = str(data_dir / "train.tsv")
    c.data.eval = str(data_dir / "dev.tsv")
    c.data.labels = str(data_dir / "labels.txt")
    c.data.max_length = 16
    c.model.hidden_size, c.model.num_hidden_layers, c.model.num_attention_heads = 16, 1, 2
    c.model.intermediate_size, c.model.min_char_freq = 32, 1
    c.train.update({"steps": 12, "batch_size": 8, **train_kw})
    c.log.every, c.eval.every, c.checkpoint.every, c.eval.batch_size = 2, 100, 4, 8
    return c


def test_focal_and_class_weighted_loss(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path)
    config.model.dropout = 0.0
    task = Task(config)
    model, tok = task.build()
    train_data, _ = task.datasets(tok)
    batch = {k: jnp.asarray(v) for k, v in train_data.batch(0, 4, 0, shuffle=False).items()}
    logits = np.asarray(task.logits(model, batch), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = np.asarray(batch["labels"])
    nll = -logp[np.arange(4), labels]
    plain, aux = task.loss(model, batch, None)
    assert abs(float(plain) - nll.mean()) < 1e-6
    assert float(aux["accuracy"]) == float(np.mean(logits.argmax(-1) == labels))

    task.focal_gamma = 2.0
    focal, _ = task.loss(model, batch, None)
    expected = ((1 - np.exp(-nll)) ** 2 * nll).mean()
    assert abs(float(focal) - expected) < 1e-6

    task.focal_gamma = 0.0
    task.class_weights = jnp.asarray([3.0, 0.5])
    weighted, _ = task.loss(model, batch, None)
    w = np.asarray([3.0, 0.5])[labels]
    assert abs(float(weighted) - (w * nll).sum() / w.sum()) < 1e-6


class PoisonedTask(Task):
    """The loss turns NaN from step 7 on (a batch flag, so the step stays jit-pure)."""

    def datasets(self, tokenizer):
        train_data, eval_data = super().datasets(tokenizer)

        class Poisoned(ArrayDataset):
            def batch(self, step, batch_size, seed, shuffle=True):
                out = train_data.batch(step, batch_size, seed, shuffle)
                out["poison"] = np.full(batch_size, step >= 6)
                return out

        return Poisoned(train_data.arrays), eval_data

    def loss(self, model, batch, rng):
        loss, aux = super().loss(model, {k: v for k, v in batch.items() if k != "poison"}, rng)
        return jnp.where(batch["poison"].any(), jnp.nan, loss), aux


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path)
    with pytest.raises(UserError) as err:
        train.train(config, tmp_path, PoisonedTask(config))
    assert "loss is nan at step 7" in str(err.value)
    assert "last good checkpoint (step 4) is kept" in str(err.value)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [4]


def test_unknown_focal_weights_length_is_an_error(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path)
    config.loss.class_weights = (1.0, 2.0, 3.0)
    with pytest.raises(UserError, match="class_weights has 3 values for 2 labels"):
        Task(config)


def test_head_tail_truncation(data_dir, tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(40))  # 40 distinct characters
    assert clip_text(text, 42, "head_tail") == text  # fits: unchanged
    assert clip_text(text, 18, "head") == text  # the tokenizer truncates
    # Budget 16 = 18 - [CLS] - [SEP]: the first 4 and the last 12 characters.
    assert clip_text(text, 18, "head_tail") == text[:4] + text[-12:]

    config = tiny_config(data_dir, tmp_path)
    config.data.truncation = "head_tail"
    task = Task(config)
    _, tok = task.build()
    review = "质量很好" * 5 + "做工粗糙"  # 24 characters, budget 14: 3 from the head, 11 the tail
    ids = task.encode(tok, [review])["input_ids"][0]
    assert review[:3] + review[-11:] == "质量很" + "量很好质量很好做工粗糙"
    want = tok([review[:3] + review[-11:]], max_length=16, truncation=True,
               padding="max_length", return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(ids, want)
    assert list(ids[:2]) == [tok.cls_id, tok.convert_tokens_to_ids("质")]
    assert tok.convert_ids_to_tokens(int(ids[15])) == "[SEP]"

    config.data.truncation = "middle"
    with pytest.raises(UserError, match="data.truncation='middle'"):
        Task.create(config)


def test_init_from_takes_params_only(data_dir, tmp_path):
    first = tmp_path / "first"
    config = tiny_config(data_dir, first)
    train.train(config, first, Task(config))
    second = tmp_path / "second"
    config2 = tiny_config(data_dir, second, steps=4)
    config2.init_from = str(first)
    config2.train.lr = 0.0  # params must stay exactly the first run's
    config2.train.warmup_ratio = 0.0
    train.train(config2, second, Task.create(config2))
    a, _, step_a = train.restore_model(Task(config), first, which="latest")
    b, _, step_b = train.restore_model(Task(config2), second, which="latest")
    assert (step_a, step_b) == (12, 4)
    leaves_a = jax.tree.leaves(nnx.to_pure_dict(nnx.state(a, nnx.Param)))
    leaves_b = jax.tree.leaves(nnx.to_pure_dict(nnx.state(b, nnx.Param)))
    assert len(leaves_a) == len(leaves_b) > 10
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def test_loss_sweep_end_to_end(data_dir, tmp_path):
    """``configs/classification.py:loss-sweep`` at a tiny size: both runs trained in their own
    workdirs, each best checkpoint evaluated N times, the summary consistent with the
    per-repeat values (deterministic evaluation: std 0), the plot, and a rerun that redoes
    nothing."""
    workdir = tmp_path / "sweep"
    config = tiny_config(data_dir, workdir, "loss-sweep", steps=8)
    config.data.test = ""
    config.eval.every = config.checkpoint.every = 4
    config.sweep.repeats = 3
    out = tasks.create(config).run(workdir)

    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["runs"]) == {"ce", "focal"} and summary["repeats"] == 3
    names = ["accuracy", "weighted_f1", "macro_f1"]
    assert summary["metrics"] == names
    for run, gamma in (("ce", 0.0), ("focal", 2.0)):
        assert json.loads((workdir / run / "config.json").read_text())["loss"]["focal_gamma"] \
            == gamma
        entry = summary["runs"][run]["all"]
        assert entry["repeats"] == 3 and len(entry["values"]) == 3
        assert entry["step"] in (4, 8)
        # The selected checkpoint is the best by weighted F1 among the evaluated ones.
        history = train.read_evals(workdir / run)
        assert sorted(history) == [4, 8]
        assert entry["values"][0]["weighted_f1"] == max(m["weighted_f1"] for m in history.values())
        for m in names:
            values = [v[m] for v in entry["values"]]
            assert entry["mean"][m] == pytest.approx(np.mean(values))
            assert entry["std"][m] == pytest.approx(np.std(values)) == 0.0
            assert out[f"{run}/all/{m}"] == entry["mean"][m]
        mean_file = json.loads((workdir / run / "mean_of_3_all.json").read_text())
        assert mean_file["values"] == entry["values"]
    assert set(summary["untrained"]) == {"all"}
    assert len(summary["untrained"]["all"]["values"]) == 1
    assert [line.split()[0] for line in summary["table"][2:]] == ["untrained", "ce", "focal"]
    assert (workdir / "plots" / "all_result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Run again: the trainings are finished and the means on disk; nothing is redone.
    stamps = {p: p.stat().st_mtime_ns for p in workdir.glob("*/mean_of_*.json")}
    assert tasks.create(config).run(workdir) == out
    assert {p: p.stat().st_mtime_ns for p in workdir.glob("*/mean_of_*.json")} == stamps

    # --mode=eval on one run (its directory names it): the selected checkpoint's numbers.
    cli.run(config, workdir / "focal", "eval")
    step = summary["runs"]["focal"]["all"]["step"]
    evaluated = json.loads((workdir / "focal" / "eval" / f"dev_step_{step}.json").read_text())
    assert evaluated["metrics"] == train.read_evals(workdir / "focal")[step]


def test_sweep_run_with_an_unknown_key_fails_before_training(data_dir, tmp_path):
    config = tiny_config(data_dir, tmp_path, "loss-sweep")
    config.sweep.runs.focal.loss = {"focal_gama": 2.0}
    with pytest.raises(UserError, match="config.sweep.runs.focal: 'loss.focal_gama' is not"):
        tasks.create(config).run(tmp_path)
    assert not (tmp_path / "ce").exists()
