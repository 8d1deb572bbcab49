"""Read the People's Daily corpus of January 1998 (``news/199801.txt``) into articles.

The file holds one paragraph per line, words segmented and tagged PKU-style (``迈向/v  充满/v``,
two spaces apart; ``nr`` person, ``ns`` place, ``nt`` organisation, ``t`` time, ``w``
punctuation). It has no article ids, so an article is found by its headline: a short line
without sentence punctuation (``is_headline``). The first of consecutive headline lines is the
article's headline (subtitles, bylines and name lines follow it); the lines up to the next
headline are its body. ``build_matching_data.py``, ``build_seq2seq_data.py`` and
``build_uie_data.py`` read the corpus through this module.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from build_demo_data import REPO, normalize_space

SENTENCE_END = "。！？"
# Length range of a headline, in characters.
HEADLINE_CHARS = (4, 30)
# A dateline in front of the first sentence: 本报北京１月２日讯 / 新华社北京１月２日电（记者 某某）.
DATELINE = re.compile(r"^(本报|新华社|据新华社)[^，。]{0,24}?(讯|电)(（[^）]{0,30}）)?")


def tagged(line: str) -> list[tuple[str, str]]:
    """The ``(word, tag)`` pairs of a segmented line; ``[...]nt`` groups are unwrapped (their
    words keep their own tags) and a token without a tag gets the tag ``""``."""
    pairs = []
    for token in line.split():
        word, _, tag = token.rpartition("/") if "/" in token else (token, "", "")
        pairs.append((word.lstrip("["), tag.split("]")[0]))
    return pairs


def plain(line: str) -> str:
    """The text of a segmented line: tags dropped, words joined, whitespace normalised."""
    return normalize_space("".join(word for word, _ in tagged(line)).replace("\t", " "))


def is_headline(text: str) -> bool:
    """A short line without sentence punctuation that is not a photo credit or a byline."""
    low, high = HEADLINE_CHARS
    return (low <= len(text) <= high and not any(p in text for p in SENTENCE_END + "，：；")
            and not text.startswith(("（", "(")))


def strip_dateline(text: str) -> str:
    """``text`` without a leading dateline (``本报北京１月２日讯``, ``新华社…电（记者…）``)."""
    return DATELINE.sub("", text).lstrip("　 ：:")


@dataclass
class Article:
    """An article: its headline and the segmented lines of its body, in file order."""

    headline: str
    body: list[str] = field(default_factory=list)


def articles(lines: list[str]) -> list[Article]:
    """The articles of the corpus's lines, in file order (blank lines and lines before the first
    headline are skipped)."""
    out: list[Article] = []
    in_headline_run = False
    for line in lines:
        text = plain(line)
        if not text:
            continue
        if is_headline(text):
            if not in_headline_run:
                out.append(Article(text))
            in_headline_run = True
            continue
        in_headline_run = False
        if out:
            out[-1].body.append(line)
    return out


def main(doc: str, build: Callable[[Path, Path], dict[str, int]],
         argv: list[str] | None = None) -> None:
    """The command line of a builder: ``--src`` (the folder with ``news/199801.txt``) and
    ``--out``; ``build(src, out)`` writes the files and returns their counts, printed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "datasets",
                        help="folder with news/199801.txt (default: ../shared/datasets)")
    parser.add_argument("--out", type=Path, default=REPO / "data", help="output folder")
    args = parser.parse_args(argv)
    if not (args.src / "news" / "199801.txt").is_file():
        sys.exit(f"{args.src}: expected news/199801.txt (set --src)")
    for name, n in build(args.src, args.out).items():
        print(f"{name}\t{n}")
