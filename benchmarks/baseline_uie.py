"""A gazetteer baseline for the UIE demo's entity prompts.

    .venv/bin/python benchmarks/baseline_uie.py

The gazetteer of each entity type is the set of answer strings of that prompt in the training
records; in a dev / test text the longest gazetteer entry matching at each position is taken
(left to right, without overlaps). Relation prompts (``{subject}的{predicate}``) get the
person right after ``{subject}{predicate}`` in the text when the gazetteer knows it (the
demo data's pattern, spelled out). Prints span exact-match micro P/R/F1 overall, per entity
type and for the relation prompts, the same numbers ``python main.py
--config=configs/uie.py`` reports, and the wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import uie as uie_config  # noqa: E402
from tasks.uie import read_records, span_scores  # noqa: E402


def longest_matches(text: str, names: set[str], longest: int) -> set[tuple[int, int]]:
    """``(start, end)`` of the longest ``names`` entry at each position, left to right."""
    out, i = set(), 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            if text[i : i + n] in names:
                out.add((i, i + n))
                i += n
                break
        else:
            i += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/uie", help="directory with train/dev/test.jsonl")
    args = parser.parse_args()
    start = time.perf_counter()
    entities = tuple(uie_config.get_config().schema.entities)
    train = read_records(str(Path(args.data) / "train.jsonl"), "data.train")
    gazetteer: dict[str, set[str]] = {t: set() for t in entities}
    for r in train:
        if r["prompt"] in gazetteer:
            gazetteer[r["prompt"]].update(s["text"] for s in r["result_list"])
    people = gazetteer.get("人物", set())
    longest = {t: max(map(len, names), default=0) for t, names in gazetteer.items()}
    print("gazetteer sizes: " + ", ".join(f"{t} {len(v)}" for t, v in gazetteer.items()))
    for split in ("dev", "test"):
        records = read_records(str(Path(args.data) / f"{split}.jsonl"), "data.eval")
        pred = []
        for r in records:
            text, prompt = r["content"], r["prompt"]
            if prompt in gazetteer:
                pred.append(longest_matches(text, gazetteer[prompt], longest[prompt]))
                continue
            cue = prompt.replace("的", "", 1)
            at = text.find(cue)
            after = longest_matches(text[at + len(cue):], people, longest.get("人物", 0))
            first = min(after, default=None)
            pred.append({(at + len(cue) + first[0], at + len(cue) + first[1])}
                        if at >= 0 and first and first[0] == 0 else set())
        gold = [{(s["start"], s["end"]) for s in r["result_list"]} for r in records]
        scores = span_scores(pred, gold, [r["prompt"] for r in records], entities)
        print(f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
