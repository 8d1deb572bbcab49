"""A BERT vocab.txt tokenizer used by a causal LM (GPT-2 Chinese): ``[CLS]`` starts a text,
``[SEP]`` ends it; and a scratch GPT-2 built through the registry."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import transformers

from lib import lm_data, models
from lib.models import gpt2
from lib.tokenizer import BertLMTokenizer, CharVocab, load_lm_tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "你", "好", "世", "界", "。", "hello",
         "world"]
ID = {tok: i for i, tok in enumerate(VOCAB)}


@pytest.fixture
def bert_dir(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # from_pretrained reads vocab.txt (transformers 5's constructor leaves it unused).
    transformers.BertTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path)
    return tmp_path


def test_cls_starts_a_prompt_and_sep_ends_an_answer(bert_dir):
    tok = load_lm_tokenizer(bert_dir)
    assert isinstance(tok, BertLMTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 0)
    assert tok.encode("你好世界") == [2, 5, 6, 7, 8]  # no trailing [SEP] on a prompt
    assert tok.encode("你好", add_special_tokens=False) == [5, 6]
    prompt = lm_data.encode_prompt(tok, "你好")
    answer = lm_data.encode_answer(tok, "世界。")
    ids, labels = lm_data.build_example(prompt, answer, lm_data.eos_id(tok), max_length=16)
    assert ids == [ID["[CLS]"], 5, 6, 7, 8, 9, ID["[SEP]"]]
    assert labels == [-100, -100, 7, 8, 9, ID["[SEP]"], -100]
    # Decoding drops BERT's spaces around CJK characters, keeps them between ASCII words.
    assert tok.decode([2, 5, 6, 10, 11, 7, 3], skip_special_tokens=True) == "你好hello world世"
    assert lm_data.decode_answer(tok, [7, 8, 9, 3, 5]) == "世界。"
    out = bert_dir / "saved"
    tok.save_pretrained(out)
    again = load_lm_tokenizer(out)
    assert isinstance(again, BertLMTokenizer) and again.encode("你好hello") == [2, 5, 6, 10]


def test_a_tokenizer_with_its_own_eos_is_not_wrapped(bert_dir):
    plain = transformers.BertTokenizer.from_pretrained(bert_dir, eos_token="[SEP]")
    plain.save_pretrained(bert_dir / "with_eos")
    assert not isinstance(load_lm_tokenizer(bert_dir / "with_eos"), BertLMTokenizer)


def test_scratch_gpt2_from_the_registry():
    vocab = CharVocab.build(["你好世界。"])
    model_cfg = ml_collections.ConfigDict(dict(
        path="", family="gpt2", dtype="float32", remat=False, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        dropout=0.1, lora=dict(rank=0), prefix=dict(length=0),
    ))
    built = models.build(model_cfg, head="causal_lm", tokenizer=vocab, max_length=64)
    assert isinstance(built.model, gpt2.Gpt2LMHeadModel) and built.port.name == "gpt2"
    cfg = built.config
    # GPT-2 has no grouped heads: the scratch config has as many kv heads as heads.
    assert (cfg.num_key_value_heads, cfg.max_position_embeddings, cfg.vocab_size) == (
        4, 64 + 256, vocab.vocab_size)
    assert cfg.eos_token_id == vocab.eos_id and cfg.tie_word_embeddings
    logits, _ = built.model(np.array([[vocab.bos_id, 5, 6]], np.int32))
    assert logits.shape == (1, 3, vocab.vocab_size)
    with pytest.raises(models.UserError, match="a sequence_classification head"):
        models.build(model_cfg, head="sequence_classification", tokenizer=vocab)
