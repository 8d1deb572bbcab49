"""CharVocab (the char-level tokenizer) and its parity with an HF BERT tokenizer."""

import numpy as np
import pytest

from lib.errors import UserError
from lib.tokenizer import CharVocab, load_hf_tokenizer

TEXTS = ["你好你", "好天", "地"]  # counts: 你 2, 好 2, 天 1, 地 1


@pytest.fixture
def vocab() -> CharVocab:
    return CharVocab.build(TEXTS)


def test_build_orders_by_frequency_then_code_point(vocab):
    assert vocab.tokens == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<bos>", "<eos>",
                            "你", "好", "地", "天"]  # 地 U+5730 < 天 U+5929
    ids = (vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id, vocab.bos_id,
           vocab.eos_id)
    assert ids == (0, 1, 2, 3, 4, 5, 6)
    hf_ids = (vocab.pad_token_id, vocab.unk_token_id, vocab.cls_token_id, vocab.sep_token_id,
              vocab.mask_token_id, vocab.bos_token_id, vocab.eos_token_id)
    assert hf_ids == ids
    assert vocab.vocab_size == len(vocab) == 11
    assert vocab.all_special_ids == [0, 1, 2, 3, 4, 5, 6]
    assert CharVocab.build(TEXTS, min_freq=2).tokens[7:] == ["你", "好"]
    assert CharVocab.build(TEXTS, max_size=8).tokens[7:] == ["你"]
    small = CharVocab.build(TEXTS, specials=("[PAD]", "[UNK]", "[unused1]"))
    assert small.tokens[:4] == ["[PAD]", "[UNK]", "[unused1]", "你"] and small.cls_id is None
    with pytest.raises(ValueError, match="longer than one character"):
        CharVocab.build(TEXTS, specials=("[PAD]", "[UNK]", "x"))


def test_encode_decode_round_trip(vocab):
    assert vocab.encode("你好天") == [2, 7, 8, 10, 3]
    assert vocab.encode("你好天", add_special_tokens=False) == [7, 8, 10]
    assert vocab.encode("你", "好") == [2, 7, 3, 8, 3]
    assert vocab.encode("你猫") == [2, 7, 1, 3]  # unseen character -> [UNK]
    assert vocab.decode([2, 7, 8, 10, 3, 0]) == "[CLS]你好天[SEP][PAD]"
    assert vocab.decode(np.array([2, 7, 8, 10, 3, 0]), skip_special_tokens=True) == "你好天"
    assert vocab.decode(vocab.encode("地天你好"), skip_special_tokens=True) == "地天你好"
    assert vocab.convert_tokens_to_ids(["[MASK]", "好", "猫"]) == [4, 8, 1]
    assert vocab.convert_ids_to_tokens([4, 8]) == ["[MASK]", "好"]


def test_whitespace_is_a_character_but_line_breaks_are_unknown(tmp_path):
    vocab = CharVocab.build(["好 看\u3000", "不\n好\r"])
    assert " " in vocab.tokens and "\u3000" in vocab.tokens
    assert "\n" not in vocab.tokens and "\r" not in vocab.tokens
    assert vocab.encode("好 \n", add_special_tokens=False) == [
        vocab.token_to_id["好"], vocab.token_to_id[" "], vocab.unk_id]
    vocab.save(tmp_path)
    assert CharVocab.load(tmp_path).tokens == vocab.tokens  # the space line survives


def test_save_load_equality(vocab, tmp_path):
    path = vocab.save_pretrained(tmp_path / "tok")
    assert open(path, encoding="utf-8").read().splitlines()[:3] == ["[PAD]", "[UNK]", "[CLS]"]
    loaded = CharVocab.load(tmp_path / "tok")
    assert loaded.tokens == vocab.tokens and loaded.all_special_ids == vocab.all_special_ids
    assert loaded.encode("天地你好") == vocab.encode("天地你好") == [2, 10, 9, 7, 8, 3]
    with pytest.raises(UserError, match="vocab.txt: vocabulary file not found"):
        CharVocab.load(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vocab.txt").write_text("[PAD]\n[UNK]\n好\n好\n", encoding="utf-8")
    with pytest.raises(UserError, match="token '好' appears twice"):
        CharVocab.load(tmp_path / "bad")


def test_call_bert_pair_layout_exactly(vocab):
    enc = vocab(["你好", "天"], ["天天", "你"], max_length=8, truncation=True,
                padding="max_length", return_tensors="np")
    np.testing.assert_array_equal(enc["input_ids"], [[2, 7, 8, 3, 10, 10, 3, 0],
                                                     [2, 10, 3, 7, 3, 0, 0, 0]])
    np.testing.assert_array_equal(enc["token_type_ids"], [[0, 0, 0, 0, 1, 1, 1, 0],
                                                          [0, 0, 0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(enc["attention_mask"], [[1, 1, 1, 1, 1, 1, 1, 0],
                                                          [1, 1, 1, 1, 1, 0, 0, 0]])
    assert enc["input_ids"].dtype == np.int32
    left = vocab("你好", max_length=6, padding="max_length", return_tensors="np",
                 padding_side="left")
    np.testing.assert_array_equal(left["input_ids"], [[0, 0, 2, 7, 8, 3]])
    np.testing.assert_array_equal(left["attention_mask"], [[0, 0, 1, 1, 1, 1]])
    assert vocab("你好") == {"input_ids": [2, 7, 8, 3], "token_type_ids": [0, 0, 0, 0],
                            "attention_mask": [1, 1, 1, 1]}


def test_call_truncation(vocab):
    # Single text: the specials stay, the text is cut.
    enc = vocab(["你好天地你好"], max_length=5, truncation=True, return_tensors="np",
                padding="max_length")
    np.testing.assert_array_equal(enc["input_ids"], [[2, 7, 8, 10, 3]])
    # Pairs, longest first: 6 + 6 tokens into 11 - 3 = 8 -> 4 + 4; into 7 - 3 = 4 -> 2 + 2;
    # 8 + 2 tokens into 6 -> only the long one shrinks, to 4.
    a, b = "你好天地你好", "天地你好天地"
    assert vocab(a, b, max_length=11, truncation=True)["input_ids"] == [
        2, 7, 8, 10, 9, 3, 10, 9, 7, 8, 3]
    assert vocab(a, b, max_length=7, truncation=True)["input_ids"] == [2, 7, 8, 3, 10, 9, 3]
    assert vocab("你好天地你好天地", "天天", max_length=9, truncation=True)["input_ids"] == [
        2, 7, 8, 10, 9, 3, 10, 10, 3]
    assert vocab(a, b, max_length=10, truncation="only_second")["input_ids"] == [
        2, 7, 8, 10, 9, 7, 8, 3, 10, 3]
    with pytest.raises(ValueError, match="the other sequence alone has 6 tokens > 4"):
        vocab(a, b, max_length=7, truncation="only_second")
    with pytest.raises(ValueError, match="max_length 2 < 3 special tokens"):
        vocab(a, b, max_length=2, truncation=True)


# ------------------------------------------------------------------------------------------
# An HF BERT tokenizer built on CharVocab's own vocab.txt gives the same ids.


@pytest.fixture(scope="module")
def hf_and_char(tmp_path_factory):
    from transformers import BertTokenizer

    vocab = CharVocab.build(["春眠不觉晓处处闻啼鸟夜来风雨声花落知多少", "床前明月光"])
    tmp = tmp_path_factory.mktemp("tok")
    vocab.save(tmp / "char")
    BertTokenizer(str(tmp / "char" / "vocab.txt")).save_pretrained(str(tmp / "hf"))
    return load_hf_tokenizer(tmp / "hf"), vocab


@pytest.mark.parametrize("max_length", [5, 6, 7, 8, 9, 10, 13, 24])
def test_hf_bert_tokenizer_same_layout_for_pairs(hf_and_char, max_length):
    hf, char = hf_and_char
    texts = ["春眠不觉晓", "处处闻啼鸟夜来风雨声", "花", "床前明月光猫"]
    pairs = ["花落知多少", "春", "夜来风雨声花落知多少", "明月"]
    kwargs = dict(max_length=max_length, truncation=True, padding="max_length",
                  return_tensors="np")
    ours, theirs = char(texts, pairs, **kwargs), hf(texts, pairs, **kwargs)
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    left_ours = char(texts, max_length=max_length, truncation=True, padding="max_length",
                     return_tensors="np", padding_side="left")
    left_theirs = hf(texts, max_length=max_length, truncation=True, padding="max_length",
                     return_tensors="np", padding_side="left")
    np.testing.assert_array_equal(left_ours["input_ids"], left_theirs["input_ids"])


def test_hf_bert_tokenizer_same_encode_and_special_ids(hf_and_char):
    hf, char = hf_and_char
    assert hf.encode("春眠不觉晓") == char.encode("春眠不觉晓") == [2, 18, 22, 8, 26, 19, 3]
    assert hf.encode("花落", add_special_tokens=False) == char.encode("花落",
                                                                    add_special_tokens=False)
    assert hf("夜来", padding="longest") == char("夜来", padding="longest")
    for name in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id",
                 "mask_token_id"):
        assert getattr(hf, name) == getattr(char, name), name
    assert len(hf) == len(char) == 31  # 7 specials, 处 (twice) first
    ids = char.encode("花落知多少")
    assert hf.decode(ids, skip_special_tokens=True).replace(" ", "") == char.decode(
        ids, skip_special_tokens=True) == "花落知多少"


def test_load_hf_tokenizer_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as info:
        load_hf_tokenizer(missing)
    assert str(info.value) == f"{missing}: model directory not found (set --config.model.path=DIR)"
    with pytest.raises(UserError, match=r"cannot load a tokenizer from it .*model.path=DIR"):
        load_hf_tokenizer(tmp_path)  # exists, but holds no tokenizer files
