"""LoopCoT's data: the poems, the prompts of both directions, and the mixes of examples.

Directions: *generation* (theme + form → poem) and *appreciation* (poem → prose appreciation),
with the original prompt templates (``GENERATION_TEMPLATE``, ``APPRECIATION_TEMPLATE``).
Training data mixes (``config.data.mix``):

- ``single_generation`` / ``single_appreciation``: one direction only.
- ``mix``: both directions concatenated and shuffled with ``train.seed``.
- ``mix_summarize_keywords``: generation twice, with the keywords as theme and with a
  ≤13-character summary of the appreciation as theme (``summarize``, or the titles' themes of
  ``data.theme_file``), plus the appreciation examples.

A mix sets its test parts (``generation``, ``generation_summary``, ``appreciation``), built
from the test pairs of ``data.eval``. Generation themes are the record's keywords joined by
``data.keyword_sep``; the generation examples also take the keyword-themed poems of
``data.extra_generation`` (no appreciation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lib import metrics as metrics_lib
from lib.chatglm_tokenizer import ChatGLMTokenizer
from lib.data import read_json
from lib.errors import UserError

GENERATION_TEMPLATE = (
    "请根据以下提供的信息进行诗歌生成：\n\n生成主题：{theme}\n格式：{form}\n请生成诗歌：\n"
)
APPRECIATION_TEMPLATE = "请根据以下诗歌进行鉴赏：\n\n诗歌：{poem}\n请鉴赏诗歌：\n"

# Test parts in a fixed order: a part's index seeds its sampling, whichever run evaluates it.
PARTS = ("generation", "generation_summary", "appreciation")
MIXES = ("single_generation", "single_appreciation", "mix", "mix_summarize_keywords")

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


def parse_mix(mix: str) -> tuple[str, tuple[str, ...]]:
    """``(experiment, test parts)`` of a training data mix (``config.data.mix``)."""
    if mix == "single_generation":
        return "single", ("generation",)
    if mix == "single_appreciation":
        return "single", ("appreciation",)
    if mix == "mix":
        return "mix", ("generation", "appreciation")
    if mix == "mix_summarize_keywords":
        return "mix_summarize_keywords", PARTS
    raise UserError(f"config.data.mix={mix!r}: choose one of {', '.join(MIXES)}")


class PoetryData:
    """The poem records of ``config.data`` and the examples each run and test part uses."""

    def __init__(self, config):
        d = config.data
        self.pairs = read_json(d.train, PAIR_FIELDS, key="data.train")
        self.test = read_json(d.eval, PAIR_FIELDS, key="data.eval")
        if d.test_size > 0:
            self.test = self.test[: int(d.test_size)]
        self.extra = (
            read_json(d.extra_generation, EXTRA_FIELDS, key="data.extra_generation")
            if d.extra_generation else []
        )
        self.themes = read_themes(d.theme_file) if d.theme_file else {}
        self.sep = d.keyword_sep
        self.summary_chars = int(d.summary_chars)
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

    def train_examples(self, mix: str) -> list[tuple[str, str]]:
        """The training pairs of a data mix; mixtures are shuffled with ``train.seed``."""
        experiment, parts = parse_mix(mix)
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
        """Every training prompt and answer of every mix (the scratch vocabulary's source)."""
        pairs = self.generation(self.pairs + self.extra) + self.generation(self.pairs, True)
        pairs += self.appreciation(self.pairs)
        return [p + a for p, a in pairs]
