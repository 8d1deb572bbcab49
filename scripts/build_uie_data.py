"""Build data/uie/ (entity and relation extraction records) from the People's Daily corpus.

    python scripts/build_uie_data.py [--src ../shared/datasets] [--out data]

Reads ``news/199801.txt`` through ``peoples_daily.py`` (the corpus's articles and tagged
words, shared with the other People's Daily builders) and writes
``uie/{train,dev,test}.jsonl``, one UIE record
``{"content", "result_list": [{"text", "start", "end"}], "prompt"}`` per line:

- entities from the corpus's own tags: 人物 (a run of ``nr`` tokens: PKU splits 江/nr 泽民/nr),
  地点 (``ns``), 机构 (``nt``), 时间 (a run of ``t`` tokens). Every sentence gets all four
  prompts; a type the sentence does not have is a negative (an empty ``result_list``);
- relations the sentence itself states by apposition: a 地点 or 机构 token, then a title
  word of ``PREDICATES``, then a person (``美国/ns 总统/n 克林顿/nr``, ``新华社/nt 记者/n
  兰/nr 红光/nr``) gives the record ``prompt = "美国的总统"`` with the person as the answer;
  each one also gives a negative: the same subject with a title of its type that the
  sentence does not contain.

Deterministic: running it twice gives byte-identical files. See data/README.md.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peoples_daily  # noqa: E402
from build_demo_data import SEED, dedup_key  # noqa: E402
from peoples_daily import SENTENCE_END, articles, tagged  # noqa: E402

ENTITY_TYPES = {"nr": "人物", "ns": "地点", "nt": "机构", "t": "时间"}
# Tags whose consecutive tokens form one entity (a surname and a given name; 1月 2日).
RUNS = ("nr", "t")
# Relation predicates: the title words of each subject type seen at least ~10 times between a
# subject and a person in the corpus.
PREDICATES = {"地点": ("总统", "总理", "外长", "首相", "大使"),
              "机构": ("记者", "部长", "总理", "发言人", "主席", "秘书长")}
SENTENCE_CHARS = (8, 256)
# Articles per split; sentences per split: every sentence that states a relation, then a
# seeded sample of the others up to the cap.
ARTICLE_SHARE = {"train": 0.8, "dev": 0.1, "test": 0.1}
SENTENCE_CAP = {"train": 3000, "dev": 300, "test": 300}


def entities(words: list[tuple[str, str]]) -> list[tuple[int, int, str]]:
    """``(first token, end token, type)`` of the tagged entities of a token list."""
    out = []
    i = 0
    while i < len(words):
        tag = words[i][1]
        end = i + 1
        if tag in RUNS:
            while end < len(words) and words[end][1] == tag:
                end += 1
        if tag in ENTITY_TYPES:
            out.append((i, end, ENTITY_TYPES[tag]))
        i = end
    return out


def relations(words, spans) -> list[tuple[tuple, str, tuple]]:
    """``(subject span, predicate, person span)``: a 地点/机构 entity, a title word of its type,
    then a person, adjacent."""
    by_start = {first: (first, end, kind) for first, end, kind in spans}
    out = []
    for first, end, kind in spans:
        if kind not in PREDICATES or end + 1 >= len(words):
            continue
        title, person = words[end], by_start.get(end + 1)
        if title[1] == "n" and title[0] in PREDICATES[kind] and person and person[2] == "人物":
            out.append(((first, end, kind), title[0], person))
    return out


def sentences(line: str):
    """``(text, [(start, end, type)], [(subject, predicate, object)])`` per sentence of a
    segmented line; offsets are characters of the sentence text."""
    words = tagged(line)
    spans = entities(words)
    rels = relations(words, spans)
    offsets = [0]
    for word, _ in words:
        offsets.append(offsets[-1] + len(word))
    text = "".join(word for word, _ in words)
    cuts = [0] + [i + 1 for i, (word, _) in enumerate(words) if word in SENTENCE_END]
    if cuts[-1] != len(words):
        cuts.append(len(words))
    for first, end in zip(cuts, cuts[1:]):
        lo, hi = offsets[first], offsets[end]
        def chars(token_span, lo=lo):
            return offsets[token_span[0]] - lo, offsets[token_span[1]] - lo, token_span[2]

        inside = [chars(s) for s in spans if first <= s[0] and s[1] <= end]
        facts = [(chars(s), p, chars(o)) for s, p, o in rels if first <= s[0] and o[1] <= end]
        yield text[lo:hi], inside, facts


def article_sentences(lines: list[str]) -> list[list[tuple]]:
    """The sentences of each article's body (``sentences``), 8 to 256 characters long."""
    low, high = SENTENCE_CHARS
    return [[s for line in article.body for s in sentences(line) if low <= len(s[0]) <= high]
            for article in articles(lines)]


def span(text: str, start: int, end: int) -> dict:
    return {"text": text[start:end], "start": start, "end": end}


def records(sentence: tuple, rng: random.Random) -> list[dict]:
    """The UIE records of one sentence: the four entity prompts, each stated relation and one
    negative relation prompt per subject."""
    text, spans, facts = sentence
    out = []
    for kind in ENTITY_TYPES.values():
        found = sorted({(s, e) for s, e, k in spans if k == kind})
        out.append({"content": text, "result_list": [span(text, s, e) for s, e in found],
                    "prompt": kind})
    asked: dict[str, set] = {}
    for (s0, s1, kind), predicate, (o0, o1, _) in facts:
        subject = text[s0:s1]
        prompt = f"{subject}的{predicate}"
        match = next((r for r in out if r["prompt"] == prompt), None)
        if match is None:
            match = {"content": text, "result_list": [], "prompt": prompt}
            out.append(match)
        if span(text, o0, o1) not in match["result_list"]:
            match["result_list"].append(span(text, o0, o1))
        asked.setdefault(subject, set()).add(kind)
    for subject, kinds in sorted(asked.items()):
        kind = sorted(kinds)[0]
        absent = [p for p in PREDICATES[kind] if p not in text]
        if absent:
            out.append({"content": text, "result_list": [],
                        "prompt": f"{subject}的{rng.choice(absent)}"})
    return out


def build(src: Path, out: Path) -> dict[str, int]:
    """Write data/uie/{train,dev,test}.jsonl and LICENSE; return the counts."""
    lines = (src / "news" / "199801.txt").read_text(encoding="utf-8").splitlines()
    seen: set[str] = set()
    articles = []
    for article in article_sentences(lines):
        kept = []
        for sentence in article:
            key = dedup_key(sentence[0])
            if key in seen:
                continue  # a repeated sentence (reprints, serials) would leak across splits
            seen.add(key)
            kept.append(sentence)
        if kept:
            articles.append(kept)
    rng = random.Random(SEED)
    rng.shuffle(articles)
    folder = out / "uie"
    folder.mkdir(parents=True, exist_ok=True)
    counts, start = {}, 0
    for name, share in ARTICLE_SHARE.items():
        size = round(share * len(articles))
        part = articles[start : start + size]
        start += size
        pool = [s for a in part for s in a]
        stated = [s for s in pool if s[2]]
        rest = [s for s in pool if not s[2] and s[1]]
        chosen = stated + rng.sample(rest, max(SENTENCE_CAP[name] - len(stated), 0))
        rng.shuffle(chosen)
        rows = [r for s in chosen for r in records(s, rng)]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")
        counts[f"uie/{name}.jsonl"] = len(rows)
        counts[f"uie/{name}.jsonl sentences"] = len(chosen)
        counts[f"uie/{name}.jsonl relations"] = sum(len(s[2]) for s in chosen)
        counts[f"uie/{name}.jsonl articles"] = len(part)
    shutil.copyfile(src / "news" / "LICENSE", folder / "LICENSE")
    return counts


if __name__ == "__main__":
    peoples_daily.main(__doc__, build)
