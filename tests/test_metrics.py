"""lib.metrics against sklearn/scipy (classification, Spearman), against rouge_chinese/nltk used
directly (ROUGE, BLEU), and against hand-computed values (EM/F1, spans, rankings)."""

import os
import subprocess
import sys
from pathlib import Path

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from rouge_chinese import Rouge
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from lib import metrics
from lib.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# 5 classes; class 3 is never predicted, class 4 is predicted but never true.
Y5_TRUE = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 2, 3, 0, 0, 1]
Y5_PRED = [0, 2, 2, 0, 0, 1, 1, 1, 4, 1, 2, 4, 2, 0, 1, 1]
YB_TRUE = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0]
YB_PRED = [1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0]
YS_TRUE = ["好评", "差评", "中评", "好评", "好评", "差评", "中评"]
YS_PRED = ["好评", "好评", "中评", "差评", "好评", "差评", "好评"]

CASES = [
    # (y_true, y_pred, kwargs)
    *[(Y5_TRUE, Y5_PRED, {"average": a}) for a in ("macro", "weighted", "micro", None)],
    *[(Y5_TRUE, Y5_PRED, {"average": a, "labels": [4, 3, 2, 1, 0, 7]})
      for a in ("macro", "weighted", "micro", None)],
    (Y5_TRUE, Y5_PRED, {"average": "micro", "labels": [1, 2]}),
    # Every weight is 0: sklearn falls back to a plain mean.
    (Y5_TRUE, Y5_PRED, {"average": "weighted", "labels": [4, 7]}),
    *[(YB_TRUE, YB_PRED, {"average": a}) for a in ("binary", "macro", "weighted", "micro", None)],
    (YB_TRUE, YB_PRED, {"average": "binary", "pos_label": 0}),
    # Only one label present: binary scores pos_label (absent) as 0.
    ([0, 0, 0], [0, 0, 0], {"average": "binary"}),
    (YS_TRUE, YS_PRED, {"average": "macro"}),
    (YS_TRUE, YS_PRED, {"average": "weighted"}),
    (YS_TRUE, YS_PRED, {"average": None}),
]


@pytest.mark.parametrize("y_true,y_pred,kwargs", CASES)
def test_precision_recall_f1_matches_sklearn(y_true, y_pred, kwargs):
    ours = metrics.precision_recall_f1(y_true, y_pred, **kwargs)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0, **kwargs)
    if kwargs["average"] is None:
        expected_labels = kwargs.get("labels", sorted(set(y_true) | set(y_pred)))
        assert ours["labels"] == list(expected_labels)
        np.testing.assert_array_equal(ours["support"], support)
        for key, ref in (("precision", p), ("recall", r), ("f1", f)):
            np.testing.assert_allclose(ours[key], ref, rtol=0, atol=1e-12)
    else:
        for key, ref in (("precision", p), ("recall", r), ("f1", f)):
            assert abs(ours[key] - ref) <= 1e-12, (key, ours[key], ref)


def test_hand_checked_binary_and_accuracy():
    # YB: tp=4 (positions 0,3,6,8), fp=2 (4,7), fn=2 (2,9) -> P = R = F1 = 4/6.
    scores = metrics.precision_recall_f1(YB_TRUE, YB_PRED, average="binary")
    assert scores == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                    "support": 6}, abs=1e-15)
    assert metrics.accuracy(YB_TRUE, YB_PRED) == pytest.approx(7 / 11, abs=1e-15)
    assert metrics.accuracy(Y5_TRUE, Y5_PRED) == accuracy_score(Y5_TRUE, Y5_PRED)
    assert metrics.accuracy(YS_TRUE, YS_PRED) == accuracy_score(YS_TRUE, YS_PRED)
    assert metrics.accuracy([], []) == 0.0


def test_precision_recall_f1_errors():
    with pytest.raises(UserError, match="average='binary'"):
        metrics.precision_recall_f1(Y5_TRUE, Y5_PRED, average="binary")
    with pytest.raises(UserError, match="pos_label=2"):
        metrics.precision_recall_f1(YB_TRUE, YB_PRED, average="binary", pos_label=2)
    with pytest.raises(UserError, match="unknown average"):
        metrics.precision_recall_f1(YB_TRUE, YB_PRED, average="samples")
    with pytest.raises(UserError, match="same length"):
        metrics.accuracy([0, 1], [0])


def test_classification_report_matches_sklearn():
    names = ["体育", "财经", "房产", "家居", "教育"]
    report = metrics.classification_report(Y5_TRUE, Y5_PRED, names)
    labels = list(range(5))
    assert report["accuracy"] == accuracy_score(Y5_TRUE, Y5_PRED)
    for average in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(
            Y5_TRUE, Y5_PRED, labels=labels, average=average, zero_division=0
        )
        assert abs(report[f"{average}_precision"] - p) <= 1e-12
        assert abs(report[f"{average}_recall"] - r) <= 1e-12
        assert abs(report[f"{average}_f1"] - f) <= 1e-12
    p, r, f, s = precision_recall_fscore_support(
        Y5_TRUE, Y5_PRED, labels=labels, average=None, zero_division=0
    )
    assert list(report["per_class"]) == names
    for i, name in enumerate(names):
        row = report["per_class"][name]
        assert row == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}, abs=1e-12
        )
    # 家居 (3) is never predicted; 教育 (4) is predicted twice but never true.
    assert report["per_class"]["家居"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                           "support": 3}
    assert report["per_class"]["教育"]["support"] == 0

    sentiments = {n: n for n in ("好评", "中评", "差评")}
    by_name = metrics.classification_report(YS_TRUE, YS_PRED, sentiments)
    assert list(by_name["per_class"]) == ["好评", "中评", "差评"]
    assert by_name["per_class"]["好评"]["recall"] == pytest.approx(2 / 3, abs=1e-15)
    with pytest.raises(UserError, match=r"\['4'\]"):
        metrics.classification_report(Y5_TRUE, Y5_PRED, names[:4])


@pytest.mark.parametrize(
    "x,y",
    [
        ([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]),
        ([1, 2, 2, 3, 3, 3, 4], [0.5, 0.1, 0.1, 0.9, 0.7, 0.7, 1.0]),  # ties on both sides
        ([0.3, -1.2, 5.0, 5.0, 2.2, 0.3, 0.3, 7.1], [1, 0, 1, 1, 0, 0, 1, 1]),
        ([1, 2, 3, 4], [4, 3, 2, 1]),
    ],
)
def test_spearman_matches_scipy(x, y):
    assert abs(metrics.spearman(x, y) - spearmanr(x, y).statistic) <= 1e-12


def test_spearman_hand_values_and_undefined():
    assert metrics.spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert metrics.spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert np.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))
    assert np.isnan(metrics.spearman([1.0], [2.0]))


# Lines of Tang poems and appreciation sentences: references, then model-like outputs.
REFS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "这首诗写远客思乡之情，语言清新朴素，韵味含蓄无穷。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "诗人借登楼远眺，表达了积极向上的进取精神。",
    "处处闻啼鸟",
    "此诗描绘了春天早晨的景色，抒发了诗人爱春惜春之情。",
]
HYPS = [
    "床前明月光，疑是地上霜。举头望山月，低头思故乡。",
    "此诗抒发了游子思念故乡的感情，语言朴素自然。",
    "白日依山尽，黄河入海流。",
    "诗人 登高远望，表达了 向上的精神？真是好诗！",
    "春眠不觉晓",
    "",
]


def _reference_rouge(hyp: str, ref: str) -> dict:
    return Rouge().get_scores(" ".join(jieba.cut(hyp)), " ".join(jieba.cut(ref)))[0]


def test_rouge_zh_matches_rouge_chinese():
    ours = metrics.rouge_zh(HYPS, REFS)
    expected = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for hyp, ref in zip(HYPS[:-1], REFS[:-1]):  # the last hypothesis is empty: scores 0
        scores = _reference_rouge(hyp, ref)
        for key in expected:
            expected[key] += 100 * scores[key]["f"] / len(HYPS)
    for key in expected:
        assert abs(ours[key] - expected[key]) <= 1e-9, key
    # The numbers are non-trivial: a near-copy of 静夜思 scores high, unrelated text low.
    assert 10 < ours["rouge-1"] < 90


def test_rouge_zh_hand_values():
    same = metrics.rouge_zh([REFS[0]], [REFS[0]])
    # rouge_chinese adds 1e-8 to the F denominator, so identical text gives 100·(1 - 5e-9).
    assert same == pytest.approx({"rouge-1": 100, "rouge-2": 100, "rouge-l": 100}, abs=1e-5)
    assert metrics.rouge_zh(["春眠不觉晓"], ["处处闻啼鸟"]) == {
        "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0
    }
    # An empty (or blank) hypothesis scores 0 but still counts in the mean.
    half = metrics.rouge_zh([REFS[0], "  "], [REFS[0], REFS[1]])
    assert half["rouge-1"] == pytest.approx(50, abs=1e-5)
    assert metrics.rouge_zh([], []) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    with pytest.raises(UserError, match="one reference per hypothesis"):
        metrics.rouge_zh(["a"], [])


def test_rouge_zh_keeps_jieba_quiet():
    # jieba prints "Building prefix dict ..." to stderr on first use unless silenced; only a
    # fresh interpreter shows whether it would.
    code = "from lib.metrics import rouge_zh; print(rouge_zh(['明月光'], ['明月光'])['rouge-1'])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)
    assert out.stderr == ""
    assert float(out.stdout) == pytest.approx(100, abs=1e-5)


def test_bleu4_chars_matches_nltk():
    smoothing = SmoothingFunction().method3
    expected = sum(
        100 * sentence_bleu([list(r)], list(h), weights=(0.25,) * 4, smoothing_function=smoothing)
        for h, r in zip(HYPS[:-1], REFS[:-1])
    ) / len(HYPS)
    ours = metrics.bleu4_chars(HYPS, REFS)
    assert abs(ours - expected) <= 1e-9
    assert 10 < ours < 90
    assert metrics.bleu4_chars([REFS[2]], [REFS[2]]) == 100.0
    assert metrics.bleu4_chars(["春眠不觉晓"], ["处处闻啼鸟"]) == 0.0
    assert metrics.bleu4_chars(["", REFS[1]], [REFS[0], REFS[1]]) == 50.0
    assert metrics.bleu4_chars([], []) == 0.0


def test_corpus_bleu_n_matches_nltk():
    ours = metrics.corpus_bleu_n(HYPS, REFS)
    refs = [[list(r)] for r in REFS]
    hyps = [list(h) for h in HYPS]
    assert list(ours) == ["bleu-1", "bleu-2", "bleu-3", "bleu-4"]
    for n in range(1, 5):
        expected = 100 * corpus_bleu(refs, hyps, weights=(1 / n,) * n)
        assert abs(ours[f"bleu-{n}"] - expected) <= 1e-9, n
    assert ours["bleu-1"] > ours["bleu-4"] > 0

    # Several references per hypothesis, word tokens, n_max 2.
    multi_refs = [["the cat sat on the mat", "a cat is on the mat"], "there is a dog"]
    multi_hyps = ["the cat is on the mat", "a dog is there"]
    ours = metrics.corpus_bleu_n(multi_hyps, multi_refs, n_max=2, tokenize=str.split)
    refs = [[r.split() for r in multi_refs[0]], [multi_refs[1].split()]]
    hyps = [h.split() for h in multi_hyps]
    for n in (1, 2):
        expected = 100 * corpus_bleu(refs, hyps, weights=(1 / n,) * n)
        assert abs(ours[f"bleu-{n}"] - expected) <= 1e-9, n

    same = metrics.corpus_bleu_n(REFS, REFS)
    assert same == pytest.approx(dict.fromkeys(same, 100.0), abs=1e-9)
    assert metrics.corpus_bleu_n(["春眠不觉晓"], ["处处闻啼鸟"]) == dict.fromkeys(same, 0.0)


@pytest.mark.parametrize(
    "prediction,golds,em,f1",
    [
        ("北京。", ["北京"], 1.0, 1.0),
        ("“北京”", "北 京", 1.0, 1.0),  # Chinese quotes and spaces are normalized away
        ("Hello, World!", ["hello world"], 1.0, 1.0),
        ("在北京市", ["北京"], 0.0, 2 / 3),  # P = 2/4, R = 2/2
        ("哈哈哈", ["哈"], 0.0, 0.5),  # characters count as a multiset: P = 1/3, R = 1
        ("上海", ["北京", "上海市"], 0.0, 0.8),  # best gold: P = 1, R = 2/3
        ("上海", ["北京", "上海"], 1.0, 1.0),
        ("", ["北京"], 0.0, 0.0),
        ("。", [""], 1.0, 1.0),  # both empty after normalization
        ("南京", ["北京"], 0.0, 0.5),
        ("东", ["西"], 0.0, 0.0),
    ],
)
def test_em_f1_zh_hand_values(prediction, golds, em, f1):
    assert metrics.em_f1_zh(prediction, golds) == pytest.approx((em, f1), abs=1e-15)


def test_span_prf_hand_values():
    pred = [{(0, 2), (5, 7)}, set(), {(1, 3)}]
    gold = [{(0, 2)}, {(4, 6)}, {(1, 3), (8, 9)}]
    # 2 correct of 3 predicted and 4 gold: P = 2/3, R = 1/2, F1 = 4/7.
    assert metrics.span_prf(pred, gold) == pytest.approx(
        {"precision": 2 / 3, "recall": 1 / 2, "f1": 4 / 7}, abs=1e-15
    )
    assert metrics.span_prf([set(), set()], [set(), set()]) == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0
    }
    assert metrics.span_prf([{"张三"}], [{"张三"}]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_ranking_accuracy_hand_values():
    scores = [
        [3.0, 2.0, 1.0, 0.0],  # right
        [3.0, 2.0, 2.0, 1.0],  # a tie: wrong
        [1.0, 2.0, 3.0, 4.0],  # reversed: wrong
        [0.5, 0.4, 0.3, -1.0],  # right
        [5.0],  # a single score is trivially in order
    ]
    assert metrics.ranking_accuracy(scores) == pytest.approx(3 / 5, abs=1e-15)
    assert metrics.ranking_accuracy(np.array([[0.9, 0.1], [0.1, 0.9]])) == 0.5
    assert metrics.ranking_accuracy([]) == 0.0
