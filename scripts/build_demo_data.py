"""Build the demo datasets shipped in data/ from the raw public sources.

    python scripts/build_demo_data.py [--src ../shared/datasets] [--out data]

The build is deterministic (fixed seed, sorted inputs): running it twice gives byte-identical
files. It needs `jieba` (runtime dependency anyway) and `opencc` (build-time only, to convert the
traditional-character Tang poems to simplified). See data/README.md for what it writes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

SEED = 20240501
REPO = Path(__file__).resolve().parent.parent

# Reviews: sizes per class and split (the two classes are balanced), and the length cap.
REVIEW_SPLITS = {"train": 7000, "dev": 500, "test": 500}
REVIEW_MAX_CHARS = 256
REVIEW_MIN_CHARS = 4
REVIEW_LABELS = ("负面", "正面")  # id 0 = negative (neg.txt), id 1 = positive (pos.txt)

# Poetry: how many of the 152 poem/appreciation pairs go to the test split.
PAIRS_TEST = 20
KEYWORDS_TOP_K = 4
KEYWORDS_MIN = 2
# Keyword-themed poems kept (a seeded sample of the ~1550 that qualify, in source order).
KEYWORD_POEMS = 1000
TANG_FILES = ("poet.tang.0.json", "poet.tang.1000.json", "poet.tang.2000.json")

PUNCT = "，。？！；：、"
HAN = re.compile(r"^[\u4e00-\u9fff]+$")


# ------------------------------------------------------------------------------------------
# Small helpers.


def normalize_space(text: str) -> str:
    """Collapse every run of whitespace (tabs, newlines, U+3000 ...) to one ASCII space."""
    return " ".join(text.split())


def dedup_key(text: str) -> str:
    """Key under which two reviews count as the same text: case and punctuation ignored."""
    return re.sub(r"[\W_]+", "", text.lower())


def write_json_lines_array(path: Path, records: list[dict]) -> None:
    """Write a JSON array with one record per line (small diffs, and a line per record)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    body = ",\n".join(lines)
    path.write_text("[\n" + body + "\n]\n" if lines else "[]\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------
# Reviews -> sentiment classification (label_id \t text).


def load_reviews(path: Path) -> dict[str, str]:
    """Normalized, truncated, deduplicated reviews of one file as {dedup key: text}."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        text = normalize_space(line)[:REVIEW_MAX_CHARS].strip()
        if len(text) < REVIEW_MIN_CHARS:
            continue
        key = dedup_key(text)
        if key and key not in out:  # first occurrence wins
            out[key] = text
    return out


def build_reviews(src: Path, out: Path) -> dict[str, int]:
    """Write data/reviews/{train,dev,test}.tsv and labels.txt; return the counts."""
    neg = load_reviews(src / "reviews" / "neg.txt")
    pos = load_reviews(src / "reviews" / "pos.txt")
    ambiguous = neg.keys() & pos.keys()
    rng = random.Random(SEED)
    per_class = sum(REVIEW_SPLITS.values())
    splits: dict[str, list[tuple[int, str]]] = {name: [] for name in REVIEW_SPLITS}
    for label, texts in enumerate((neg, pos)):
        keys = sorted(k for k in texts if k not in ambiguous)
        if len(keys) < per_class:
            sys.exit(f"only {len(keys)} usable reviews for label {label}, need {per_class}")
        rng.shuffle(keys)
        start = 0
        for name, size in REVIEW_SPLITS.items():
            splits[name] += [(label, texts[k]) for k in keys[start : start + size]]
            start += size
    folder = out / "reviews"
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in splits.items():
        rng.shuffle(rows)
        lines = [f"{label}\t{text}\n" for label, text in rows]
        (folder / f"{name}.tsv").write_text("".join(lines), encoding="utf-8")
        counts[f"reviews/{name}.tsv"] = len(rows)
    (folder / "labels.txt").write_text("".join(f"{n}\n" for n in REVIEW_LABELS), encoding="utf-8")
    shutil.copyfile(src / "reviews" / "LICENSE", folder / "LICENSE")  # MIT: keep the notice
    counts["reviews/labels.txt"] = len(REVIEW_LABELS)
    return counts


# ------------------------------------------------------------------------------------------
# Poetry -> LoopCoT pairs and keyword-themed generation examples.


def clean_poem(paragraphs: Iterable[str]) -> str:
    """Join the couplets, drop whitespace and collapse doubled end punctuation ("？。")."""
    text = "".join("".join(paragraphs).split())
    return re.sub(f"([{PUNCT}])[{PUNCT}]+", r"\1", text)


def clauses(poem: str) -> list[str]:
    """The half-lines of a poem: the text between punctuation marks."""
    return [c for c in re.split(f"[{PUNCT}]", poem) if c]


def poem_form(poem: str) -> str:
    """5言绝句 / 7言绝句 / 5言律诗 / 7言律诗 from the half-line count and length, else 其他."""
    parts = clauses(poem)
    lengths = {len(c) for c in parts}
    if len(parts) in (4, 8) and len(lengths) == 1 and lengths <= {5, 7}:
        return f"{len(parts[0])}言" + ("绝句" if len(parts) == 4 else "律诗")
    return "其他"


def keywords(poem: str) -> list[str]:
    """Up to KEYWORDS_TOP_K TF-IDF keywords of the poem (jieba, deterministic)."""
    import jieba.analyse

    return list(jieba.analyse.extract_tags(poem, topK=KEYWORDS_TOP_K))


def poem_keys(poem: str) -> set[str]:
    """Keys that identify a poem across sources: its first and its last couplet, bare."""
    parts = clauses(poem)
    return {"".join(parts[:2]), "".join(parts[-2:])}


def build_pairs(src: Path) -> list[dict]:
    """The 152 poems of shuimotangshi.json that carry an appreciation (`prologue`)."""
    # This file is already in simplified characters: converting it with OpenCC would only
    # replace a few correct rare characters (袷 -> 夹), so it is used as is.
    raw = json.loads((src / "poetry" / "shuimotangshi.json").read_text(encoding="utf-8"))
    pairs = []
    for item in raw:
        appreciation = "".join(item.get("prologue", "").split())
        if not appreciation:
            continue
        poem = clean_poem(item["paragraphs"])
        pairs.append(
            {
                "title": item["title"].strip(),
                "author": item["author"].strip(),
                "poem": poem,
                "appreciation": appreciation,
                "form": poem_form(poem),
                "keywords": keywords(poem),
            }
        )
    return pairs


def build_keyword_poems(src: Path, exclude: set[str]) -> list[dict]:
    """Regular 绝句/律诗 Tang poems (simplified), not in the pairs, with their keywords."""
    import opencc

    t2s = opencc.OpenCC("t2s")
    folder = src / "poetry"
    raw: list[tuple[str, str, list[str]]] = []
    for name in TANG_FILES:
        for item in json.loads((folder / name).read_text(encoding="utf-8")):
            raw.append((item["title"], item["author"], item["paragraphs"]))
    book = json.loads((folder / "tangshisanbaishou.json").read_text(encoding="utf-8"))
    for group in book["content"]:
        for item in group["content"]:
            raw.append((item["subchapter"] or item["chapter"], item["author"], item["paragraphs"]))

    seen = set(exclude)
    out = []
    for title, author, paragraphs in raw:
        poem = t2s.convert(clean_poem(paragraphs))
        form = poem_form(poem)
        # Only clean regular poems: no lacunae (□), editorial brackets or variant notes.
        if form == "其他" or not all(HAN.match(c) for c in clauses(poem)):
            continue
        keys = poem_keys(poem)
        if keys & seen:
            continue
        words = keywords(poem)
        if len(words) < KEYWORDS_MIN:
            continue
        seen |= keys
        out.append(
            {
                "title": t2s.convert(normalize_space(title)),
                "author": t2s.convert(author.strip()),
                "poem": poem,
                "form": form,
                "keywords": words,
            }
        )
    keep = sorted(random.Random(SEED).sample(range(len(out)), min(KEYWORD_POEMS, len(out))))
    return [out[i] for i in keep]


def build_poetry(src: Path, out: Path) -> dict[str, int]:
    """Write data/poetry/{pairs,pairs_train,pairs_test,keyword_poems}.json; return counts."""
    import jieba

    jieba.setLogLevel(60)  # silence the "building prefix dict" chatter
    pairs = build_pairs(src)
    order = list(range(len(pairs)))
    random.Random(SEED).shuffle(order)
    test_ids = set(order[:PAIRS_TEST])
    train = [p for i, p in enumerate(pairs) if i not in test_ids]
    test = [p for i, p in enumerate(pairs) if i in test_ids]
    exclude = set().union(*(poem_keys(p["poem"]) for p in pairs))
    extra = build_keyword_poems(src, exclude)

    folder = out / "poetry"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"pairs": pairs, "pairs_train": train, "pairs_test": test, "keyword_poems": extra}
    for name, records in files.items():
        write_json_lines_array(folder / f"{name}.json", records)
    shutil.copyfile(src / "poetry" / "LICENSE", folder / "LICENSE")  # MIT: keep the notice
    return {f"poetry/{name}.json": len(records) for name, records in files.items()}


def main(argv: list[str] | None = None) -> None:
    """Parse flags, build both datasets and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "datasets",
                        help="folder with reviews/ and poetry/ (default: ../shared/datasets)")
    parser.add_argument("--out", type=Path, default=REPO / "data", help="output folder")
    args = parser.parse_args(argv)
    if not (args.src / "reviews").is_dir() or not (args.src / "poetry").is_dir():
        sys.exit(f"{args.src}: expected reviews/ and poetry/ folders (set --src)")
    counts = build_reviews(args.src, args.out)
    counts.update(build_poetry(args.src, args.out))
    for name, n in counts.items():
        print(f"{name}\t{n}")


if __name__ == "__main__":
    main()
