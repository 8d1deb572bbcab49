"""Build data/summarization/, data/t5_qa/ and data/t5_filling/ from the People's Daily corpus.

    python scripts/build_seq2seq_data.py [--src ../shared/datasets] [--out data]

Reads ``news/199801.txt`` (People's Daily, January 1998, PKU word/tag segmented, one paragraph
per line) through ``peoples_daily.py`` and writes JSONL files (one JSON object per line):

- ``summarization/{train,dev,test}.jsonl``: ``{"id", "text", "summary"}``, an article's first
  sentences (at most 256 characters) -> its headline.
- ``t5_qa/{train,dev,test}.jsonl``: ``{"context", "answer", "question", "id"}`` (DuReaderQG's
  fields): a sentence, a time / person / place / organisation it names (from the corpus's own
  tags, so the answer is true by construction) and the question for that kind of answer.
- ``t5_filling/{train,dev,test}.jsonl``: ``{"id", "text", "masked", "target"}``: a sentence,
  the same with a random span of 10-50% of its words (the corpus's own segmentation) replaced
  by ``[MASK]``, and the removed text.

The articles are shuffled once and split into dev / test / train pools that all three datasets
share, so no article is in two splits of any of them. Deterministic: running it twice gives
byte-identical files. The rules are in data/README.md.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peoples_daily  # noqa: E402
from build_demo_data import SEED, dedup_key  # noqa: E402
from peoples_daily import (  # noqa: E402
    DATELINE,
    SENTENCE_END,
    Article,
    articles,
    plain,
    tagged,
)

# Articles in the dev and test pools (the train pool has the rest, about 2400).
POOL_ARTICLES = {"dev": 300, "test": 300}
# Records of the dev and test splits (the train split's cap is per dataset, in DATASETS).
EVAL_RECORDS = 200
# QA and filling records drawn from one article at most.
RECORDS_PER_ARTICLE = 2

# Summarization: text length cap and minimum, headline length range (characters).
TEXT_MAX_CHARS = 256
TEXT_MIN_CHARS = 40
SUMMARY_CHARS = (4, 30)
# A trailing note on a headline, dropped: （图片）, （附图片３张）, （外一首）, （中国画） ...
HEADLINE_NOTE = re.compile(r"（[^（）]*）$")
# Headlines that are bylines or section labels, not summaries of the text.
NOT_A_HEADLINE = re.compile(r"^(本报记者|新华社记者|记者|图片新闻|第.{1,3}[章节条])")
# Reporters' bylines in front of the first sentence, after the dateline: 记者某某报道：,
# 新华社记者某某、本报记者某某报道：
BYLINE = re.compile(r"^[^。：]{0,60}?(记者|通讯员)[^。：]{0,40}报道：")

# QA: sentence length range, answer length range (characters), and the question per tag.
CONTEXT_CHARS = (15, 150)
ANSWER_CHARS = (2, 20)
QUESTIONS = {
    "t": "文中提到的时间是什么？",
    "nr": "文中提到的人物是谁？",
    "ns": "文中提到的地点是哪里？",
    "nt": "文中提到的机构是哪个？",
}
# A time span is used only when it holds a number in figures or a date in words (1月5日,
# 1997年, 一九九七年, 十二月): not 今天, 目前, 星期六 or 一时 (momentarily).
TIME_NUMBER = re.compile(r"[0-9]|[〇零一二三四五六七八九十]+[年月日号]")

# Filling: sentence length range in words and characters, masked share of the words.
FILL_WORDS = (8, 60)
FILL_CHARS = (12, 120)
MASK_SHARE = (0.1, 0.5)
MASK = "[MASK]"

# Full-width digits and Latin letters (the corpus writes １９９８年, ＷＴＯ) become ASCII.
_HALFWIDTH = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
              for c in range(r[0], r[1] + 1)}
_DECIMAL_POINT = re.compile(r"(?<=[0-9])．(?=[0-9])")
# Marks that close a sentence together with the 。！？ before them.
_CLOSERS = "”’』」）"


def halfwidth(word: str) -> str:
    """``word`` with full-width digits and Latin letters (and ``．`` between digits) in ASCII."""
    return _DECIMAL_POINT.sub(".", word.translate(_HALFWIDTH))


def words(line: str) -> list[tuple[str, str]]:
    """The ``(word, tag)`` pairs of a body line in half-width form, empty words dropped."""
    return [(halfwidth(w), t) for w, t in tagged(line) if w]


def drop_dateline(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` without the words of a leading dateline and byline (the first body line of a
    news item: ``本报北京１月２日讯``, ``新华社…电（记者…）``, ``记者某某报道：``)."""
    text = "".join(w for w, _ in pairs)
    cut = 0
    for pattern in (DATELINE, BYLINE):
        match = pattern.match(text[cut:])
        if match:
            cut += match.end()
    while cut < len(text) and text[cut] in "　 ：:":
        cut += 1
    out, pos = [], 0
    for w, t in pairs:
        if pos >= cut:
            out.append((w, t))
        pos += len(w)
    return out


def sentences(pairs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """``pairs`` split after each ``。！？`` word (and the closing quotes that follow it); a
    trailing part without a sentence end is dropped."""
    out: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    ended = False
    for w, t in pairs:
        if ended and w not in _CLOSERS:
            out.append(current)
            current = []
        current.append((w, t))
        ended = w in SENTENCE_END or (ended and w in _CLOSERS)
    if ended:
        out.append(current)
    return out


def text_of(pairs: list[tuple[str, str]]) -> str:
    """The words of ``pairs`` joined."""
    return "".join(w for w, _ in pairs)


def body_sentences(article: Article) -> list[list[tuple[str, str]]]:
    """The sentences of an article's body, from its first line holding a sentence end on (the
    bylines, dates and salutations before it are dropped), dateline removed."""
    out: list[list[tuple[str, str]]] = []
    for line in article.body:
        pairs = words(line)
        if not out:
            if not any(p in plain(line) for p in SENTENCE_END):
                continue
            pairs = drop_dateline(pairs)
        out += sentences(pairs)
    return out


# ------------------------------------------------------------------------------------------
# The three datasets: each maps an article to its candidate records.


def summarization_record(article: Article, rng: random.Random) -> list[dict]:
    """``{"text", "summary"}``: the first whole sentences that fit in TEXT_MAX_CHARS -> the
    headline without its trailing note; nothing if either is out of range."""
    summary = HEADLINE_NOTE.sub("", article.headline).strip()
    low, high = SUMMARY_CHARS
    if NOT_A_HEADLINE.match(summary) or not low <= len(summary) <= high:
        return []
    text = ""
    for sentence in body_sentences(article):
        piece = text_of(sentence)
        if len(text) + len(piece) > TEXT_MAX_CHARS:
            break
        text += piece
    if len(text) < TEXT_MIN_CHARS:
        return []
    return [{"text": text, "summary": halfwidth(summary)}]


def spans(sentence: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(tag, text)`` of the runs of words tagged t / nr / ns / nt (adjacent words of the
    same tag form one span: 江/nr 泽民/nr -> 江泽民, 1月/t 2日/t -> 1月2日)."""
    out: list[tuple[str, str]] = []
    previous = None
    for w, t in sentence:
        if t in QUESTIONS and t == previous:
            out[-1] = (t, out[-1][1] + w)
        elif t in QUESTIONS:
            out.append((t, w))
        previous = t
    return out


def qa_records(article: Article, rng: random.Random) -> list[dict]:
    """Up to RECORDS_PER_ARTICLE ``{"context", "answer", "question"}`` with distinct tags and
    sentences: a sentence naming exactly one distinct span of a tag, that span, the tag's
    question."""
    candidates = []
    for sentence in body_sentences(article):
        context = text_of(sentence)
        if not CONTEXT_CHARS[0] <= len(context) <= CONTEXT_CHARS[1]:
            continue
        by_tag: dict[str, set[str]] = {}
        for tag, text in spans(sentence):
            by_tag.setdefault(tag, set()).add(text)
        for tag, texts in sorted(by_tag.items()):
            if len(texts) != 1:
                continue  # two people (places ...) in one sentence: the question is ambiguous
            answer = next(iter(texts))
            if not ANSWER_CHARS[0] <= len(answer) <= ANSWER_CHARS[1]:
                continue
            if tag == "t" and not TIME_NUMBER.search(answer):
                continue
            candidates.append({"context": context, "answer": answer, "question": QUESTIONS[tag]})
    rng.shuffle(candidates)
    return _distinct(candidates, lambda r: (r["question"], r["context"]))


def filling_records(article: Article, rng: random.Random) -> list[dict]:
    """Up to RECORDS_PER_ARTICLE ``{"text", "masked", "target"}`` from distinct sentences of
    FILL_WORDS words: a span of 10-50% of the words (at least one, not only punctuation)
    replaced by MASK."""
    usable = [s for s in body_sentences(article)
              if FILL_WORDS[0] <= len(s) <= FILL_WORDS[1]
              and FILL_CHARS[0] <= len(text_of(s)) <= FILL_CHARS[1] and MASK not in text_of(s)]
    rng.shuffle(usable)
    out = []
    for sentence in usable[:RECORDS_PER_ARTICLE]:
        n = len(sentence)
        low, high = max(1, math.ceil(MASK_SHARE[0] * n)), max(1, math.floor(MASK_SHARE[1] * n))
        for _ in range(100):  # redraw a span of punctuation only
            size = rng.randint(low, high)
            start = rng.randint(0, n - size)
            if any(t != "w" for _, t in sentence[start : start + size]):
                break
        out.append({
            "text": text_of(sentence),
            "masked": text_of(sentence[:start]) + MASK + text_of(sentence[start + size :]),
            "target": text_of(sentence[start : start + size]),
        })
    return out


def _distinct(records: list[dict], keys: Callable[[dict], tuple[str, str]]) -> list[dict]:
    """The first RECORDS_PER_ARTICLE records whose two keys are both new among those kept."""
    kept: list[dict] = []
    seen: set[str] = set()
    for record in records:
        a, b = keys(record)
        if a in seen or b in seen:
            continue
        seen |= {a, b}
        kept.append(record)
        if len(kept) == RECORDS_PER_ARTICLE:
            break
    return kept


@dataclass(frozen=True)
class Dataset:
    """How one dataset is drawn from the articles."""

    # The records of an article.
    records: Callable[[Article, random.Random], list[dict]]
    # The field whose text must not repeat (in any split).
    key: str
    # The fields of a line, in order.
    fields: tuple[str, ...]
    # Records of the train split at most; None: every record of the train pool.
    train_records: int | None


DATASETS = {
    "summarization": Dataset(summarization_record, "text", ("id", "text", "summary"), None),
    "t5_qa": Dataset(qa_records, "context", ("context", "answer", "question", "id"), 3000),
    "t5_filling": Dataset(filling_records, "text", ("id", "text", "masked", "target"), 3000),
}


# ------------------------------------------------------------------------------------------
# Splitting and writing


def unique_articles(lines: list[str]) -> list[Article]:
    """The corpus's articles, dropping one whose headline or first body line equals (ignoring
    punctuation and case) one of an earlier article (reprints, serial columns)."""
    seen: set[str] = set()
    out = []
    for article in articles(lines):
        keys = {dedup_key(article.headline), dedup_key(plain(article.body[0]) if article.body
                                                       else "")}
        if keys & seen or not article.body:
            continue
        seen |= keys
        out.append(article)
    return out


def pools(items: list[Article], rng: random.Random) -> dict[str, list[Article]]:
    """The articles shuffled and cut into the dev, test and train pools."""
    order = list(items)
    rng.shuffle(order)
    out, start = {}, 0
    for name, size in POOL_ARTICLES.items():
        out[name] = order[start : start + size]
        start += size
    out["train"] = order[start:]
    return out


def build_dataset(name: str, split_pools: dict[str, list[Article]], out: Path) -> dict[str, int]:
    """Write ``out/name/{train,dev,test}.jsonl``; return the record counts. A record whose key
    field (text, context) repeats one written before, in any split, is dropped."""
    dataset = DATASETS[name]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    counts = {}
    for split in ("dev", "test", "train"):
        rng = random.Random(f"{SEED}-{name}-{split}")
        cap = dataset.train_records if split == "train" else EVAL_RECORDS
        records: list[dict] = []
        for article in split_pools[split]:
            if cap is not None and len(records) >= cap:
                break
            for record in dataset.records(article, rng):
                key = dedup_key(record[dataset.key])
                if key not in seen:
                    seen.add(key)
                    records.append(record)
        records = records[:cap]
        lines = []
        for i, record in enumerate(records):
            record = {**record, "id": i}
            lines.append(json.dumps({f: record[f] for f in dataset.fields},
                                    ensure_ascii=False) + "\n")
        (folder / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        counts[f"{name}/{split}.jsonl"] = len(records)
    return counts


def build(src: Path, out: Path) -> dict[str, int]:
    """Write the three datasets and their LICENSE files; return the counts."""
    lines = (src / "news" / "199801.txt").read_text(encoding="utf-8").splitlines()
    split_pools = pools(unique_articles(lines), random.Random(SEED))
    counts = {}
    for name in DATASETS:
        counts |= build_dataset(name, split_pools, out)
        shutil.copyfile(src / "news" / "LICENSE", out / name / "LICENSE")
    return counts


if __name__ == "__main__":
    peoples_daily.main(__doc__, build)
