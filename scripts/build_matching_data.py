"""Build data/matching/ (headline <-> first sentence pairs) and data/simcse/ (sentences) from
the People's Daily corpus.

    python scripts/build_matching_data.py [--src ../shared/datasets] [--out data]

Reads ``news/199801.txt`` (People's Daily, January 1998, PKU word/tag segmented, one
paragraph per line) and writes ``matching/{train,dev,test}.tsv`` as ``query \\t doc \\t label``:
an article's headline with its own first body sentence (label 1) or with another article's
(label 0); and ``simcse/train.txt``, one sentence per line (the headline and first sentences
of each training article, none of them a text of the dev or test pairs) for unsupervised
SimCSE, which is scored on the matching dev and test pairs. Deterministic: running it twice
gives byte-identical files. See data/README.md.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peoples_daily  # noqa: E402
from build_demo_data import SEED, dedup_key  # noqa: E402
from peoples_daily import SENTENCE_END, articles, is_headline, plain, strip_dateline  # noqa: E402

# Articles (not pairs) per split; each article gives one positive and one negative pair.
SPLITS = {"train": 1750, "dev": 300, "test": 300}
SENTENCE_CHARS = (10, 80)
# One sentence: up to a run of sentence ends and the closing quotes or brackets after them.
SENTENCE = re.compile(f"[^{SENTENCE_END}]*[{SENTENCE_END}]+[”’」』）]*")
# SimCSE: sentences per training article, from its first one on, besides its headline.
SIMCSE_SENTENCES = 4


def first_sentences(lines: list[str]) -> list[tuple[str, str]]:
    """``(headline, first sentence)`` of each article: the article's first body line holding a
    sentence end gives the first sentence, the dateline removed. An article that follows one
    without such a line gives no pair: which of the two headline lines heads the sentence is
    not known (a picture's title before an article, a headline before its byline
    ``本报记者王政``), so the pair's label would not be true by construction."""
    out = []
    after_bodyless = False
    for article in articles(lines):
        follows_bodyless, after_bodyless = after_bodyless, True
        for line in article.body:
            body = strip_dateline(plain(line))
            match = re.search(f"[{SENTENCE_END}]", body)
            if match:
                sentence = body[: match.end()]
                low, high = SENTENCE_CHARS
                if low <= len(sentence) <= high and not follows_bodyless:
                    out.append((article.headline, sentence))
                after_bodyless = False
                break
    return out


def simcse_sentences(lines: list[str], train: list[tuple[str, str]],
                     held_out: list[tuple[str, str]]) -> list[str]:
    """SimCSE's training sentences: each training article's headline and the sentences of
    ``SENTENCE_CHARS`` length of its body from its first sentence on (at most
    ``SIMCSE_SENTENCES``, up to the next headline line), each text once (by ``dedup_key``)
    and none whose key is a text of ``held_out`` (the dev and test articles), shuffled."""
    texts = [strip_dateline(plain(line)) for line in lines]
    starts: dict[str, list[int]] = {}  # the first 10 characters of a line -> its indices
    for i, text in enumerate(texts):
        starts.setdefault(text[:10], []).append(i)
    low, high = SENTENCE_CHARS
    seen = {dedup_key(text) for pair in held_out for text in pair}
    out = []
    for headline, first in train:
        i = next(i for i in starts[first[:10]] if texts[i].startswith(first))
        lead: list[str] = []
        while i < len(texts) and len(lead) < SIMCSE_SENTENCES and not is_headline(texts[i]):
            found = (m.strip() for m in SENTENCE.findall(texts[i]))
            lead += [t for t in found if low <= len(t) <= high]
            i += 1
        for text in [headline, *lead[:SIMCSE_SENTENCES]]:
            if dedup_key(text) not in seen:
                seen.add(dedup_key(text))
                out.append(text)
    random.Random(SEED).shuffle(out)
    return out


def build(src: Path, out: Path) -> dict[str, int]:
    """Write data/matching/{train,dev,test}.tsv, data/simcse/train.txt and their LICENSE;
    return the counts."""
    lines = (src / "news" / "199801.txt").read_text(encoding="utf-8").splitlines()
    seen: set[str] = set()
    unique = []
    for headline, sentence in first_sentences(lines):
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

    train, held_out = unique[: SPLITS["train"]], unique[SPLITS["train"] : need]
    sentences = simcse_sentences(lines, train, held_out)
    folder = out / "simcse"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("".join(t + "\n" for t in sentences), encoding="utf-8")
    shutil.copyfile(src / "news" / "LICENSE", folder / "LICENSE")
    counts["simcse/train.txt"] = len(sentences)
    return counts


if __name__ == "__main__":
    peoples_daily.main(__doc__, build)
