"""Build data/matching/ (headline <-> first sentence pairs) from the People's Daily corpus.

    python scripts/build_matching_data.py [--src ../shared/datasets] [--out data]

Reads ``news/199801.txt`` (People's Daily, January 1998, PKU word/tag segmented, one
paragraph per line) and writes ``matching/{train,dev,test}.tsv`` as ``query \\t doc \\t label``:
an article's headline with its own first body sentence (label 1) or with another article's
(label 0). Deterministic: running it twice gives byte-identical files. See data/README.md.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_demo_data import REPO, SEED, dedup_key, normalize_space  # noqa: E402

# Articles (not pairs) per split; each article gives one positive and one negative pair.
SPLITS = {"train": 1800, "dev": 300, "test": 300}
HEADLINE_CHARS = (4, 30)
SENTENCE_CHARS = (10, 80)
SENTENCE_END = "。！？"
# A dateline in front of the first sentence: 本报北京１月２日讯 / 新华社北京１月２日电（记者 某某）.
DATELINE = re.compile(r"^(本报|新华社|据新华社)[^，。]{0,24}?(讯|电)(（[^）]{0,30}）)?")


def plain(line: str) -> str:
    """The text of a segmented line: ``word/tag`` tokens and ``[...]nt`` groups unwrapped."""
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        words.append(word.lstrip("["))
    return normalize_space("".join(words).replace("\t", " "))


def is_headline(text: str) -> bool:
    """A short line without sentence punctuation that is not a photo credit or a byline."""
    low, high = HEADLINE_CHARS
    return (low <= len(text) <= high and not any(p in text for p in SENTENCE_END + "，：；")
            and not text.startswith(("（", "(")))


def articles(lines: list[str]) -> list[tuple[str, str]]:
    """``(headline, first sentence)`` of each article: a headline line starts an article (the
    first of consecutive headline lines; subtitles and name lines are skipped), its first line
    holding a sentence end gives the first sentence, the dateline removed."""
    out = []
    headline = None
    for line in lines:
        text = plain(line)
        if not text:
            continue
        if is_headline(text):
            headline = headline or text
            continue
        if headline is None:
            continue
        body = DATELINE.sub("", text).lstrip("　 ：:")
        match = re.search(f"[{SENTENCE_END}]", body)
        if match:
            sentence = body[: match.end()]
            low, high = SENTENCE_CHARS
            if low <= len(sentence) <= high:
                out.append((headline, sentence))
            headline = None
    return out


def build(src: Path, out: Path) -> dict[str, int]:
    """Write data/matching/{train,dev,test}.tsv and LICENSE; return the counts."""
    lines = (src / "news" / "199801.txt").read_text(encoding="utf-8").splitlines()
    seen: set[str] = set()
    unique = []
    for headline, sentence in articles(lines):
        keys = {dedup_key(headline), dedup_key(sentence)}
        if keys & seen:
            continue  # a repeated headline or lead (reprints, serials) would leak across splits
        seen |= keys
        unique.append((headline, sentence))
    need = sum(SPLITS.values())
    if len(unique) < need:
        sys.exit(f"only {len(unique)} usable articles, need {need}")
    rng = random.Random(SEED)
    rng.shuffle(unique)
    folder = out / "matching"
    folder.mkdir(parents=True, exist_ok=True)
    counts, start = {}, 0
    for name, size in SPLITS.items():
        part = unique[start : start + size]
        start += size
        # Negatives pair each headline with another article's sentence of the same split.
        shift = [(i + rng.randrange(1, size)) % size for i in range(size)]
        rows = [(h, s, 1) for h, s in part]
        rows += [(part[i][0], part[j][1], 0) for i, j in enumerate(shift)]
        rng.shuffle(rows)
        text = "".join(f"{h}\t{s}\t{label}\n" for h, s, label in rows)
        (folder / f"{name}.tsv").write_text(text, encoding="utf-8")
        counts[f"matching/{name}.tsv"] = len(rows)
    shutil.copyfile(src / "news" / "LICENSE", folder / "LICENSE")
    return counts


def main(argv: list[str] | None = None) -> None:
    """Parse flags, build the data and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "datasets",
                        help="folder with news/199801.txt (default: ../shared/datasets)")
    parser.add_argument("--out", type=Path, default=REPO / "data", help="output folder")
    args = parser.parse_args(argv)
    if not (args.src / "news" / "199801.txt").is_file():
        sys.exit(f"{args.src}: expected news/199801.txt (set --src)")
    for name, n in build(args.src, args.out).items():
        print(f"{name}\t{n}")


if __name__ == "__main__":
    main()
