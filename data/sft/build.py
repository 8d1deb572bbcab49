"""Build the SFT demo set (alpaca records) from the shipped poetry data; see README.md.

Run from the repository root: ``python data/sft/build.py``. The output is a function of
``data/poetry/*.json`` alone (no randomness), so it is byte-identical on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POETRY = ROOT / "data" / "poetry"
OUT = ROOT / "data" / "sft"
FORM_NAMES = {
    "5言绝句": "五言绝句", "7言绝句": "七言绝句", "5言律诗": "五言律诗", "7言律诗": "七言律诗",
}


def first_sentence(text: str) -> str:
    """Text up to and including the first "。" (all of it if there is none)."""
    end = text.find("。")
    return text if end < 0 else text[: end + 1]


def records(poems: list[dict], pairs: list[dict], counts: tuple[int, ...]) -> list[dict]:
    """Alpaca records of six instruction kinds, in blocks: ``counts[i]`` consecutive poems for
    kind i (write from keywords, write from a title with an empty input, author, title, form);
    every pair gives a one-sentence summary of its appreciation."""
    bounds = [0]
    for n in counts:
        bounds.append(bounds[-1] + n)
    block = [poems[a:b] for a, b in zip(bounds, bounds[1:])]
    out = []
    for r in block[0]:
        out.append({"instruction": f"根据关键词写一首{FORM_NAMES[r['form']]}",
                    "input": "，".join(r["keywords"]), "output": r["poem"]})
    for r in block[1]:
        out.append({"instruction": f"写一首{FORM_NAMES[r['form']]}，题目是《{r['title']}》",
                    "input": "", "output": r["poem"]})
    for r in block[2]:
        out.append({"instruction": "这首诗的作者是谁？", "input": r["poem"], "output": r["author"]})
    for r in block[3]:
        out.append({"instruction": "为这首诗拟一个标题。", "input": r["poem"],
                    "output": r["title"]})
    for r in block[4]:
        out.append({"instruction": "这首诗是什么体裁？", "input": r["poem"],
                    "output": FORM_NAMES[r["form"]]})
    for r in pairs:
        out.append({"instruction": "用一句话概括这首诗。", "input": r["poem"],
                    "output": first_sentence(r["appreciation"])})
    return out


def write(path: Path, rows: list[dict]) -> None:
    """A JSON array with one record per line."""
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text("[\n" + body + "\n]\n", encoding="utf-8")


def main() -> None:
    poems = json.loads((POETRY / "keyword_poems.json").read_text(encoding="utf-8"))
    train_pairs = json.loads((POETRY / "pairs_train.json").read_text(encoding="utf-8"))
    test_pairs = json.loads((POETRY / "pairs_test.json").read_text(encoding="utf-8"))
    train = records(poems[:160], train_pairs[:40], (40, 15, 35, 35, 35))
    # Eval: the same kinds on held-out poems and the test pairs.
    evals = records(poems[900:], test_pairs[:3], (4, 2, 4, 4, 3))
    write(OUT / "train.json", train)
    write(OUT / "eval.json", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval records to {OUT}")


if __name__ == "__main__":
    main()
