"""The BERT-vocabulary tokenizers of t5-pegasus, Randeng-Pegasus and UER T5 (lib/word_tokenizer).

Expected ids are written out by the rules: a jieba word (HMM off) in vocab.txt is one token,
any other word is split by BERT (Chinese characters one by one, wordpieces, [UNK]); then the
layout of each family. A second check runs the original algorithm (a BERT slow tokenizer whose
word split is jieba) on the shipped summarization texts.
"""

from __future__ import annotations

import json
from pathlib import Path

import jieba
import numpy as np
import pytest

from lib import word_tokenizer
from lib.errors import UserError
from lib.tokenizer import CharVocab
from lib.word_tokenizer import JiebaBertTokenizer, kind_of, load, load_seq2seq_tokenizer

REPO = Path(__file__).resolve().parent.parent

# A BERT-style vocab.txt: ids 1-3 are [unused1-3] (Randeng's </s>, <mask_1>, <mask_2>).
VOCAB = [
    "[PAD]", "[unused1]", "[unused2]", "[unused3]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "我", "爱", "北", "京", "天", "安", "门", "今", "气", "很", "好", "，", "。", "们", "去",
    "颐", "和", "园", "玩", "球", "星", "在", "!", "！", "说", "：",
    "北京", "天安门", "我们", "今天", "天气",
    "hello", "world", "play", "##ing",
]
ID = {t: i for i, t in enumerate(VOCAB)}


def _checkpoint(tmp_path: Path, model_type: str, **tokenizer_config) -> Path:
    """A directory with VOCAB as vocab.txt and a config.json of ``model_type``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if tokenizer_config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tmp_path


@pytest.fixture(scope="module")
def t5p(tmp_path_factory) -> JiebaBertTokenizer:
    return load(_checkpoint(tmp_path_factory.mktemp("t5p"), "mt5"))


@pytest.fixture(scope="module")
def randeng(tmp_path_factory) -> JiebaBertTokenizer:
    return load(_checkpoint(tmp_path_factory.mktemp("randeng"), "pegasus"))


def _ids(*tokens: str) -> list[int]:
    return [ID[t] for t in tokens]


def test_jieba_words_in_the_vocab_stay_whole_others_are_split_by_bert(t5p):
    # The jieba words these expectations rest on (jieba's default dictionary, HMM off).
    assert list(jieba.cut("我爱北京天安门", HMM=False)) == ["我", "爱", "北京", "天安门"]
    assert list(jieba.cut("今天天气很好，我们去颐和园玩。", HMM=False)) == [
        "今天天气", "很", "好", "，", "我们", "去", "颐和园", "玩", "。"]
    # In-vocabulary words are one token each.
    assert t5p.tokenize("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    # 今天天气 and 颐和园 are jieba words outside the vocabulary: BERT splits them into
    # characters (not into the in-vocabulary words 今天 + 天气).
    assert t5p.encode("今天天气很好，我们去颐和园玩。") == _ids(
        "[CLS]", "今", "天", "天", "气", "很", "好", "，", "我们", "去", "颐", "和", "园", "玩",
        "。", "[SEP]")
    # Latin text is lowercased before jieba; an out-of-vocabulary word gets wordpieces, or
    # [UNK] when no split exists (nba); a character outside the vocabulary is [UNK] (龘).
    assert list(jieba.cut("hello world! playing nba球星", HMM=False)) == [
        "hello", " ", "world", "!", " ", "playing", " ", "nba", "球星"]
    assert t5p.tokenize("Hello World! Playing NBA球星龘") == [
        "hello", "world", "!", "play", "##ing", "[UNK]", "球", "星", "[UNK]"]


def test_layouts_and_special_ids(t5p, randeng):
    text = "我爱北京天安门"
    body = _ids("我", "爱", "北京", "天安门")
    # t5-pegasus: [CLS] text [SEP]; the decoder starts at [CLS] and ends with [SEP].
    assert t5p.encode(text) == [ID["[CLS]"], *body, ID["[SEP]"]]
    assert (t5p.eos_token_id, t5p.pad_token_id, t5p.decoder_start_token_id, t5p.bos_token_id,
            t5p.unk_token_id) == (6, 0, 5, 5, 4)
    assert t5p.encode_target(text) == [*body, ID["[SEP]"]]
    # Randeng: text </s> with </s> = [unused1] = id 1; pad 0 starts the decoder; no [CLS].
    assert randeng.encode(text) == [*body, 1]
    assert (randeng.eos_token_id, randeng.pad_token_id, randeng.decoder_start_token_id,
            randeng.bos_token_id, randeng.unk_token_id) == (1, 0, 0, None, 4)
    assert randeng.encode_target(text) == [*body, 1]
    assert t5p.encode(text, add_special_tokens=False) == randeng.encode(
        text, add_special_tokens=False) == body
    assert t5p.vocab_size == randeng.vocab_size == len(t5p) == len(VOCAB)


def test_special_tokens_written_in_a_text_are_kept_whole(t5p, randeng):
    # The T5 QA source format puts [SEP] inside the text; filling puts [MASK].
    assert t5p.encode("我[SEP]北京", add_special_tokens=False) == _ids("我", "[SEP]", "北京")
    assert t5p.tokenize("[MASK]是北京") == ["[MASK]", "[UNK]", "北京"]  # 是 is not in VOCAB
    # Randeng's own names: </s> -> 1, <mask_1> -> 2 ([unused2]), <mask_2> -> 3; [CLS] too.
    assert randeng.encode("北京</s><mask_1>天安门<mask_2>[CLS]", add_special_tokens=False) == [
        ID["北京"], 1, 2, ID["天安门"], 3, ID["[CLS]"]]
    assert randeng.convert_tokens_to_ids(["</s>", "<pad>", "北京", "是"]) == [1, 0, ID["北京"], 4]


def test_decode_drops_spaces_and_special_tokens(t5p, randeng):
    ids = t5p.encode("我爱北京 hello world playing")
    assert ids == _ids("[CLS]", "我", "爱", "北京", "hello", "world", "play", "##ing", "[SEP]")
    assert t5p.decode(ids, skip_special_tokens=True) == "我爱北京helloworldplaying"
    assert t5p.decode(ids) == "[CLS]我爱北京helloworldplaying[SEP]"
    # Randeng keeps one space between two ASCII words, none next to Chinese characters.
    ids = randeng.encode("我爱北京 hello world playing")
    assert randeng.decode(ids, skip_special_tokens=True) == "我爱北京hello world playing"
    assert randeng.batch_decode([ids, [ID["北京"], 1, 0, 0]], skip_special_tokens=True) == [
        "我爱北京hello world playing", "北京"]


def test_truncation_keeps_the_special_tokens_and_padding(t5p, randeng):
    text = "我爱北京天安门"  # 4 tokens
    assert t5p.encode(text, max_length=5) == _ids("[CLS]", "我", "爱", "北京", "[SEP]")
    assert randeng.encode(text, max_length=3) == [ID["我"], ID["爱"], 1]
    assert t5p.encode_target(text, max_length=2) == [ID["我"], ID["[SEP]"]]
    batch = t5p([text, "北京"], max_length=5, truncation=True, padding="max_length",
                return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], [
        _ids("[CLS]", "我", "爱", "北京", "[SEP]"), _ids("[CLS]", "北京", "[SEP]") + [0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 5, [1, 1, 1, 0, 0]])
    assert batch["input_ids"].dtype == np.int32
    assert t5p("北京") == {"input_ids": _ids("[CLS]", "北京", "[SEP]"), "attention_mask": [1] * 3}
    with pytest.raises(ValueError, match="need max_length"):
        t5p(text, truncation=True)
    with pytest.raises(ValueError, match="max_length 1 < 2 special tokens"):
        t5p.encode(text, max_length=1)


def test_which_checkpoint_gets_which_tokenizer(tmp_path):
    assert kind_of(_checkpoint(tmp_path / "a", "mt5")) == "t5-pegasus"
    assert kind_of(_checkpoint(tmp_path / "b", "pegasus")) == "randeng-pegasus"
    assert kind_of(_checkpoint(tmp_path / "c", "bert",
                               tokenizer_class="PegasusTokenizer")) == "randeng-pegasus"
    assert kind_of(_checkpoint(tmp_path / "d", "bert",
                               tokenizer_class="T5PegasusTokenizer")) == "t5-pegasus"
    # uer/t5-*-chinese-cluecorpussmall: a plain BERT tokenizer, no jieba.
    assert kind_of(_checkpoint(tmp_path / "e", "t5")) == "t5-bert"
    assert kind_of(_checkpoint(tmp_path / "g", "bert")) is None
    with pytest.raises(UserError, match=r"g: not a t5-pegasus, Randeng-Pegasus or UER T5 "
                                        r"checkpoint \(config.json model_type must be mt5, "
                                        r"pegasus or t5"):
        load(tmp_path / "g")
    assert load(tmp_path / "g", kind="t5-pegasus").eos_token_id == ID["[SEP]"]
    with pytest.raises(UserError, match=r"nowhere: model directory not found \(set "
                                        r"--config.model.path=DIR\)"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no vocab.txt"):
        load(tmp_path / "empty")
    with pytest.raises(UserError, match=r"unknown tokenizer kind 'bart': expected one of "
                                        r"\['randeng-pegasus', 't5-bert', 't5-pegasus'\]"):
        load(tmp_path / "a", kind="bart")
    # A scratch model's character vocabulary is not a jieba one, whatever its model_type.
    CharVocab.build(["我爱北京"]).save(_checkpoint(tmp_path / "h", "t5"))
    assert kind_of(tmp_path / "h") is None
    assert isinstance(load_seq2seq_tokenizer(tmp_path / "h"), CharVocab)
    assert isinstance(load_seq2seq_tokenizer(tmp_path / "b"), JiebaBertTokenizer)
    # A vocabulary without the family's eos names the token it looked for.
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "vocab.txt").write_text("[PAD]\n[UNK]\n我\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab.txt: the vocabulary lacks '</s>' or "
                                        r"'\[unused1\]' \(randeng-pegasus eos\)"):
        load(tmp_path / "f", kind="randeng-pegasus")


def test_save_pretrained_round_trip(t5p, randeng, tmp_path):
    for tok, model_type in ((t5p, "mt5"), (randeng, "pegasus")):
        out = tmp_path / tok.kind.name
        tok.save_pretrained(out)
        assert (out / "vocab.txt").read_text(encoding="utf-8") == "\n".join(VOCAB) + "\n"
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert config == {"tokenizer_class": tok.kind.tokenizer_class, "do_lower_case": True}
        (out / "config.json").write_text(json.dumps({"model_type": model_type}))
        again = load(out)
        assert again.kind == tok.kind
        assert again.encode("今天天气很好 Playing") == tok.encode("今天天气很好 Playing")
    # do_lower_case=false in tokenizer_config.json keeps the case (Hello is then unknown).
    cased = load(_checkpoint(tmp_path / "cased", "mt5", do_lower_case=False))
    assert cased.tokenize("Hello hello") == ["[UNK]", "hello"]


def test_matches_the_original_algorithm_on_shipped_texts(tmp_path):
    """The originals subclass a slow BERT tokenizer and replace its word split by jieba; run
    that (on transformers' slow BERT tokenizer) on 30 summarization texts with a vocabulary of
    their characters and frequent words, uppercase Latin letters included."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    class JiebaSlowBert(BertTokenizerLegacy):
        def _tokenize(self, text, split_special_tokens=False):
            out = []
            for word in jieba.cut(text, HMM=False):
                out += [word] if word in self.vocab else super()._tokenize(word)
            return out

    lines = (REPO / "data/summarization/dev.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines[:30]]
    texts[0] = "Xinhua报道：NBA季后赛playing today，ＷＴＯ谈判在Café举行。" + texts[0]
    words = sorted({w for t in texts for w in jieba.cut(t.lower(), HMM=False)})
    chars = sorted({c for t in texts for c in t.lower()} - {" "})
    multi = [w for w in words if len(w) > 1][::2]  # every other word, so half are split
    vocab = ["[PAD]", "[unused1]", "[unused2]", "[unused3]", "[UNK]", "[CLS]", "[SEP]",
             "[MASK]", *chars, *[w for w in multi if w not in chars], "##ing", "##hua"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mt5"}))
    ours = load(tmp_path)
    original = JiebaSlowBert(vocab_file=str(tmp_path / "vocab.txt"))
    n_whole = 0
    for text in texts:
        # transformers 4 lowercased the text before _tokenize when do_lower_case.
        expected = original.encode(text.lower())
        assert ours.encode(text) == expected
        n_whole += sum(len(vocab[i]) > 1 and not vocab[i].startswith("[") for i in expected)
    assert n_whole > 200  # many multi-character words were kept whole


def test_uer_t5_is_plain_bert_with_the_t5_pegasus_layout(tmp_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tok = load(_checkpoint(tmp_path, "t5"))
    assert tok.kind is word_tokenizer.KINDS["t5-bert"]
    # No jieba: the in-vocabulary words 北京 and 天安门 are split into characters, as BERT does.
    text = "我爱北京天安门 Playing"
    assert tok.encode(text) == _ids("[CLS]", "我", "爱", "北", "京", "天", "安", "门", "play",
                                    "##ing", "[SEP]")
    assert tok.encode(text) == BertTokenizerLegacy(vocab_file=str(tmp_path / "vocab.txt")).encode(
        text)
    assert (tok.eos_token_id, tok.decoder_start_token_id) == (ID["[SEP]"], ID["[CLS]"])
    assert tok.tokenize("问题：北京[SEP]原文：") == [
        "[UNK]", "[UNK]", "：", "北", "京", "[SEP]", "[UNK]", "[UNK]", "："]
