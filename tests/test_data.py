"""Readers, validation messages, step-indexed batching, and the shipped demo datasets."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.data import (
    ArrayDataset,
    json_object_or_none,
    pad_and_stack,
    read_json,
    read_jsonl,
    read_tsv,
)
from lib.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


def _write(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------
# JSONL


def test_read_jsonl_ok_skips_blank_lines_and_keeps_extra_fields(tmp_path):
    path = _write(tmp_path, "x.jsonl", '{"text": "好", "label": 1, "extra": null}\n\n'
                  '{"text": "坏", "label": 0}\n')
    rows = read_jsonl(path, {"text": str, "label": int})
    assert rows == [{"text": "好", "label": 1, "extra": None}, {"text": "坏", "label": 0}]


def test_read_jsonl_bad_json(tmp_path):
    path = _write(tmp_path, "x.jsonl", '{"text": "a"}\n{"text": "b" "c"}\n')
    assert _error(read_jsonl, path, {"text": str}) == (
        f"{path}:2: invalid JSON (Expecting ',' delimiter at column 14)"
    )


def test_read_jsonl_missing_field(tmp_path):
    path = _write(tmp_path, "x.jsonl", '{"text": "a"}\n\n{"label": 1}\n')
    assert _error(read_jsonl, path, {"text": str}) == (
        f'{path}:3: field "text" is missing (expected str)'
    )


def test_read_jsonl_wrong_type_and_not_an_object(tmp_path):
    path = _write(tmp_path, "x.jsonl", '{"text": 5}\n')
    assert _error(read_jsonl, path, {"text": str}) == (
        f'{path}:1: field "text" has type int, expected str'
    )
    # A bool is not an int, an int is a float, a tuple lists alternatives.
    path = _write(tmp_path, "y.jsonl", '{"n": 1.5, "m": 2}\n{"n": true, "m": 2}\n')
    assert _error(read_jsonl, path, {"n": (int, float), "m": float}) == (
        f'{path}:2: field "n" has type bool, expected int or float'
    )
    path = _write(tmp_path, "z.jsonl", "[1, 2]\n")
    assert _error(read_jsonl, path, {}) == f"{path}:1: expected a JSON object, got list"


def test_read_jsonl_bad_utf8(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"t": "a"}\n{"t": "\xff"}\n')
    assert _error(read_jsonl, path, {"t": str}) == f"{path}:2: not valid UTF-8 (invalid start byte)"


def test_missing_file_names_the_config_key(tmp_path):
    path = tmp_path / "none.jsonl"
    assert _error(read_jsonl, path, {}, key="data.train") == (
        f"{path}: data file not found (set --config.data.train=PATH to an existing file)"
    )
    assert _error(read_json, path, {}) == f"{path}: data file not found"
    assert _error(read_tsv, tmp_path, ["a"], key="data.eval") == (
        f"{tmp_path}: is a directory, expected a data file "
        "(set --config.data.eval=PATH to an existing file)"
    )


# ------------------------------------------------------------------------------------------
# JSON arrays


def test_read_json_array_ok_and_record_errors_name_index_and_line(tmp_path):
    good = [{"poem": "一", "n": 1}, {"poem": "二", "n": 2}]
    path = _write(tmp_path, "ok.json", json.dumps(good))
    assert read_json(path, {"poem": str, "n": int}) == good

    text = '[\n  {"poem": "a"},\n  {"poem": "b"},\n  {\n    "title": "c"\n  }\n]\n'
    path = _write(tmp_path, "x.json", text)
    assert _error(read_json, path, {"poem": str}) == (
        f'{path}:4: record [2]: field "poem" is missing (expected str)'
    )
    path = _write(tmp_path, "y.json", '[{"poem": "a"}, {"poem": ["b"]}]')
    assert _error(read_json, path, {"poem": str}) == (
        f'{path}:1: record [1]: field "poem" has type list, expected str'
    )


def test_read_json_bad_json_and_not_an_array(tmp_path):
    path = _write(tmp_path, "x.json", '[\n{"a": 1},\n{"a": 2\n]\n')
    assert _error(read_json, path, {}) == (
        f"{path}:4: invalid JSON (Expecting ',' delimiter at column 1)"
    )
    path = _write(tmp_path, "y.json", '{"a": 1}')
    assert _error(read_json, path, {}) == f"{path}: expected a JSON array of objects, got dict"


# ------------------------------------------------------------------------------------------
# TSV


def test_read_tsv_ok_and_types(tmp_path):
    path = _write(tmp_path, "x.tsv", "1\t很好\n\n0\t不好 看\r\n")
    rows = read_tsv(path, ["label", "text"], {"label": int})
    assert rows == [{"label": 1, "text": "很好"}, {"label": 0, "text": "不好 看"}]


def test_read_tsv_wrong_column_count(tmp_path):
    path = _write(tmp_path, "x.tsv", "1\ta\n0\tb\tc\n")
    assert _error(read_tsv, path, ["label", "text"]) == (
        f"{path}:2: expected 2 tab-separated columns (label, text), got 3"
    )


def test_read_tsv_unparsable_int(tmp_path):
    path = _write(tmp_path, "x.tsv", "1\ta\n\nx1\tb\n")
    assert _error(read_tsv, path, ["label", "text"], {"label": int}) == (
        f"{path}:3: column \"label\" is not a valid int: 'x1'"
    )


def test_predict_lines_as_json_objects_or_plain_text():
    assert json_object_or_none('{"poem": "床前明月光", "n": 2}') == {"poem": "床前明月光", "n": 2}
    assert json_object_or_none('  {"theme": "明月"}') == {"theme": "明月"}
    # Plain text, also when it starts like JSON: it is a prompt, not an error.
    assert json_object_or_none("写一首诗") is None
    assert json_object_or_none("{明月} 写一首诗") is None
    assert json_object_or_none('["a", "b"]') is None
    assert json_object_or_none('{"a": 1} trailing') is None


# ------------------------------------------------------------------------------------------
# pad_and_stack


def test_pad_and_stack_right_and_left():
    ids, mask = pad_and_stack([[5, 6, 7], [8], []], 4, pad_id=9)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 9], [8, 9, 9, 9], [9, 9, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    ids, mask = pad_and_stack([[5, 6, 7], [8]], None, pad_id=0, side="left")
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    with pytest.raises(ValueError, match="sequence 1 has 3 tokens > max_len 2"):
        pad_and_stack([[1], [1, 2, 3]], 2)


# ------------------------------------------------------------------------------------------
# ArrayDataset


def _dataset(n: int = 10) -> ArrayDataset:
    return ArrayDataset({"x": np.arange(n), "y": np.arange(n) * 10})


def test_batch_is_a_pure_function_of_seed_and_step():
    a, b = _dataset(), _dataset()
    # b is asked in another order (as after a resume): the answers must not change.
    later = b.batch(7, 4, seed=3)
    first = b.batch(0, 4, seed=3)
    np.testing.assert_array_equal(a.batch(0, 4, seed=3)["x"], first["x"])
    np.testing.assert_array_equal(a.batch(7, 4, seed=3)["x"], later["x"])
    np.testing.assert_array_equal(first["y"], first["x"] * 10)  # rows stay aligned
    assert not np.array_equal(a.batch(0, 4, seed=3)["x"], a.batch(0, 4, seed=4)["x"])
    # Epoch e's order is exactly default_rng((seed, e)).permutation(n).
    stream = np.concatenate([a.batch(s, 5, seed=3)["x"] for s in range(4)])
    expect = np.concatenate([np.random.default_rng((3, e)).permutation(10) for e in range(2)])
    np.testing.assert_array_equal(stream, expect)


def test_every_example_once_per_epoch_across_straddling_batches():
    ds = _dataset(10)
    assert ds.steps_per_epoch(4) == 3 and ds.epoch(5, 4) == 2.0
    stream = np.concatenate([ds.batch(s, 4, seed=0)["x"] for s in range(15)])  # 6 epochs
    for e in range(6):
        assert sorted(stream[10 * e : 10 * (e + 1)]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # a fresh order each epoch
    # Unshuffled, the stream is 0..n-1 repeated.
    np.testing.assert_array_equal(ds.batch(2, 4, seed=0, shuffle=False)["x"], [8, 9, 0, 1])
    # A batch larger than the dataset spans several epochs and still covers each one.
    big = ds.batch(0, 25, seed=1)["x"]
    assert sorted(big[:10]) == list(range(10)) and sorted(big[10:20]) == list(range(10))


def test_eval_batches_pad_the_last_batch_with_a_valid_mask():
    ds = _dataset(10)
    batches = list(ds.eval_batches(4))
    assert len(batches) == ds.num_eval_batches(4) == 3
    assert all(b["x"].shape == (4,) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]),
                                  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9])
    np.testing.assert_array_equal(batches[2]["_valid"], [True, True, False, False])
    assert batches[0]["_valid"].dtype == bool and batches[0]["_valid"].all()


def test_map_eval_keeps_one_output_row_per_example():
    ds = _dataset(10)
    sizes = []

    def fn(batch):
        sizes.append(len(batch["x"]))
        assert "_valid" not in batch
        return batch["x"] * 10, np.stack([batch["x"], -batch["x"]], axis=1)

    tens, pairs = ds.map_eval(fn, 4)
    assert sizes == [4, 4, 4]  # fixed shapes: the last batch is padded, its padding dropped
    np.testing.assert_array_equal(tens, np.arange(10) * 10)
    np.testing.assert_array_equal(pairs, np.stack([np.arange(10), -np.arange(10)], axis=1))
    np.testing.assert_array_equal(ds.map_eval(lambda b: b["x"] + 1, 3), np.arange(1, 11))


def test_array_dataset_rejects_bad_input():
    with pytest.raises(ValueError, match="arrays differ in length"):
        ArrayDataset({"a": np.zeros(3), "b": np.zeros(4)})
    with pytest.raises(UserError, match="train: the dataset is empty"):
        ArrayDataset({"a": np.zeros((0, 5))}, name="train")
    with pytest.raises(UserError, match="seed must be >= 0"):
        _dataset().batch(0, 2, seed=-1)


# ------------------------------------------------------------------------------------------
# The demo datasets shipped in data/


def _readme_counts() -> dict[str, int]:
    """`| reviews/train.tsv | 14000 | ...` rows of data/README.md's count table."""
    text = (DATA / "README.md").read_text(encoding="utf-8")
    return {m[1]: int(m[2]) for m in re.finditer(r"^\| `([\w/]+\.\w+)` \| (\d+) \|", text, re.M)}


def test_shipped_reviews_are_disjoint_balanced_and_counted():
    counts = _readme_counts()
    labels = (DATA / "reviews" / "labels.txt").read_text(encoding="utf-8").split()
    assert labels == ["负面", "正面"] and counts["reviews/labels.txt"] == 2
    seen: dict[str, str] = {}
    for split in ("train", "dev", "test"):
        rows = read_tsv(DATA / "reviews" / f"{split}.tsv", ["label", "text"], {"label": int})
        assert len(rows) == counts[f"reviews/{split}.tsv"]
        per_label = np.bincount([r["label"] for r in rows], minlength=len(labels))
        assert len(per_label) == len(labels) and per_label[0] == per_label[1]
        for r in rows:
            assert 4 <= len(r["text"]) <= 256 and r["text"] == r["text"].strip()
            assert r["text"] not in seen, f"{r['text']!r} in {seen.get(r['text'])} and {split}"
            seen[r["text"]] = split
    assert counts["reviews/train.tsv"] == 14000


def test_shipped_poetry_files_load_and_split_cleanly():
    counts = _readme_counts()
    pair_fields = {"title": str, "author": str, "poem": str, "appreciation": str, "form": str,
                   "keywords": list}
    pairs = read_json(DATA / "poetry" / "pairs.json", pair_fields)
    train = read_json(DATA / "poetry" / "pairs_train.json", pair_fields)
    test = read_json(DATA / "poetry" / "pairs_test.json", pair_fields)
    extra = read_json(DATA / "poetry" / "keyword_poems.json",
                      {k: v for k, v in pair_fields.items() if k != "appreciation"})
    for name, records in [("pairs", pairs), ("pairs_train", train), ("pairs_test", test),
                          ("keyword_poems", extra)]:
        assert len(records) == counts[f"poetry/{name}.json"]
    assert (len(pairs), len(train), len(test)) == (152, 132, 20)
    assert sorted(p["poem"] for p in train + test) == sorted(p["poem"] for p in pairs)
    assert not {p["poem"] for p in extra} & {p["poem"] for p in pairs}
    forms = {"5言绝句", "7言绝句", "5言律诗", "7言律诗"}
    assert all(p["form"] in forms | {"其他"} for p in pairs)
    assert all(p["form"] in forms and 2 <= len(p["keywords"]) <= 4 for p in extra)
    # The form label matches the shape: 4 or 8 half-lines of 5 or 7 characters.
    for p in pairs + extra:
        parts = [c for c in re.split("[，。？！；：、]", p["poem"]) if c]
        if p["form"] != "其他":
            n_chars, kind = int(p["form"][0]), p["form"][2:]
            assert len(parts) == {"绝句": 4, "律诗": 8}[kind]
            assert {len(c) for c in parts} == {n_chars}


def test_build_script_reproduces_the_shipped_files(tmp_path):
    """Rebuilding from the raw sources gives byte-identical files (needs the sources + OpenCC)."""
    import importlib.util

    src = REPO.parent / "shared" / "datasets"
    if not (src / "reviews").is_dir() or importlib.util.find_spec("opencc") is None:
        pytest.skip("raw sources or the build-time dependency opencc are not available")
    spec = importlib.util.spec_from_file_location("build_demo_data",
                                                  REPO / "scripts" / "build_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--src", str(src), "--out", str(tmp_path)])
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(DATA) for d in ("reviews", "poetry")
                     for p in (DATA / d).rglob("*") if p.is_file())
    assert built == shipped
    for rel in built:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel


def test_shipped_seq2seq_data_is_counted_and_true_by_construction():
    counts = _readme_counts()
    questions = {"文中提到的时间是什么？", "文中提到的人物是谁？", "文中提到的地点是哪里？",
                 "文中提到的机构是哪个？"}
    fields = {"summarization": {"id": int, "text": str, "summary": str},
              "t5_qa": {"context": str, "answer": str, "question": str, "id": int},
              "t5_filling": {"id": int, "text": str, "masked": str, "target": str}}
    key = {"summarization": "text", "t5_qa": "context", "t5_filling": "text"}
    for name, types in fields.items():
        seen: dict[str, str] = {}
        for split in ("train", "dev", "test"):
            rows = read_jsonl(DATA / name / f"{split}.jsonl", types)
            assert len(rows) == counts[f"{name}/{split}.jsonl"]
            assert [r["id"] for r in rows] == list(range(len(rows)))
            for r in rows:
                assert r[key[name]] not in seen, f"{name}: {r[key[name]]!r} in {split} and " \
                                                 f"{seen.get(r[key[name]])}"
                seen[r[key[name]]] = split
                if name == "summarization":
                    assert 40 <= len(r["text"]) <= 256 and 4 <= len(r["summary"]) <= 30
                elif name == "t5_qa":
                    assert r["answer"] in r["context"] and r["question"] in questions
                else:
                    assert r["masked"].count("[MASK]") == 1 and r["target"]
                    assert r["masked"].replace("[MASK]", r["target"]) == r["text"]
        licence = (DATA / "matching" / "LICENSE").read_bytes()
        assert (DATA / name / "LICENSE").read_bytes() == licence
    assert (counts["summarization/dev.jsonl"], counts["t5_qa/train.jsonl"]) == (200, 3000)


def test_news_build_scripts_reproduce_the_shipped_files(tmp_path, monkeypatch):
    """Rebuilding data/matching and the seq2seq data from the People's Daily corpus gives
    byte-identical files (needs the raw source)."""
    import importlib.util

    src = REPO.parent / "shared" / "datasets"
    if not (src / "news" / "199801.txt").is_file():
        pytest.skip("the raw People's Daily corpus is not available")
    for script, folders in (("build_matching_data", ("matching", "simcse")),
                            ("build_seq2seq_data", ("summarization", "t5_qa", "t5_filling"))):
        spec = importlib.util.spec_from_file_location(script, REPO / "scripts" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, script, module)  # dataclasses look the module up
        spec.loader.exec_module(module)
        module.build(src, tmp_path)
        for folder in folders:
            shipped = sorted(p.name for p in (DATA / folder).iterdir())
            assert sorted(p.name for p in (tmp_path / folder).iterdir()) == shipped
            for name in shipped:
                assert (tmp_path / folder / name).read_bytes() == (
                    DATA / folder / name).read_bytes(), f"{folder}/{name}"


def test_shipped_simcse_sentences_are_counted_and_not_in_the_pairs_it_is_scored_on():
    counts = _readme_counts()
    sentences = (DATA / "simcse" / "train.txt").read_text(encoding="utf-8").splitlines()
    assert len(sentences) == counts["simcse/train.txt"] == 8089
    key = lambda text: re.sub(r"[\W_]+", "", text.lower())  # noqa: E731 - build_demo_data's
    assert len({key(t) for t in sentences}) == len(sentences)
    assert all(4 <= len(t) <= 80 and "\t" not in t for t in sentences)
    held_out = {key(r[c]) for split in ("dev", "test") for r in read_tsv(
        DATA / "matching" / f"{split}.tsv", ["query", "doc", "label"]) for c in ("query", "doc")}
    assert not held_out & {key(t) for t in sentences}
    train_texts = {key(r[c]) for r in read_tsv(DATA / "matching" / "train.tsv",
                                               ["query", "doc", "label"]) for c in ("query", "doc")}
    assert len(train_texts & {key(t) for t in sentences}) > 3000  # the train articles' texts


def test_shipped_pet_data_is_counted_balanced_and_rebuilt(tmp_path):
    """data/pet: the README's counts, balanced label words, reviews of their own reviews/
    split (so no text in two splits), and the script rebuilds it byte for byte."""
    import importlib.util

    counts = _readme_counts()
    labels = (DATA / "pet" / "labels.txt").read_text(encoding="utf-8").split()
    assert labels == ["正面", "负面"] and counts["pet/labels.txt"] == 2
    source = {split: {r["text"] for r in read_tsv(DATA / "reviews" / f"{split}.tsv",
                                                  ["label", "text"])}
              for split in ("train", "dev", "test")}
    for split, per_class in (("train", 32), ("dev", 300), ("test", 300)):
        rows = read_tsv(DATA / "pet" / f"{split}.tsv", ["label", "text"])
        assert len(rows) == counts[f"pet/{split}.tsv"] == 2 * per_class
        assert [sum(r["label"] == w for r in rows) for w in labels] == [per_class] * 2
        assert all(8 <= len(r["text"]) <= 100 and r["text"] in source[split] for r in rows)
    spec = importlib.util.spec_from_file_location("build_pet_data",
                                                  REPO / "scripts" / "build_pet_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(DATA / "reviews", tmp_path)
    for name in ("train.tsv", "dev.tsv", "test.tsv", "labels.txt"):
        assert (tmp_path / name).read_bytes() == (DATA / "pet" / name).read_bytes(), name


def test_shipped_uie_records_are_counted_true_and_rebuilt(tmp_path, monkeypatch):
    """data/uie: the README's counts, spans that are their content's characters, no sentence in
    two splits, and (with the raw corpus) a byte-identical rebuild."""
    import importlib.util

    counts = _readme_counts()
    fields = {"content": str, "result_list": list, "prompt": str}
    seen: dict[str, str] = {}
    for split in ("train", "dev", "test"):
        rows = read_jsonl(DATA / "uie" / f"{split}.jsonl", fields)
        assert len(rows) == counts[f"uie/{split}.jsonl"]
        contents = {r["content"] for r in rows}
        assert len(contents) == {"train": 3000, "dev": 300, "test": 300}[split]
        for content in contents:
            assert content not in seen, f"{content!r} in {seen.get(content)} and {split}"
            seen[content] = split
        for r in rows:
            for s in r["result_list"]:
                assert r["content"][s["start"]:s["end"]] == s["text"]
            if r["prompt"] not in ("人物", "地点", "机构", "时间"):
                subject, predicate = r["prompt"].split("的", 1)
                assert len(r["result_list"]) <= 1
                if r["result_list"]:  # stated by apposition: subject title person
                    assert subject + predicate + r["result_list"][0]["text"] in r["content"]
    src = REPO.parent / "shared" / "datasets"
    if not (src / "news" / "199801.txt").is_file():
        pytest.skip("the raw People's Daily corpus is not available")
    spec = importlib.util.spec_from_file_location("build_uie_data",
                                                  REPO / "scripts" / "build_uie_data.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_uie_data", module)
    spec.loader.exec_module(module)
    module.build(src, tmp_path)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "LICENSE"):
        assert (tmp_path / "uie" / name).read_bytes() == (DATA / "uie" / name).read_bytes(), name
