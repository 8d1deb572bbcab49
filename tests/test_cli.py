"""End to end through ``main.py`` in separate processes: resume after SIGKILL, SIGTERM,
TensorBoard events and plots, inference modes, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small slice of the shipped review data (fast to tokenize and evaluate)."""
    d = tmp_path_factory.mktemp("data")
    lines = (ROOT / "data/reviews/train.tsv").read_text(encoding="utf-8").splitlines()
    (d / "train.tsv").write_text("\n".join(lines[:96]) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text("\n".join(lines[96:136]) + "\n", encoding="utf-8")
    return d


def tiny_flags(data: Path, workdir: Path, **overrides) -> list[str]:
    flags = {
        "data.train": data / "train.tsv",
        "data.eval": data / "dev.tsv",
        "data.test": data / "dev.tsv",
        "model.pooling": "cls",  # the [CLS] head exports to an HF classifier
        "model.hidden_size": 32,
        "model.num_hidden_layers": 1,
        "model.num_attention_heads": 2,
        "model.intermediate_size": 64,
        "model.min_char_freq": 1,
        "data.max_length": 32,
        "train.steps": STEPS,
        "train.batch_size": 8,
        "train.lr": 3e-3,
        "log.every": 2,
        "eval.every": 12,
        "eval.batch_size": 16,
        "checkpoint.every": 4,
        "checkpoint.keep": 2,
    }
    flags.update(overrides)
    return [
        sys.executable, "main.py", "--config=configs/classification.py",
        f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in flags.items()),
    ]


def env() -> dict:
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # one device, as a user runs it
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300, **kw)


def best_step(workdir: Path) -> int:
    """The step of the best checkpoint: the one evaluated on data.test after training."""
    (test_json,) = workdir.glob("eval/dev_step_*.json")
    return int(test_json.stem.rsplit("_", 1)[1])


def final_params(workdir: Path) -> dict:
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "params")


def train_history(workdir: Path) -> list[tuple]:
    hist = json.loads((workdir / "plots/history.json").read_text())
    keys = ("step", "loss", "learning_rate", "grad_norm", "accuracy")
    return [tuple(p.get(k) for k in keys) for p in hist["train"]]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(tiny_flags(data, workdir))
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir


def wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, timeout: float = 240) -> int:
    ckpts = workdir / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if done:
            return max(done)
        assert proc.poll() is None, "the run ended before writing a checkpoint"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def assert_same_run(a: Path, b: Path, *, same_log: bool = True) -> None:
    ea = json.loads((a / f"eval/step_{STEPS}.json").read_text())
    eb = json.loads((b / f"eval/step_{STEPS}.json").read_text())
    assert ea == eb
    if same_log:
        assert train_history(a) == train_history(b)
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                         final_params(a), final_params(b))
    assert max(jax.tree.leaves(diffs)) == 0.0


def test_sigkill_then_resume_equals_uninterrupted(data, reference, tmp_path):
    cmd = tiny_flags(data, tmp_path)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    saved = wait_for_checkpoint(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < saved < STEPS
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout
    assert_same_run(reference, tmp_path)


def test_sigterm_saves_and_exits_cleanly(data, reference, tmp_path):
    cmd = tiny_flags(data, tmp_path)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if "SIGTERM: saved step" not in out:  # it may have finished before the signal landed
        assert "final eval" in out, err[-2000:]
    assert proc.returncode == 0, err[-2000:]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-2000:]
    # SIGTERM saves at whatever step it lands on, so the log line of that interval is split
    # in two (means over fewer steps); params and evaluations are identical.
    assert_same_run(reference, tmp_path, same_log=False)


def test_tensorboard_events_and_plots(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_sec",
                "train/steps_per_sec", "eval/accuracy", "eval/weighted_f1"}
    assert expected <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(2, STEPS + 1, 2))
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [12, 24]
    hist = dict((s, loss) for s, loss, *_ in train_history(reference))
    assert abs(acc.Scalars("train/loss")[-1].value - hist[STEPS]) < 1e-6
    png = (reference / "plots/curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((reference / "config.json").read_text())["train"]["steps"] == STEPS


def test_eval_predict_export_modes(data, reference):
    # After training, the best checkpoint was evaluated on data.test (here the dev file again:
    # the same numbers as that step's own evaluation).
    best = best_step(reference)
    assert best in (12, STEPS)
    step_json = json.loads((reference / f"eval/step_{best}.json").read_text())
    test_json = json.loads((reference / f"eval/dev_step_{best}.json").read_text())
    assert test_json["metrics"] == step_json["metrics"]

    result = run(tiny_flags(data, reference) + ["--mode=eval"])
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("eval of step"))
    assert line.startswith(f"eval of step {best}:")
    assert json.loads(line.split(": ", 1)[1]) == step_json["metrics"]
    # --mode=eval writes eval/<split>_step_N.json and leaves the run's step_N.json alone.
    assert json.loads((reference / f"eval/step_{best}.json").read_text()) == step_json

    result = run(tiny_flags(data, reference) + ["--mode=predict"], input="质量很好\n太差了\n")
    assert result.returncode == 0, result.stderr[-2000:]
    preds = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert [p["text"] for p in preds] == ["质量很好", "太差了"]
    assert all(p["label"] in ("负面", "正面") and 0.5 <= p["prob"] <= 1 for p in preds)

    result = run(tiny_flags(data, reference) + ["--mode=export"])
    assert result.returncode == 0, result.stderr[-2000:]
    import torch
    from transformers import BertForSequenceClassification, BertTokenizer

    exported = reference / "export"
    hf = BertForSequenceClassification.from_pretrained(exported).eval()
    tok = BertTokenizer.from_pretrained(exported)
    enc = tok(["质量很好"], return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(hf(**enc).logits, -1)[0].numpy()
    # The exported model reproduces our prediction (the char vocab is a valid BERT vocab).
    assert abs(float(probs.max()) - preds[0]["prob"]) < 1e-4
    assert hf.config.id2label[int(probs.argmax())] == preds[0]["label"]


def test_fine_tune_from_hf_directory(data, reference, tmp_path):
    """``model.path`` = an HF classifier directory (the export above, with its vocab.txt):
    weights and tokenizer load, and with lr 0 the run's evaluation equals the source run's."""
    if not (reference / "export" / "config.json").exists():
        assert run(tiny_flags(data, reference) + ["--mode=export"]).returncode == 0
    result = run(tiny_flags(data, tmp_path, **{
        "model.path": reference / "export", "train.steps": 2, "train.lr": 0.0,
        "eval.every": 2, "checkpoint.every": 2,
    }))
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads((tmp_path / "eval/step_2.json").read_text())["metrics"]
    want = json.loads((reference / f"eval/step_{best_step(reference)}.json").read_text())
    want = want["metrics"]
    assert got["accuracy"] == want["accuracy"]
    assert abs(got["weighted_f1"] - want["weighted_f1"]) < 1e-12


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_config_key(data, tmp_path):
    result = run(tiny_flags(data, tmp_path) + ["--config.train.lrr=0.1"])
    one_line_error(result, "--config.train.lrr", 'Did you mean "lr"')


def test_missing_model_directory(data, tmp_path):
    result = run(tiny_flags(data, tmp_path, **{"model.path": tmp_path / "nope"}))
    one_line_error(result, str(tmp_path / "nope"), "model.path")


def test_malformed_data_line(data, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t好\n0\t差\n1 no tab here\n", encoding="utf-8")
    result = run(tiny_flags(data, tmp_path / "w", **{"data.train": bad}))
    one_line_error(result, f"{bad}:3")


def test_label_outside_label_set(data, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t好\n7\t差\n", encoding="utf-8")
    result = run(tiny_flags(data, tmp_path / "w", **{"data.train": bad}))
    one_line_error(result, f"{bad}:2", "label 7")


def test_incompatible_checkpoint(data, reference, tmp_path):
    result = run(tiny_flags(data, reference, **{"model.hidden_size": 64}))
    one_line_error(result, "incompatible", "shape")


def test_values_out_of_range(data, tmp_path):
    line = one_line_error(run(tiny_flags(data, tmp_path, **{"train.lr": -1.0})))
    assert line == "error: config.train.lr=-1.0: must be >= 0"
    line = one_line_error(run(tiny_flags(data, tmp_path, **{"train.warmup_ratio": 1.5})))
    assert line == "error: config.train.warmup_ratio=1.5: must be in [0, 1)"
    line = one_line_error(run(tiny_flags(data, tmp_path, **{"train.steps": 0})))
    assert line == "error: config.train.steps=0: must be >= 1 (or train.epochs >= 1)"
    assert not tmp_path.joinpath("checkpoints").exists()  # nothing ran


def test_value_not_among_the_choices(data, tmp_path):
    result = run(tiny_flags(data, tmp_path, **{"train.schedule": "cosin"}))
    assert result.returncode == 2
    line = one_line_error(result)
    assert line == "error: config.train.schedule='cosin': choose one of linear, cosine, constant"
    result = run(tiny_flags(data, tmp_path, **{"data.truncation": "middle"}) + ["--mode=eval"])
    line = one_line_error(result)
    assert line == "error: config.data.truncation='middle': choose one of head, head_tail"


def test_missing_data_file(data, tmp_path):
    missing = tmp_path / "nope.tsv"
    result = run(tiny_flags(data, tmp_path / "w", **{"data.eval": missing}))
    assert result.returncode == 2
    assert one_line_error(result) == f"error: config.data.eval='{missing}': no such file"


def test_workdir_that_is_a_file(data, tmp_path):
    afile = tmp_path / "taken"
    afile.write_text("not a directory\n")
    result = run(tiny_flags(data, afile))
    assert result.returncode == 2
    line = one_line_error(result, str(afile))
    assert line == f"error: config.workdir='{afile}': is a file; --workdir must name a directory"
    result = run(tiny_flags(data, afile / "run"))
    one_line_error(result, "cannot create it", str(afile))
    assert afile.read_text() == "not a directory\n"
