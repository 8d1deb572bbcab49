"""lib.monitor: events read back with TensorBoard's reader, console lines, PNG, history, resume."""

import io
import json
import struct

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lib import monitor
from lib.errors import UserError
from lib.monitor import Monitor, epoch_of, format_duration

SAMPLES = [
    {"text": f"句子{i}", "label": "正面", "pred": "负面" if i % 2 else "正面"} for i in range(7)
]
SAMPLES[0]["text"] = "a|b\nc"  # a pipe and a newline must not break the markdown table


def train_metrics(step: int) -> dict[str, float]:
    """Known values for one logged step of the fake run."""
    return {
        "loss": 2.0 / step,
        "learning_rate": 1e-3 * step / 20,
        "grad_norm": 0.5 + step,
        "tokens_per_sec": 1000.0 * step,
        "steps_per_sec": 4.0,
    }


EVALS = {10: {"accuracy": 0.5, "f1": 0.25}, 20: {"accuracy": 0.8123, "f1": 0.6}}


def fake_run(workdir, steps=range(1, 21), metrics=train_metrics) -> Monitor:
    """Log `steps` with `metrics` and the two evaluations (at 10 and 20) that fall in them."""
    mon = Monitor(str(workdir), total_steps=20, steps_per_epoch=8, log_every=1)
    for step in steps:
        mon.log_train(step, metrics(step))
        if step in EVALS:
            mon.log_eval(step, {**EVALS[step], "per_class": {"a": 1.0}}, samples=SAMPLES)
    return mon


def read_events(workdir) -> EventAccumulator:
    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def assert_scalars(acc: EventAccumulator, tag: str, steps: list[int], values: list[float]):
    events = acc.Scalars(tag)
    assert [e.step for e in events] == steps, tag
    np.testing.assert_allclose([e.value for e in events], values, rtol=1e-6, err_msg=tag)


def test_fake_run_events_console_plot_history(tmp_path, capsys):
    mon = fake_run(tmp_path)
    mon.close()
    out = capsys.readouterr().out.splitlines()

    # Console: 20 train lines + 2 eval lines, in order. Step 9 is the first of epoch 2
    # (8 steps per epoch); ETA = 11 steps left / 4 step/s = 2.75 s.
    assert len(out) == 22
    assert out[7] == "global step 8, epoch: 1, loss: 0.25000, speed: 4.00 step/s, eta: 3s"
    assert out[8] == "global step 9, epoch: 2, loss: 0.22222, speed: 4.00 step/s, eta: 3s"
    assert out[10] == "eval at step 10: accuracy=0.5000, f1=0.2500"
    assert out[21] == "eval at step 20: accuracy=0.8123, f1=0.6000"
    assert out[20] == "global step 20, epoch: 3, loss: 0.10000, speed: 4.00 step/s, eta: 0s"

    acc = read_events(tmp_path)
    train_names = ["loss", "learning_rate", "grad_norm", "tokens_per_sec", "steps_per_sec"]
    assert sorted(acc.Tags()["scalars"]) == sorted(
        [f"train/{n}" for n in train_names] + ["eval/accuracy", "eval/f1"]
    )
    steps = list(range(1, 21))
    for name in train_names:
        assert_scalars(acc, f"train/{name}", steps, [train_metrics(s)[name] for s in steps])
    assert_scalars(acc, "eval/accuracy", [10, 20], [0.5, 0.8123])
    assert_scalars(acc, "eval/f1", [10, 20], [0.25, 0.6])

    # Sample predictions: a markdown table of the first 5 samples, once per evaluation.
    assert acc.Tags()["tensors"] == ["eval/samples/text_summary"]
    texts = acc.Tensors("eval/samples/text_summary")
    assert [t.step for t in texts] == [10, 20]
    table = texts[0].tensor_proto.string_val[0].decode("utf-8")
    assert table.splitlines() == [
        "| text | label | pred |",
        "|---|---|---|",
        "| a\\|b<br>c | 正面 | 正面 |",
        "| 句子1 | 正面 | 负面 |",
        "| 句子2 | 正面 | 正面 |",
        "| 句子3 | 正面 | 负面 |",
        "| 句子4 | 正面 | 正面 |",
    ]

    # PNG: 4 panels (loss, learning rate, accuracy, f1) on a 3x2 grid of 4.2x3.0 in at 100 dpi.
    png = (tmp_path / "plots" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1260, 600)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["curves.png", "history.json"]

    history = json.loads((tmp_path / "plots" / "history.json").read_text(encoding="utf-8"))
    assert history["train"] == [{"step": s, **train_metrics(s)} for s in steps]
    assert history["eval"] == [{"step": s, **m} for s, m in EVALS.items()]


def test_resume_matches_uninterrupted_run(tmp_path, capsys):
    fake_run(tmp_path / "straight").close()

    # A run killed after step 20 whose last checkpoint is step 12: its points after 12 differ
    # from what the resumed run will compute, and it is never closed.
    def diverged(step):
        return {k: v * (7.0 if step > 12 else 1.0) for k, v in train_metrics(step).items()}

    fake_run(tmp_path / "resumed", metrics=diverged)
    resumed = Monitor(str(tmp_path / "resumed"), total_steps=20, steps_per_epoch=8, log_every=1)
    assert len(resumed.history["train"]) == 20 and len(resumed.history["eval"]) == 2
    assert resumed.load_history()["train"][19]["loss"] == pytest.approx(7.0 * 2.0 / 20)
    resumed.truncate_after(12)
    assert [p["step"] for p in resumed.history["train"]] == list(range(1, 13))
    assert [p["step"] for p in resumed.history["eval"]] == [10]
    for step in range(13, 21):
        resumed.log_train(step, train_metrics(step))
    resumed.log_eval(20, EVALS[20], samples=SAMPLES)
    resumed.close()
    capsys.readouterr()

    def history(name):
        return json.loads((tmp_path / name / "plots" / "history.json").read_text("utf-8"))

    assert history("resumed") == history("straight")
    # Two event files; the second purges the first one's steps > 12 when TensorBoard reads them.
    assert len(list((tmp_path / "resumed" / "tensorboard").iterdir())) == 2
    acc = read_events(tmp_path / "resumed")
    steps = list(range(1, 21))
    assert_scalars(acc, "train/loss", steps, [2.0 / s for s in steps])
    assert_scalars(acc, "eval/accuracy", [10, 20], [0.5, 0.8123])
    # The legacy reader purges only scalars-like data; TensorBoard itself reads through the
    # plugin accumulator, which purges the text tensors too.
    plugin_acc = plugin_event_accumulator.EventAccumulator(
        str(tmp_path / "resumed" / "tensorboard"), size_guidance={"tensors": 0}
    )
    plugin_acc.Reload()
    assert [t.step for t in plugin_acc.Tensors("eval/samples/text_summary")] == [10, 20]
    assert [t.step for t in plugin_acc.Tensors("train/loss")] == steps


def test_speed_and_eta_measured_when_not_given(tmp_path, capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(monitor, "_clock", lambda: now[0])
    mon = Monitor(str(tmp_path), total_steps=30, steps_per_epoch=10, log_every=10)
    now[0] = 105.0  # first line: log_every=10 steps since construction, 5 s
    mon.log_train(10, {"loss": 1.0})
    now[0] = 109.0  # 10 more steps in 4 s
    mon.log_train(20, {"loss": 0.5})
    mon.close()
    assert capsys.readouterr().out.splitlines() == [
        "global step 10, epoch: 1, loss: 1.00000, speed: 2.00 step/s, eta: 10s",
        "global step 20, epoch: 2, loss: 0.50000, speed: 2.50 step/s, eta: 4s",
    ]


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    mon = Monitor(str(tmp_path), total_steps=20, steps_per_epoch=8, log_every=5)
    for step in range(1, 11):
        mon.advance(step)
        if step % 5 == 0:
            mon.log_train(step, train_metrics(step))
    mon.close()
    # The bar carries the ETA, so the lines do not.
    assert capsys.readouterr().out.splitlines() == [
        "global step 5, epoch: 1, loss: 0.40000, speed: 4.00 step/s",
        "global step 10, epoch: 2, loss: 0.20000, speed: 4.00 step/s",
    ]
    assert "10/20" in terminal.getvalue()


def test_disabled_monitor_does_nothing(tmp_path, capsys):
    mon = Monitor(str(tmp_path / "run"), total_steps=5, steps_per_epoch=5, log_every=1,
                  enabled=False)
    mon.advance(1)
    mon.log_train(1, {"loss": 1.0})
    mon.log_eval(1, {"accuracy": 1.0}, samples=SAMPLES)
    mon.truncate_after(0)
    assert mon.load_history() == {"train": [], "eval": []}
    mon.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr() == ("", "")


def test_corrupt_history_is_a_user_error(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "history.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"history\.json: .*delete the file"):
        Monitor(str(tmp_path), total_steps=5, steps_per_epoch=5, log_every=1)


@pytest.mark.parametrize(
    "step, epoch", [(0, 1), (1, 1), (8, 1), (9, 2), (16, 2), (17, 3)]
)
def test_epoch_of(step, epoch):
    assert epoch_of(step, 8) == epoch


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (45, "45s"),
        (59.4, "59s"),
        (59.6, "1m00s"),
        (192, "3m12s"),
        (305, "5m05s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (3749, "1h02m"),
        (90000, "25h00m"),
        (-3, "0s"),
        (float("nan"), "?"),
        (float("inf"), "?"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
