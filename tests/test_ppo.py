"""PPO task: the value-head forward, rollouts, the classifier reward, a run killed with SIGKILL
and resumed (same policy, same statistics as an uninterrupted run), and the human-feedback
tools driven through their input (in process and through main.py's stdin). The PPO arithmetic
(GAE, losses, the KL controller) is checked against numpy in test_rl.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ppo as ppo_config
from lib import config as config_lib
from lib import feedback, models, ppo
from lib.errors import UserError
from lib.tokenizer import CharVocab
from tasks.ppo import ClassifierReward, Task

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["刚收到货，感觉很好", "这部电影很差", "说实话，真的很不错", "这次购物总的来说体验很满意",
         "质量太差了", "物流很快，非常满意"]


def _export_scratch(family: str, head: str, out: Path, **extra) -> None:
    """A tiny random model of ``family`` with a character vocabulary, exported to ``out``."""
    m = config_lib.base("test", "tiny").model
    m.family = family
    m.hidden_size, m.num_hidden_layers, m.num_attention_heads = 32, 1, 2
    m.num_key_value_heads, m.intermediate_size = 2, 64
    vocab = CharVocab.build(TEXTS)
    built = models.build(m, head=head, tokenizer=vocab, seed=3, max_length=64, **extra)
    if head == "sequence_classification":
        built.config.hf_extra["id2label"] = {0: "负面", 1: "正面"}
    models.export(built, built.model, out, m)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    _export_scratch("gpt2", "causal_lm", root / "policy")
    _export_scratch("bert", "sequence_classification", root / "reward", num_labels=2)
    _export_scratch("qwen2", "causal_lm", root / "qwen2")
    return root


def tiny_config(dirs, workdir, **ppo_kw):
    c = ppo_config.get_config("demo")
    c.workdir = str(workdir)
    c.model.path, c.reward.path = str(dirs / "policy"), str(dirs / "reward")
    c.model.recipe = c.reward.recipe = ""
    c.ppo.update({"batch_size": 16, "minibatch_size": 8, "epochs": 2, "max_new_tokens": 6,
                  "prompt_length": 10, **ppo_kw})
    c.train.update({"steps": 4, "lr": 1e-3})
    c.checkpoint.every = 2
    return c


def test_value_head_forward_matches_the_lm(dirs, tmp_path):
    task = Task(tiny_config(dirs, tmp_path))
    model, tok = task.build()
    ids = jnp.asarray([[0, 0, 2, 8, 9, 10, 11], [2, 5, 6, 7, 8, 9, 10]], jnp.int32)
    mask = (ids != 0).astype(jnp.int32)
    logp, values, _ = model(ids, mask, 4)
    logits, _ = model.lm(ids, mask)
    want = jax.nn.log_softmax(logits[:, 3:-1], axis=-1)
    want = np.take_along_axis(np.asarray(want), np.asarray(ids[:, 4:, None]), axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)
    hidden, _ = model.lm.hidden_states(ids, mask)
    v = hidden[:, 3:-1] @ model.value_head.kernel[...] + model.value_head.bias[...]
    np.testing.assert_allclose(np.asarray(values), np.asarray(v[..., 0]), atol=1e-5)


def test_a_qwen2_policy_with_lora_trains_too(dirs, tmp_path):
    config = tiny_config(dirs, tmp_path, batch_size=8, minibatch_size=8, epochs=1)
    config.model.path = str(dirs / "qwen2")
    config.model.lora.rank = 4
    task = Task(config)
    trainer, ckpt = task.resumed_trainer(tmp_path)
    ckpt.close()
    trained = {"/".join(map(str, k)) for k, _ in jax.tree_util.tree_flatten_with_path(
        trainer.state["params"])[0]}
    assert trained and all("lora" in k or "value_head" in k for k in trained)
    before = jax.device_get(trainer.state["params"])
    batch = trainer.rollout(["刚收到货"] * 8, jax.random.key(0))
    batch["scores"] = np.linspace(0, 1, 8, dtype=np.float32)
    stats = trainer.step(batch, np.random.default_rng(0))
    assert trainer.step_no == 1 and all(np.isfinite(v) for v in stats.values())
    after = jax.device_get(trainer.state["params"])
    moved = {"/".join(map(str, k)) for (k, a), b in zip(
        jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after))
        if not np.array_equal(a, b)}
    # B starts at zero, so the first step moves every B and the value head (A's gradient is
    # B^T times something: zero).
    assert moved == {k for k in trained if "lora_a" not in k}


def test_rollout_masks_after_the_first_eos(dirs, tmp_path):
    task = Task(tiny_config(dirs, tmp_path))
    model, tok = task.build()
    out = ppo.rollout(model.lm, tok, ["刚收到货", "这部电影很"] * 4, jax.random.key(0), 10, 6)
    assert out["input_ids"].shape == out["attention_mask"].shape == (8, 16)
    eos = tok.eos_token_id
    for row, mask in zip(out["input_ids"][:, 10:], out["attention_mask"][:, 10:]):
        first = next((i for i, t in enumerate(row) if t == eos), len(row) - 1)
        assert mask.tolist() == [1] * (first + 1) + [0] * (len(row) - first - 1)
    # The prompt's last token sits right before the response; left padding is masked.
    assert out["attention_mask"][0, :10].tolist() == [0] * 5 + [1] * 5


def test_classifier_reward_is_the_label_probability(dirs):
    reward = ClassifierReward(str(dirs / "reward"), "正面", 32)
    scores = reward(["质量", "物流"], ["很好", "太差了"])
    enc = reward.tokenizer(["质量很好", "物流太差了"], max_length=32, truncation=True,
                           padding="max_length", return_tensors="np")
    logits = reward.model(enc["input_ids"], enc["attention_mask"])
    np.testing.assert_allclose(scores, np.asarray(jax.nn.softmax(logits, -1))[:, 1], atol=1e-6)
    assert ClassifierReward(str(dirs / "reward"), "0", 32).label == 0
    with pytest.raises(UserError, match=r"has labels \['负面', '正面'\]"):
        ClassifierReward(str(dirs / "reward"), "positive", 32)


def test_a_reward_model_scores_with_its_logit(tmp_path):
    """A one-label reward model (configs/reward_model.py's export) gives its raw score."""
    _export_scratch("bert", "reward", tmp_path / "rm", num_labels=1)
    reward = ClassifierReward(str(tmp_path / "rm"), "ignored", 32)
    scores = reward(["质量", "物流"], ["很好", "太差了"])
    enc = reward.tokenizer(["质量很好", "物流太差了"], max_length=32, truncation=True,
                           padding="max_length", return_tensors="np")
    logits = np.asarray(reward.model(enc["input_ids"], enc["attention_mask"]))
    assert logits.shape == (2, 1)
    np.testing.assert_allclose(scores, logits[:, 0], atol=1e-6)


def _main(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "--config=configs/ppo.py",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def _flags(dirs, workdir):
    return [f"--workdir={workdir}", f"--config.model.path={dirs / 'policy'}",
            f"--config.reward.path={dirs / 'reward'}", "--config.model.recipe=",
            "--config.reward.recipe=", "--config.ppo.batch_size=16",
            "--config.ppo.minibatch_size=8", "--config.ppo.epochs=2",
            "--config.ppo.max_new_tokens=6", "--config.ppo.prompt_length=10",
            "--config.train.steps=4", "--config.train.lr=1e-3", "--config.checkpoint.every=2"]


def _final_params(dirs, workdir):
    task = Task(tiny_config(dirs, workdir))
    trainer, ckpt = task.resumed_trainer(Path(workdir))
    ckpt.close()
    return trainer.step_no, float(trainer.state["train"]["kl_coef"]), jax.tree.leaves(
        jax.device_get(trainer.state["params"]))


def _stats(workdir):
    history = json.loads((Path(workdir) / "plots" / "history.json").read_text())
    return [{k: v for k, v in p.items() if k != "seconds"} for p in history["train"]]


def test_sigkill_then_resume_equals_an_uninterrupted_run(dirs, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = _main(_flags(dirs, whole))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 4 mean-reward:" in done.stdout
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config=configs/ppo.py",
                             *_flags(dirs, cut)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "2" / "train").is_dir() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = _main(_flags(dirs, cut))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    step_a, beta_a, params_a = _final_params(dirs, whole)
    step_b, beta_b, params_b = _final_params(dirs, cut)
    assert step_a == step_b == 4 and beta_a == beta_b
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)
    assert _stats(whole) == _stats(cut)
    assert [p["step"] for p in _stats(cut)] == [1, 2, 3, 4]
    assert (cut / "plots" / "curves.png").is_file()


# ----------------------------------------------------------------------------- feedback


def test_parse_rating_and_order():
    assert feedback.parse_rating(" 1.5 ") == 1.5
    assert feedback.parse_rating("-2") == -2.0
    assert "not a number" in feedback.parse_rating("good")
    assert "out of range" in feedback.parse_rating("3")
    assert "out of range" in feedback.parse_rating("nan")
    assert "type a number" in feedback.parse_rating("")
    assert feedback.parse_order("2 1 4 3", 4) == [1, 0, 3, 2]
    assert feedback.parse_order("2,1,4,3", 4) == [1, 0, 3, 2]
    assert feedback.parse_order("4321", 4) == [3, 2, 1, 0]
    for bad in ("1 2 3", "1 1 2 3", "5 1 2 3", "a b c d", "1 2 3 4 5"):
        assert "not an order" in feedback.parse_order(bad, 4)


def _answers(*lines):
    it = iter(lines)

    def ask(_question):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return ask


def test_rate_loop_steps_per_rating_and_replays_after_a_kill(dirs, tmp_path, capsys):
    config = tiny_config(dirs, tmp_path, batch_size=1, minibatch_size=1, epochs=1)
    task = Task(config)
    trainer, ckpt = task.resumed_trainer(tmp_path)
    ratings = tmp_path / "ratings.jsonl"
    saves = []
    made = feedback.rate(trainer, ["刚收到货"], ratings, lambda: saves.append(trainer.step_no),
                         seed=1, ask=_answers("great", "", "7", "1.5", "-2", "q"))
    out = capsys.readouterr().out
    assert made == 2 and trainer.step_no == 2 and saves == [2]
    assert "'great' is not a number" in out and "7 is out of range" in out
    records = [json.loads(line) for line in ratings.read_text().splitlines()]
    assert [(r["step"], r["reward"]) for r in records] == [(0, 1.5), (1, -2.0)]

    # A kill after the second rating was written but before the save: a fresh trainer at the
    # step-1 state replays it and ends where the uninterrupted loop did.
    params_after = jax.device_get(trainer.state["params"])
    fresh, _ = task.resumed_trainer(tmp_path / "none")
    rng, _ = ppo.step_rng(1, 0)
    fresh.step(feedback._batch(records[0]), rng)
    feedback.rate(fresh, ["刚收到货"], ratings, lambda: None, seed=1, ask=_answers("q"))
    assert fresh.step_no == 2
    for a, b in zip(jax.tree.leaves(params_after), jax.tree.leaves(jax.device_get(
            fresh.state["params"]))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert "replayed 1 rating(s)" in capsys.readouterr().out
    ckpt.close()


def test_one_rating_moves_its_sample_by_the_sign(dirs, tmp_path):
    """Without whitening (the human variant), +2 makes the rated response more likely and -2
    less likely; whitening one response's advantages would have removed that sign."""
    task = Task(tiny_config(dirs, tmp_path, batch_size=1, minibatch_size=1, epochs=1,
                            whiten_advantages=False))
    change = {}
    for rating in (2.0, -2.0):
        trainer, ckpt = task.resumed_trainer(tmp_path / "fresh")
        ckpt.close()
        sample = trainer.rollout(["刚收到货"], jax.random.key(0))
        batch = {**sample, "scores": np.asarray([rating], np.float32)}
        ids, mask = jnp.asarray(sample["input_ids"]), jnp.asarray(sample["attention_mask"])

        def logp(t=trainer, ids=ids, mask=mask):
            model = nnx.merge(t.graphdef, t.state["params"], t.frozen)
            return float(jnp.sum(model(ids, mask, 10)[0] * mask[:, 10:]))

        before = logp()
        trainer.step(batch, np.random.default_rng(0))
        change[rating] = logp() - before
    assert change[2.0] > 0.01 and change[-2.0] < -0.01


def test_rank_loop_appends_whole_lists_only(tmp_path, capsys):
    out = tmp_path / "ranked.tsv"
    out.write_text("a\tb\tc\td\nhalf\twritt", encoding="utf-8")  # a kill mid-write

    def sample(prompts, key):
        seed = int(jax.random.randint(key, (), 0, 1000))
        return [f"续写{seed}-{i}\t尾" for i in range(len(prompts))]

    n = feedback.rank(sample, ["甲", "乙"], out, 4, seed=0,
                      ask=_answers("1 2", "2 1 4 3", "s", "4321", "q", "1 2 3 4"))
    assert n == 2
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "a\tb\tc\td" and len(lines) == 3
    first = lines[1].split("\t")
    assert len(first) == 4 and [t[-3] for t in first] == ["1", "0", "3", "2"]
    assert first[0].startswith("甲续写") and first[0].endswith("-1 尾")
    assert [t.split("-")[-1] for t in lines[2].split("\t")] == ["3 尾", "2 尾", "1 尾", "0 尾"]
    assert lines[2].startswith("甲")  # the skipped list was prompt 乙 (n=1)
    shown = capsys.readouterr().out
    assert "removed an incomplete last line" in shown and "not an order" in shown


def test_tools_through_main_stdin(dirs, tmp_path):
    rank_file = tmp_path / "ranked.tsv"
    flags = _flags(dirs, tmp_path / "run") + [f"--config.feedback.rank_file={rank_file}"]
    ranked = _main([*flags, "--mode=rank"], input="2 1 4 3\nx\n1 2 3 4\n")
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    assert "2 ranked list(s) appended" in ranked.stdout
    assert [len(line.split("\t")) for line in rank_file.read_text().splitlines()] == [4, 4]

    rated = _main([*flags, "--config.ppo.batch_size=1", "--config.ppo.minibatch_size=1",
                   "--mode=rate"], input="x\n2\n0.5\n")
    assert rated.returncode == 0, rated.stderr[-2000:]
    assert "saved the policy at step 2" in rated.stdout
    lines = (tmp_path / "run" / "ratings.jsonl").read_text().splitlines()
    assert [json.loads(x)["reward"] for x in lines] == [2.0, 0.5]

    wrong = _main([*flags, "--mode=rate"])
    assert wrong.returncode == 2 and "config.ppo.batch_size=1" in wrong.stderr
    other = subprocess.run([sys.executable, str(ROOT / "main.py"),
                            "--config=configs/classification.py", "--mode=rank",
                            f"--workdir={tmp_path / 'cls'}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 2
    assert "--mode=rank is a tool that task classification lacks (it has none)" in other.stderr
