"""LoopCoT: examples and test parts per experiment, summaries, the chat-template switch, the
mean/std aggregation, and a micro experiment end to end."""

import json

import pytest

import tasks
from configs import loopcot as loopcot_config
from lib import sweep, train
from lib.errors import UserError
from lib.tokenizer import CharVocab
from tasks import loopcot, poetry
from tasks.poetry import PoetryData

RECORDS = [
    {"title": "静夜思", "author": "李白",
     "poem": "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
     "appreciation": "此诗写远客思乡之情。月光如霜，举头望月，低头思乡。", "form": "5言绝句",
     "keywords": ["明月", "故乡"]},
    {"title": "春晓", "author": "孟浩然",
     "poem": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
     "appreciation": "诗人抓住春天早晨刚醒时的一瞬间展开描写。", "form": "5言绝句",
     "keywords": ["春眠", "啼鸟", "风雨"]},
    {"title": "登鹳雀楼", "author": "王之涣",
     "poem": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
     "appreciation": "这首诗写登高望远。", "form": "5言绝句", "keywords": ["白日", "黄河"]},
]
EXTRA = [{"title": "江雪", "author": "柳宗元",
          "poem": "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
          "form": "5言绝句", "keywords": ["孤舟", "寒江"]}]


@pytest.fixture
def config(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps(RECORDS, ensure_ascii=False))
    (tmp_path / "extra.json").write_text(json.dumps(EXTRA, ensure_ascii=False))
    c = loopcot_config.get_config()
    c.data.train = c.data.eval = str(tmp_path / "pairs.json")
    c.data.extra_generation = ""
    return c


def gen_prompt(theme: str) -> str:
    return f"请根据以下提供的信息进行诗歌生成：\n\n生成主题：{theme}\n格式：5言绝句\n请生成诗歌：\n"


def app_prompt(poem: str) -> str:
    return f"请根据以下诗歌进行鉴赏：\n\n诗歌：{poem}\n请鉴赏诗歌：\n"


def test_examples_per_experiment(config, tmp_path):
    data = PoetryData(config)
    n = len(RECORDS)
    generation = [(gen_prompt("，".join(r["keywords"])), r["poem"]) for r in RECORDS]
    appreciation = [(app_prompt(r["poem"]), r["appreciation"]) for r in RECORDS]
    assert generation[0][0] == gen_prompt("明月，故乡")
    assert data.train_examples("single_generation") == generation
    assert data.train_examples("single_appreciation") == appreciation
    mix = data.train_examples("mix")
    assert len(mix) == 2 * n and sorted(mix) == sorted(generation + appreciation)
    assert mix != generation + appreciation  # shuffled ...
    assert data.train_examples("mix") == mix  # ... deterministically by the seed
    config.train.seed = 7
    assert PoetryData(config).train_examples("mix") != mix
    most = data.train_examples("mix_summarize_keywords")
    summaries = ["写远客思乡之情", "抓住春天早晨刚醒时的一瞬间", "写登高望远"]
    by_summary = [(gen_prompt(s), r["poem"]) for s, r in zip(summaries, RECORDS)]
    assert len(most) == 3 * n
    assert sorted(most) == sorted(generation + by_summary + appreciation)
    parts = data.test_parts(poetry.parse_mix("mix_summarize_keywords")[1])
    assert list(parts) == ["generation", "generation_summary", "appreciation"]
    assert parts["generation"] == generation and parts["generation_summary"] == by_summary
    assert parts["appreciation"] == appreciation
    assert list(data.test_parts(poetry.parse_mix("mix")[1])) == ["generation", "appreciation"]
    # Extra keyword poems join the generation examples of every run that generates.
    config.data.extra_generation = str(tmp_path / "extra.json")
    data = PoetryData(config)
    assert len(data.train_examples("single_generation")) == n + 1
    last = data.train_examples("single_generation")[-1]
    assert last == (gen_prompt("孤舟，寒江"), EXTRA[0]["poem"])
    assert len(data.train_examples("mix")) == 2 * n + 1
    assert len(data.train_examples("mix_summarize_keywords")) == 3 * n + 1
    with pytest.raises(UserError, match="data.mix='single'"):
        poetry.parse_mix("single")


def test_summaries_and_theme_file(config, tmp_path):
    text = "此诗歌颂了开国之君刘备的历史功绩。天地英雄的气派"
    assert poetry.summarize(text) == "歌颂了开国之君刘备的历史"
    assert poetry.summarize("天山下了一场大雪，薄海刮来寒冷的风。") == "天山下了一场大雪"
    assert poetry.summarize("秋。夜深，人静。") == "秋，夜深"  # short clauses are joined
    shipped = json.loads(open("data/poetry/pairs.json", encoding="utf-8").read())
    lengths = [len(poetry.summarize(r["appreciation"])) for r in shipped]
    assert max(lengths) <= 13 and min(lengths) >= 4
    (tmp_path / "themes.json").write_text(json.dumps({"春晓": "春日晨景"}, ensure_ascii=False))
    config.data.theme_file = str(tmp_path / "themes.json")
    themed = PoetryData(config).test_parts(("generation_summary",))["generation_summary"]
    assert [p for p, _ in themed] == [gen_prompt("写远客思乡之情"), gen_prompt("春日晨景"),
                                      gen_prompt("写登高望远")]


def test_chat_template_switch(config):
    vocab = CharVocab.build(PoetryData(config).all_texts())
    bare = loopcot.Task(config).eval_set(vocab, ("appreciation",)).prompts["appreciation"]
    assert bare[0] == app_prompt(RECORDS[0]["poem"])
    wrapping = config.copy_and_resolve_references()
    wrapping.data.chat_template_at_inference = True
    wrapped = loopcot.Task(wrapping).eval_set(vocab, ("appreciation",)).prompts["appreciation"]
    assert wrapped[0] == "[Round 1]\n\n问：" + app_prompt(RECORDS[0]["poem"]) + "\n\n答："
    # Training prompts stay bare either way.
    assert PoetryData(wrapping).train_examples("single_appreciation")[0][0] == bare[0]


def test_mean_and_std_aggregation():
    values = [{"rouge-1": 10.0, "bleu-4": 1.0}, {"rouge-1": 14.0, "bleu-4": 2.0},
              {"rouge-1": 12.0, "bleu-4": 6.0}]
    stats = sweep.aggregate(values)
    assert stats["mean"] == {"rouge-1": 12.0, "bleu-4": 3.0}
    assert stats["std"]["rouge-1"] == pytest.approx((8 / 3) ** 0.5)  # population std
    assert stats["std"]["bleu-4"] == pytest.approx((14 / 3) ** 0.5)
    metrics = loopcot_config.METRICS
    row = {"mean": dict.fromkeys(metrics, 1.5), "std": dict.fromkeys(metrics, 0.25)}
    table = sweep.format_table([("mix", "generation", row)], metrics)
    assert table.splitlines()[2].split() == ["mix", "generation"] + ["1.50", "±", "0.25"] * 4


def test_micro_experiment_end_to_end(config, tmp_path):
    c = config
    c.sweep.runs = loopcot_config.mixes("mix")
    c.eval.count = 2
    c.model.hidden_size, c.model.num_hidden_layers, c.model.intermediate_size = 32, 1, 64
    c.model.num_attention_heads, c.model.num_key_value_heads = 2, 1
    c.data.max_length, c.data.max_prompt_length, c.data.prompt_tail = 64, 40, 8
    c.train.epochs, c.train.batch_size, c.train.lr = 8, 8, 1e-2
    c.sweep.repeats = c.sweep.untrained_repeats = 2
    c.eval.batch_size = 4
    c.eval.max_new_tokens.generation = c.eval.max_new_tokens.appreciation = 8
    c.log.every = 4
    workdir = tmp_path / "exp"
    c.workdir = str(workdir)
    out = tasks.create(c).run(workdir)

    run_dir = workdir / "mix"
    # 6 examples, batch 8: 1 step per epoch, 8 steps, a checkpoint and an eval every 4.
    evals = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "eval").glob("step_*.json"))
    assert evals == [4, 8]
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [4, 8]
    step8 = json.loads((run_dir / "eval" / "step_8.json").read_text())["metrics"]
    assert set(step8) == {f"{p}/{m}" for p in ("generation", "appreciation")
                          for m in loopcot_config.METRICS} | {"rouge-1"}
    for part in ("generation", "appreciation"):
        mean = json.loads((run_dir / f"mean_of_2_{part}.json").read_text())
        assert mean["repeats"] == 2 and len(mean["values"]) == 2
        assert mean["step"] in (4, 8)
        for m in loopcot_config.METRICS:
            vals = [v[m] for v in mean["values"]]
            assert mean["mean"][m] == pytest.approx(sum(vals) / 2)
            assert mean["std"][m] == pytest.approx(abs(vals[0] - vals[1]) / 2)
        assert out[f"mix/{part}/rouge-1"] == mean["mean"]["rouge-1"]
        untrained = json.loads((workdir / "untrained" / f"mean_of_2_{part}.json").read_text())
        assert untrained["step"] == 0 and len(untrained["values"]) == 2
    for name in ("generation_result.png", "appreciation_result.png"):
        assert (workdir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["runs"]["mix"]) == {"generation", "appreciation"}
    assert set(summary["untrained"]) == {"generation", "appreciation"}
    assert "generation" in summary["trained_vs_untrained"]
    # Run again: everything is on disk, nothing is trained or re-evaluated.
    again = tasks.create(c).run(workdir)
    assert again == out
    # Inference from the run's best checkpoint: one line per direction, reproducible.
    task = loopcot.Task(sweep.run_config(c, workdir, "mix"))
    model, vocab, step = train.restore_model(task, workdir / "mix")
    lines = ['{"theme": "明月", "form": "5言绝句"}', '{"poem": "床前明月光"}', "请生成诗歌：\n"]
    outs = task.predict(model, vocab, lines)
    assert [o["part"] for o in outs] == ["generation", "appreciation", "generation"]
    assert task.predict(model, vocab, lines) == outs


def test_repeats_sample_every_prompt_from_one_prefill(config):
    """The sweep's N evaluations decode each prompt once with N samples: evaluation r scores
    the r-th answer of every prompt, which equals decoding each prompt N times in a row."""
    import jax

    from lib import lm_data

    c = config
    c.model.hidden_size, c.model.num_hidden_layers, c.model.intermediate_size = 32, 1, 64
    c.model.num_attention_heads, c.model.num_key_value_heads = 2, 1
    c.data.max_length, c.data.max_prompt_length, c.data.prompt_tail = 64, 40, 8
    c.eval.batch_size = 7  # 2 prompts (6 sequences) per batch with 3 samples each
    c.eval.max_new_tokens.generation = c.eval.max_new_tokens.appreciation = 6
    task = tasks.create(c)
    model, tokenizer = task.build()
    eval_data = task.datasets(tokenizer)[1]
    got = list(task.evaluate_repeats(model, eval_data, 3))
    assert len(got) == 3
    outputs = {}
    for part in eval_data.parts:
        key = jax.random.fold_in(jax.random.key(int(c.eval.seed)), 3)
        settings = {**task.decode_settings(), "batch_size": 6}
        outputs[part] = lm_data.generate_answers(
            model, tokenizer, [p for p in eval_data.prompts[part] for _ in range(3)],
            rng=jax.random.fold_in(key, poetry.PARTS.index(part)),
            max_new_tokens=6, **settings)
    for r, (metrics, samples) in enumerate(got):
        want = task.report(eval_data, {p: t[r::3] for p, t in outputs.items()})
        assert metrics == want[0] and samples == want[1]
    # Three different samples of a prompt (sampling, not one answer scored three times).
    first = outputs["generation"][:3]
    assert len(set(first)) == 3, first
