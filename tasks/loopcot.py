"""LoopCoT: fine-tune one model on poem generation *and* its inverse, appreciation (SEEDS.md §1).

Directions: *generation* (theme + form → poem) and *appreciation* (poem → prose appreciation),
with the original prompt templates (``GENERATION_TEMPLATE``, ``APPRECIATION_TEMPLATE``).
Examples are causal-LM (prompt, answer) pairs, loss on the answer and EOS (``lib.lm_data``).

Runs (``config.experiment.runs``), each trained in ``workdir/<run>/`` by ``lib.train.train``:
- ``single_generation`` / ``single_appreciation``: one direction only.
- ``mix``: both directions concatenated and shuffled with ``train.seed``.
- ``mix_summarize_keywords``: generation twice, with the keywords as theme and with a
  ≤13-character summary of the appreciation as theme (``summarize``, or the titles' themes of
  ``data.theme_file``), plus the appreciation examples; the test set has three parts
  (``generation``, ``generation_summary``, ``appreciation``).
Generation themes are the record's keywords joined by ``data.keyword_sep``; the generation
examples also take the keyword-themed poems of ``data.extra_generation`` (no appreciation).

Evaluation of a test part: sampled decoding (top_p 0.8, temperature 0.8 by default) of every
test prompt, then ROUGE-1/2/L (jieba words) and BLEU-4 (characters), x100. ``run`` evaluates
the untrained model, trains every run (evaluating every checkpoint), re-evaluates each run's
best checkpoint per part ``eval.repeats`` times with different keys, and writes
``<run>/mean_of_<N>_<part>.json``, ``plots/{generation,appreciation}_result.png`` and
``summary.json``, and prints the table of mean ± std.

The original's bug: training used the bare prompt while inference wrapped it in ChatGLM's chat
template ``[Round 1]\\n\\n问：{prompt}\\n\\n答：``, so the model was evaluated on prompts it never
saw. Here both use the bare prompt; ``data.chat_template_at_inference=True`` brings the old
behaviour back (inference prompts wrapped) for comparison with the reported numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lib import metrics as metrics_lib
from lib import train as trainer
from lib.chatglm_tokenizer import ChatGLMTokenizer
from lib.checkpoint import Checkpoints
from lib.data import ArrayDataset, json_object_or_none, read_json
from lib.errors import UserError
from tasks import sft

GENERATION_TEMPLATE = (
    "请根据以下提供的信息进行诗歌生成：\n\n生成主题：{theme}\n格式：{form}\n请生成诗歌：\n"
)
APPRECIATION_TEMPLATE = "请根据以下诗歌进行鉴赏：\n\n诗歌：{poem}\n请鉴赏诗歌：\n"

# Test parts in a fixed order: a part's index seeds its sampling, whichever run evaluates it.
PARTS = ("generation", "generation_summary", "appreciation")
RUNS = ("single_generation", "single_appreciation", "mix", "mix_summarize_keywords")
METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
UNTRAINED = "untrained"

PAIR_FIELDS = {"title": str, "poem": str, "appreciation": str, "form": str, "keywords": list}
EXTRA_FIELDS = {"title": str, "poem": str, "form": str, "keywords": list}

# ----------------------------------------------------------------------------- examples


def generation_prompt(theme: str, form: str) -> str:
    """The generation prompt (theme + form → poem)."""
    return GENERATION_TEMPLATE.format(theme=theme, form=form)


def appreciation_prompt(poem: str) -> str:
    """The appreciation prompt (poem → appreciation)."""
    return APPRECIATION_TEMPLATE.format(poem=poem)


def chat_wrap(prompt: str) -> str:
    """ChatGLM's one-round chat template, which the original used at inference only."""
    return ChatGLMTokenizer.build_prompt(prompt)


_CLAUSE_END = re.compile(r"[，。；：！？、,.;:!?（）()“”‘’《》\s]+")
# Openings that say nothing about the poem's content ("此诗写……" → "写……").
_BOILERPLATE = ("这首诗", "这是一首", "此诗", "本诗", "全诗", "此词", "这首词", "诗人")


def summarize(appreciation: str, max_chars: int = 13) -> str:
    """A deterministic extractive summary of at most ``max_chars`` characters.

    The first clause of the appreciation (text before the first punctuation mark), with a
    leading "此诗 / 这首诗 / ..." dropped, joined with the next clause while it has under 4
    characters; a longer clause is cut after the last jieba word that still fits.
    """
    clauses = [c for c in _CLAUSE_END.split(appreciation) if c]
    if not clauses:
        return ""
    text = clauses[0]
    for opening in _BOILERPLATE:
        if text.startswith(opening) and len(text) > len(opening) + 1:
            text = text[len(opening) :]
            break
    rest = clauses[1:]
    while len(text) < 4 and rest:
        text += "，" + rest.pop(0)
    if len(text) <= max_chars:
        return text
    out = ""
    for word in metrics_lib._quiet_jieba().cut(text):
        if len(out) + len(word) > max_chars:
            break
        out += word
    return out or text[:max_chars]


def keyword_theme(record: dict, sep: str = "，") -> str:
    """The keywords of a record joined into a theme."""
    return sep.join(str(k) for k in record["keywords"])


def read_themes(path: str) -> dict[str, str]:
    """A theme file: a JSON object mapping poem title → theme."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: theme file not found (--config.data.theme_file)")
    try:
        themes = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(themes, dict) or not all(isinstance(v, str) for v in themes.values()):
        raise UserError(f'{path}: expected a JSON object {{"title": "theme", ...}}')
    return themes


def summary_theme(record: dict, themes: dict[str, str], max_chars: int) -> str:
    """The summary theme of a record: its title's theme in the theme file, else ``summarize``."""
    theme = themes.get(record["title"])
    return theme if theme is not None else summarize(record["appreciation"], max_chars)


def parse_run(name: str) -> tuple[str, tuple[str, ...]]:
    """``(experiment, test parts)`` of a run name."""
    if name == "single_generation":
        return "single", ("generation",)
    if name == "single_appreciation":
        return "single", ("appreciation",)
    if name == "mix":
        return "mix", ("generation", "appreciation")
    if name == "mix_summarize_keywords":
        return "mix_summarize_keywords", PARTS
    raise UserError(
        f"config.experiment.runs: unknown run {name!r}; choose from {', '.join(RUNS)}"
    )


class PoetryData:
    """The poem records of ``config.data`` and the examples each run and test part uses."""

    def __init__(self, config):
        d = config.data
        self.pairs = read_json(d.train, PAIR_FIELDS, key="data.train")
        self.test = read_json(d.test, PAIR_FIELDS, key="data.test")
        if int(d.get("test_size", 0) or 0) > 0:
            self.test = self.test[: int(d.test_size)]
        self.extra = (
            read_json(d.extra_generation, EXTRA_FIELDS, key="data.extra_generation")
            if d.get("extra_generation") else []
        )
        self.themes = read_themes(d.theme_file) if d.get("theme_file") else {}
        self.sep = d.get("keyword_sep", "，")
        self.summary_chars = int(d.get("summary_chars", 13))
        self.seed = int(config.train.seed)

    def generation(self, records: list[dict], summary: bool = False) -> list[tuple[str, str]]:
        """(prompt, poem) pairs with keyword themes, or summary themes when ``summary``."""
        out = []
        for r in records:
            if summary:
                theme = summary_theme(r, self.themes, self.summary_chars)
            else:
                theme = keyword_theme(r, self.sep)
            out.append((generation_prompt(theme, r["form"]), r["poem"]))
        return out

    def appreciation(self, records: list[dict]) -> list[tuple[str, str]]:
        """(prompt, appreciation) pairs."""
        return [(appreciation_prompt(r["poem"]), r["appreciation"]) for r in records]

    def train_examples(self, run: str) -> list[tuple[str, str]]:
        """The training pairs of a run; mixtures are shuffled with ``train.seed``."""
        experiment, parts = parse_run(run)
        if experiment == "single":
            if parts == ("generation",):
                return self.generation(self.pairs + self.extra)
            return self.appreciation(self.pairs)
        examples = self.generation(self.pairs + self.extra)
        if experiment == "mix_summarize_keywords":
            examples += self.generation(self.pairs, summary=True)
        examples += self.appreciation(self.pairs)
        order = np.random.default_rng(self.seed).permutation(len(examples))
        return [examples[i] for i in order]

    def test_parts(self, parts: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
        """(prompt, reference) pairs of each test part."""
        build = {
            "generation": lambda: self.generation(self.test),
            "generation_summary": lambda: self.generation(self.test, summary=True),
            "appreciation": lambda: self.appreciation(self.test),
        }
        return {part: build[part]() for part in parts}

    def all_texts(self) -> list[str]:
        """Every training prompt and answer of every run (the scratch vocabulary's source)."""
        pairs = self.generation(self.pairs + self.extra) + self.generation(self.pairs, True)
        pairs += self.appreciation(self.pairs)
        return [p + a for p, a in pairs]


# ----------------------------------------------------------------------------- aggregation


def aggregate(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (population, ddof 0) standard deviation of each metric over repeats."""
    if not values:
        return {"mean": {}, "std": {}}
    keys = list(values[0])
    arr = {k: np.asarray([v[k] for v in values], np.float64) for k in keys}
    return {
        "mean": {k: float(a.mean()) for k, a in arr.items()},
        "std": {k: float(a.std()) for k, a in arr.items()},
    }


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """A text table of ``(run, part, {"mean", "std"})`` rows: one column per metric."""
    head = f"{'run':<24}{'part':<20}" + "".join(f"{m.upper():>16}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for run, part, stats in rows:
        cells = "".join(
            f"{stats['mean'][m]:>9.2f} ± {stats['std'][m]:<4.2f}" for m in METRICS
        )
        lines.append(f"{run:<24}{part:<20}{cells}")
    return "\n".join(lines)


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _eval_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """step → metrics of every ``eval/step_N.json`` of a run."""
    out = {}
    for path in sorted((run_dir / "eval").glob("step_*.json")):
        payload = json.loads(path.read_text(encoding="utf-8"))
        out[int(payload["step"])] = payload["metrics"]
    return out


def _committed(model: nnx.Module) -> nnx.Module:
    """``model`` with its arrays committed to the first device, as restored checkpoints are:
    jit caches by placement, so the untrained and the restored models then share one
    compiled decoding function instead of compiling it twice."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))


def _latest_step(run_dir: Path) -> int | None:
    """The newest checkpoint step of a run directory, or None."""
    ckpt = Checkpoints(run_dir / "checkpoints")
    step = ckpt.latest_step()
    ckpt.close()
    return step


def _mean_done(run_dir: Path, part: str, repeats: int, step: int) -> bool:
    """Whether ``mean_of_N_<part>.json`` exists for checkpoint ``step``."""
    path = run_dir / f"mean_of_{repeats}_{part}.json"
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("step") == step


def plot_results(workdir: Path, histories: dict[str, dict[int, dict]], untrained: dict) -> list:
    """``plots/<direction>_result.png``: each metric vs step, one line per run (and part)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for direction in ("generation", "appreciation"):
        fig = Figure(figsize=(12, 8))
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 2).ravel()
        drawn = False
        for run, history in histories.items():
            for part in PARTS:
                if not part.startswith(direction):
                    continue
                steps = sorted(s for s, m in history.items() if f"{part}/rouge-1" in m)
                if not steps:
                    continue
                start = untrained.get(part)
                label = run if part == direction else f"{run} ({part})"
                for ax, metric in zip(axes, METRICS):
                    xs = ([0] if start else []) + steps
                    ys = ([start[metric]] if start else [])
                    ys += [history[s][f"{part}/{metric}"] for s in steps]
                    ax.plot(xs, ys, marker="o", markersize=3, label=label)
                drawn = True
        if not drawn:
            continue
        for ax, metric in zip(axes, METRICS):
            ax.set_title(f"{direction}: {metric.upper()}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        out = workdir / "plots" / f"{direction}_result.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=90)
        written.append(out)
    return written


# ----------------------------------------------------------------------------- the task


class LoopEval:
    """The test parts of a run: prompts (as decoded, chat-wrapped or not) and references."""

    def __init__(self, parts: dict[str, list[tuple[str, str]]], tokenizer: Any, wrap: bool):
        self.tokenizer = tokenizer
        self.prompts = {p: [chat_wrap(q) if wrap else q for q, _ in v] for p, v in parts.items()}
        self.references = {p: [a for _, a in v] for p, v in parts.items()}

    @property
    def parts(self) -> tuple[str, ...]:
        """Test part names, in ``PARTS`` order."""
        return tuple(p for p in PARTS if p in self.prompts)


class Task(sft.Task):
    """Bidirectional poetry fine-tuning (the causal-LM machinery is ``tasks.sft``'s)."""

    # --- data -----------------------------------------------------------------------------

    def vocab_texts(self, config) -> list[str]:
        """All runs' training texts: every run (and the untrained model) shares one vocab."""
        return PoetryData(config).all_texts()

    def current_run(self, config) -> str:
        """The run whose data ``datasets`` builds (``experiment.run``, else the first run)."""
        run = config.experiment.get("run") or config.experiment.runs[0]
        parse_run(run)
        return run

    def eval_set(self, config, tokenizer, parts: tuple[str, ...]) -> LoopEval:
        """A ``LoopEval`` of the given test parts."""
        data = PoetryData(config)
        return LoopEval(
            data.test_parts(parts), tokenizer, bool(config.data.chat_template_at_inference)
        )

    def datasets(self, config, tokenizer):
        """The current run's training examples and its test parts."""
        self.config = config
        run = self.current_run(config)
        pairs = PoetryData(config).train_examples(run)
        train = ArrayDataset(self.arrays(tokenizer, pairs), name=f"{run} training examples")
        return train, self.eval_set(config, tokenizer, parse_run(run)[1])

    # --- evaluation -----------------------------------------------------------------------

    def max_new_tokens(self, part: str) -> int:
        """Decoding budget of a part (``generation_summary`` decodes poems, as generation)."""
        budget = self.config.eval.max_new_tokens
        return int(budget.appreciation if part == "appreciation" else budget.generation)

    def decode_part(self, model, eval_data: LoopEval, part: str, repeat: int) -> list[str]:
        """Sampled answers to a part's prompts; the key depends on (eval.seed, repeat, part)."""
        key = jax.random.fold_in(jax.random.key(int(self.config.eval.seed)), repeat)
        key = jax.random.fold_in(key, PARTS.index(part))
        return sft.generate_answers(
            model, eval_data.tokenizer, eval_data.prompts[part], rng=key,
            max_new_tokens=self.max_new_tokens(part), **self.decode_settings(),
        )

    def score_part(self, model, eval_data: LoopEval, part: str, repeat: int = 0):
        """``({metric: value}, outputs)`` of one decoding pass over a part."""
        outputs = self.decode_part(model, eval_data, part, repeat)
        refs = eval_data.references[part]
        scores = metrics_lib.rouge_zh(outputs, refs)
        scores["bleu-4"] = metrics_lib.bleu4_chars(outputs, refs)
        return scores, outputs

    def evaluate(self, model, eval_data: LoopEval, repeat: int = 0):
        """ROUGE-1/2/L and BLEU-4 (x100) of every test part as ``part/metric``, and
        ``rouge-1``: their mean over parts (what picks the trainer's best checkpoint)."""
        out: dict[str, float] = {}
        samples = []
        for part in eval_data.parts:
            t0 = time.perf_counter()
            scores, outputs = self.score_part(model, eval_data, part, repeat)
            out.update({f"{part}/{m}": v for m, v in scores.items()})
            print(
                f"  eval {part}: {len(outputs)} prompts in {time.perf_counter() - t0:.1f}s, "
                f"rouge-1 {scores['rouge-1']:.2f}",
                flush=True,
            )
            for prompt, ref, output in list(
                zip(eval_data.prompts[part], eval_data.references[part], outputs)
            )[: int(self.config.eval.num_samples)]:
                samples.append({"part": part, "prompt": prompt, "reference": ref,
                                "output": output})
        out["rouge-1"] = float(np.mean([out[f"{p}/rouge-1"] for p in eval_data.parts]))
        return out, samples

    def repeat_scores(self, model, eval_data: LoopEval, part: str, repeats: int, label: str):
        """Score a part ``repeats`` times with keys 0..repeats-1, printing progress."""
        values = []
        t0 = time.perf_counter()
        for r in range(repeats):
            scores, _ = self.score_part(model, eval_data, part, r)
            values.append(scores)
            print(
                f"  {label} {part}: repeat {r + 1}/{repeats}, rouge-1 {scores['rouge-1']:.2f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        return values

    # --- inference ------------------------------------------------------------------------

    def predict(self, config, model, tokenizer, inputs: list[str]) -> list[dict]:
        """Sampled answers. A line is a JSON object ``{"theme", "form"}`` (generation) or
        ``{"poem"}`` (appreciation), or a prompt used as is."""
        self.config = config
        prompts, parts = [], []
        for text in inputs:
            record = json_object_or_none(text) or {}
            if "poem" in record:
                prompts.append(appreciation_prompt(str(record["poem"])))
                parts.append("appreciation")
            elif "theme" in record:
                prompts.append(generation_prompt(str(record["theme"]),
                                                 str(record.get("form", "5言绝句"))))
                parts.append("generation")
            else:
                prompts.append(text)
                parts.append("generation")
        if config.data.chat_template_at_inference:
            prompts = [chat_wrap(p) for p in prompts]
        outputs = [""] * len(prompts)
        for part in sorted(set(parts)):
            rows = [i for i, p in enumerate(parts) if p == part]
            key = jax.random.fold_in(jax.random.key(int(config.eval.seed)), PARTS.index(part))
            texts = sft.generate_answers(
                model, tokenizer, [prompts[i] for i in rows], rng=key,
                max_new_tokens=self.max_new_tokens(part), **self.decode_settings(),
            )
            for i, text in zip(rows, texts):
                outputs[i] = text
        return [
            {"input": t, "part": p, "output": o} for t, p, o in zip(inputs, parts, outputs)
        ]

    # --- the experiment -------------------------------------------------------------------

    def run_config(self, config, workdir: Path, run: str):
        """The config of one run: its data, its workdir, its eval/checkpoint cadence."""
        c = config.copy_and_resolve_references()
        c.experiment.run = run
        c.workdir = str(workdir / run)
        per_run = int(config.experiment.get("evals_per_run", 0) or 0)
        if per_run > 0:
            self.config = c
            pairs = PoetryData(c).train_examples(run)
            global_batch = int(c.train.batch_size) * int(c.train.get("grad_accum", 1))
            steps = self.total_steps(c, len(pairs), global_batch)
            every = max(1, math.ceil(steps / per_run))
            c.eval.every = every
            c.checkpoint.every = every
        return c

    @staticmethod
    def total_steps(config, n_examples: int, global_batch: int) -> int:
        """The trainer's step count: ``train.epochs`` passes, else ``train.steps``."""
        if int(config.train.get("epochs", 0) or 0) > 0:
            return int(config.train.epochs) * max(-(-n_examples // global_batch), 1)
        return int(config.train.steps)

    def _restore(self, model, run_dir: Path, step: int):
        """The built ``model`` with the params of ``run_dir``'s checkpoint ``step``."""
        graphdef, params, frozen = trainer.split_model(model, self.trainable)
        ckpt = Checkpoints(run_dir / "checkpoints")
        restored = ckpt.restore(step, {"params": nnx.to_pure_dict(params)})["params"]
        ckpt.close()
        return _committed(nnx.merge(graphdef, restored, frozen))

    def run(self, config, workdir) -> dict[str, float]:
        """Untrained eval, every run's training, mean-of-N of each best checkpoint, plots,
        table and ``summary.json`` (see the module docstring). Resumes where it stopped."""
        t_start = time.perf_counter()
        workdir = Path(workdir)
        runs = list(config.experiment.runs)
        if not runs:
            raise UserError("config.experiment.runs is empty: name at least one run")
        parts = tuple(p for p in PARTS if any(p in parse_run(r)[1] for r in runs))
        print(f"LoopCoT: runs {', '.join(runs)}; test parts {', '.join(parts)}; "
              f"mean of {config.eval.repeats} per best checkpoint", flush=True)
        untrained = self._evaluate_untrained(config, workdir, runs, parts)
        for i, run in enumerate(runs, 1):
            if not self._train_run(config, workdir, run, f"{i}/{len(runs)}"):
                return {}
        results, histories = self._mean_of_n(config, workdir, runs)
        return self._report(workdir, runs, parts, untrained, results, histories, t_start)

    def _evaluate_untrained(self, config, workdir: Path, runs: list, parts: tuple) -> dict:
        """Mean-of-N of the untrained model per part (every run's step 0: same initialization,
        same vocabulary), written under ``workdir/untrained/``; ``{part: mean-of-N JSON}``."""
        repeats = int(config.eval.get("untrained_repeats", config.eval.repeats))
        out_dir = workdir / UNTRAINED
        todo = [p for p in parts if not (out_dir / f"mean_of_{repeats}_{p}.json").is_file()]
        if repeats > 0 and todo:
            print(f"== untrained model: {', '.join(todo)} x {repeats}", flush=True)
            cfg = self.run_config(config, workdir, runs[0])
            model, tokenizer = self.build(cfg)
            model = _committed(model)
            self.save_assets(cfg, tokenizer, workdir / runs[0])
            eval_data = self.eval_set(cfg, tokenizer, parts)
            first = {}
            for part in todo:
                values = self.repeat_scores(model, eval_data, part, repeats, UNTRAINED)
                first.update({f"{part}/{m}": v for m, v in values[0].items()})
                self._write_mean(out_dir, part, 0, values, UNTRAINED, "untrained model")
            old = out_dir / "eval" / "step_0.json"
            if old.is_file():
                first = {**json.loads(old.read_text(encoding="utf-8"))["metrics"], **first}
            trainer.write_eval(out_dir, 0, first, [])
        return {
            p: json.loads(path.read_text(encoding="utf-8"))
            for p in parts if (path := out_dir / f"mean_of_{repeats}_{p}.json").is_file()
        }

    def _train_run(self, config, workdir: Path, run: str, counter: str) -> bool:
        """Train one run in ``workdir/<run>`` (resuming); False if it stopped early."""
        rc = self.run_config(config, workdir, run)
        run_dir = workdir / run
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(rc.to_json_best_effort(indent=2) + "\n")
        n = len(PoetryData(rc).train_examples(run))
        global_batch = int(rc.train.batch_size) * int(rc.train.get("grad_accum", 1))
        steps = self.total_steps(rc, n, global_batch)
        reached = _latest_step(run_dir)
        print(f"== run {counter}: {run}: {n} examples, {steps} steps, eval and checkpoint "
              f"every {rc.eval.every}" + (" (done)" if reached == steps else ""), flush=True)
        if reached == steps:
            return True
        trainer.train(rc, run_dir, self)
        reached = _latest_step(run_dir)
        if reached != steps:
            # The trainer returns after saving on SIGTERM: stop the experiment too.
            print(f"run {run} stopped at step {reached} of {steps}; run the same command "
                  "again to resume", flush=True)
            return False
        return True

    def _mean_of_n(self, config, workdir: Path, runs: list) -> tuple[dict, dict]:
        """Evaluate checkpoints without an eval, then each part's best checkpoint N times.

        Returns ``({run: {part: mean-of-N JSON}}, {run: {step: eval metrics}})``.
        """
        repeats = int(config.eval.repeats)
        select = config.eval.get("select_metric", "rouge-1")
        print(f"== mean of {repeats} per run and test part", flush=True)
        model = tokenizer = None
        results: dict[str, dict[str, dict]] = {}
        histories: dict[str, dict[int, dict]] = {}
        for run in runs:
            rc = self.run_config(config, workdir, run)
            run_dir = workdir / run
            parts = parse_run(run)[1]
            ckpt = Checkpoints(run_dir / "checkpoints", best_metric=rc.eval.best_metric,
                               best_mode=rc.eval.get("best_mode", "max"))
            on_disk, trainer_best = ckpt.all_steps(), ckpt.best_step()
            ckpt.close()
            history = _eval_history(run_dir)
            missing = [s for s in on_disk if s not in history]
            best = {p: self._best_step(history, on_disk, p, select, trainer_best) for p in parts}
            todo = [p for p in parts if not _mean_done(run_dir, p, repeats, best[p][0])]
            if missing or todo:
                if model is None:
                    model, tokenizer = self.build(rc)
                self.config = rc
                eval_data = self.eval_set(rc, tokenizer, parts)
            for step in missing:
                print(f"  {run}: evaluating checkpoint {step} (no eval on disk)", flush=True)
                metrics, samples = self.evaluate(self._restore(model, run_dir, step), eval_data)
                trainer.write_eval(run_dir, step, metrics, samples)
                history[step] = metrics
            if missing:
                best = {p: self._best_step(history, on_disk, p, select, trainer_best)
                        for p in parts}
                todo = [p for p in parts if not _mean_done(run_dir, p, repeats, best[p][0])]
            for part in todo:
                step, how = best[part]
                print(f"  {run} {part}: checkpoint {step} ({how})", flush=True)
                values = self.repeat_scores(
                    self._restore(model, run_dir, step), eval_data, part, repeats, run
                )
                self._write_mean(run_dir, part, step, values, run, how)
            histories[run] = history
            results[run] = {
                p: json.loads((run_dir / f"mean_of_{repeats}_{p}.json").read_text(
                    encoding="utf-8"))
                for p in parts
            }
        return results, histories

    def _report(self, workdir, runs, parts, untrained, results, histories, t_start) -> dict:
        """Plots, the printed table and ``summary.json``; the flat metrics for main.py."""
        step0 = workdir / UNTRAINED / "eval" / "step_0.json"
        start = json.loads(step0.read_text(encoding="utf-8"))["metrics"] if step0.is_file() \
            else {}
        start_by_part = {p: {m: start[f"{p}/{m}"] for m in METRICS}
                         for p in PARTS if f"{p}/rouge-1" in start}
        plots = plot_results(workdir, histories, start_by_part)
        rows = [(UNTRAINED, p, untrained[p]) for p in parts if p in untrained]
        rows += [(run, p, results[run][p]) for run in runs for p in parse_run(run)[1]]
        table = format_table(rows)
        comparison = {}
        for part in parts:
            trained = {r: results[r][part]["mean"]["rouge-1"] for r in runs if part in results[r]}
            if part in untrained:
                comparison[part] = {"untrained_rouge-1": untrained[part]["mean"]["rouge-1"],
                                    "trained_rouge-1": trained}
        wall = time.perf_counter() - t_start
        summary = {
            "runs": {r: {p: {k: results[r][p][k] for k in ("step", "selected_by", "mean", "std")}
                         for p in results[r]} for r in runs},
            UNTRAINED: {p: {k: untrained[p][k] for k in ("mean", "std")} for p in untrained},
            "repeats": int(self.config.eval.repeats),
            "trained_vs_untrained": comparison,
            "table": table.splitlines(),
            "plots": [str(p) for p in plots],
            "wall_seconds_this_invocation": round(wall, 1),
        }
        _write_json(workdir / "summary.json", summary)
        print(table, flush=True)
        for part, c in comparison.items():
            shown = ", ".join(f"{r} {v:.2f}" for r, v in c["trained_rouge-1"].items())
            print(f"{part} ROUGE-1: untrained {c['untrained_rouge-1']:.2f}; trained: {shown}",
                  flush=True)
        print(f"plots: {', '.join(str(p) for p in plots)}; summary: {workdir / 'summary.json'}; "
              f"{wall / 60:.1f} min", flush=True)
        return {f"{r}/{p}/{m}": results[r][p]["mean"][m]
                for r in runs for p in results[r] for m in METRICS}

    @staticmethod
    def _best_step(history, on_disk, part, select, trainer_best) -> tuple[int, str]:
        """The kept checkpoint with the best ``part/select`` eval, and how it was chosen."""
        key = f"{part}/{select}"
        scored = [s for s in on_disk if s in history and key in history[s]]
        if scored:
            best = max(scored, key=lambda s: (history[s][key], -s))
            return best, f"best {key} of {len(scored)} kept checkpoints"
        if trainer_best is not None:
            return trainer_best, "the trainer's best checkpoint"
        if not on_disk:
            raise UserError("a run has no checkpoints: train it first")
        return on_disk[-1], "the latest checkpoint"

    def _write_mean(self, run_dir: Path, part: str, step: int, values, run: str, how) -> None:
        """Write ``run_dir/mean_of_<N>_<part>.json``: every repeat's scores, mean and std."""
        stats = aggregate(values)
        payload = {
            "run": run, "part": part, "step": step, "selected_by": how,
            "repeats": len(values), "seed": int(self.config.eval.seed),
            "decoding": {k: self.config.eval[k] for k in ("temperature", "top_p", "top_k")},
            "mean": stats["mean"], "std": stats["std"], "values": values,
        }
        _write_json(run_dir / f"mean_of_{len(values)}_{part}.json", payload)
