"""SFT: answer-only label masking, EOS, padding, truncation, alpaca prompts, a tiny training."""

import json
import math

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import sft as sft_config
from lib import hf, lm_data, train
from lib.errors import UserError
from lib.models import qwen2
from lib.tokenizer import CharVocab
from tasks import sft

IGN = lm_data.IGNORE


def test_masked_and_unmasked_labels_of_a_hand_example():
    prompt, answer, eos = [5, 6, 7], [8, 9], 2
    ids, labels = lm_data.build_example(prompt, answer, eos, max_length=8, loss_mode="masked")
    assert ids == [5, 6, 7, 8, 9, 2]  # EOS appended
    # Position t predicts ids[t + 1]; only the answer and the EOS are targets.
    assert labels == [IGN, IGN, 8, 9, 2, IGN]
    ids_u, labels_u = lm_data.build_example(
        prompt, answer, eos, max_length=8, loss_mode="unmasked"
    )
    assert ids_u == ids
    assert labels_u == [6, 7, 8, 9, 2, IGN]


def test_arrays_are_right_padded_and_padding_is_never_a_target():
    vocab = CharVocab.build(["春眠不觉晓处处闻啼鸟"])
    arrays = lm_data.build_arrays(vocab, [("春眠", "不觉晓")], max_length=10, loss_mode="masked")
    bos, eos = vocab.bos_id, vocab.eos_id
    chars = vocab.encode("春眠不觉晓", add_special_tokens=False)
    want_ids = [bos, *chars, eos] + [0] * 3
    np.testing.assert_array_equal(arrays["input_ids"], [want_ids])
    np.testing.assert_array_equal(arrays["attention_mask"], [[1] * 7 + [0] * 3])
    # Prompt = <bos> 春 眠; targets 不 觉 晓 <eos>, predicted from positions 2..5.
    np.testing.assert_array_equal(arrays["labels"], [[IGN, IGN, *chars[2:], eos] + [IGN] * 4])
    unmasked = lm_data.build_arrays(vocab, [("春眠", "不觉晓")], max_length=10,
                                    loss_mode="unmasked")
    np.testing.assert_array_equal(unmasked["labels"], [[*chars, eos] + [IGN] * 4])


def test_truncation_keeps_prompt_head_and_tail_and_drops_eos_of_cut_answers():
    prompt, answer = list(range(10, 30)), list(range(40, 50))
    p, t = lm_data.truncate(prompt, answer, 2, max_length=16, max_prompt_length=8,
                            prompt_tail=3)
    assert p == [10, 11, 12, 13, 14, 27, 28, 29]  # head 5 + tail 3
    assert t == [40, 41, 42, 43, 44, 45, 46, 47]  # 8 answer tokens, no EOS: the answer was cut
    p, t = lm_data.truncate([1, 2, 3], [4, 5], 2, max_length=16, max_prompt_length=8)
    assert (p, t) == ([1, 2, 3], [4, 5, 2])
    # Exactly full: the EOS still fits.
    p, t = lm_data.truncate([1, 2, 3], [4, 5, 6, 7], 2, max_length=8, max_prompt_length=4)
    assert t == [4, 5, 6, 7, 2]
    with pytest.raises(UserError, match="max_prompt_length"):
        lm_data.truncate([1], [2], 2, max_length=8, max_prompt_length=8)


def _tiny_lm(vocab_size: int = 40) -> qwen2.Qwen2ForCausalLM:
    cfg = qwen2.Qwen2Config(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )
    return qwen2.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))


def _batch(pairs, length, pad):
    rows = [lm_data.build_example(p, a, 2, max_length=length) for p, a in pairs]
    ids = np.full((len(rows), length), pad, np.int32)
    labels = np.full((len(rows), length), IGN, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_padding_id_and_length_do_not_change_the_loss():
    model = _tiny_lm()
    loss_fn = nnx.jit(lambda m, b: lm_data.lm_loss(m, b, None))
    pairs = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15])]
    base_loss, base_aux = loss_fn(model, _batch(pairs, 10, 0))
    for length, pad in ((10, 33), (16, 0), (16, 39)):
        loss, aux = loss_fn(model, _batch(pairs, length, pad))
        assert abs(float(loss) - float(base_loss)) < 1e-5
        assert float(aux["weight"]) == 8.0  # 3 + 5 targets (answers + EOS)
    assert float(base_aux["weight"]) == 8.0
    # The old bug, padding counted as targets, gives another number.
    bad = _batch(pairs, 16, 0)
    bad["labels"] = np.where(bad["labels"] == IGN, 0, bad["labels"])
    assert abs(float(loss_fn(model, bad)[0]) - float(base_loss)) > 0.01
    # The loss is the token mean of the targets' cross-entropy.
    batch = _batch(pairs, 10, 0)
    logits = np.asarray(nnx.jit(lambda m, x, k: m(x, k)[0])(
        model, batch["input_ids"], batch["attention_mask"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = batch["labels"]
    picked = [-logp[b, t, labels[b, t]] for b in range(2) for t in range(10) if labels[b, t] >= 0]
    assert abs(float(np.mean(picked)) - float(base_loss)) < 1e-5


def test_label_positions_give_the_same_loss_and_gradients():
    labels = np.array([[IGN, 4, IGN, 6, 7, IGN, IGN, IGN, IGN, IGN],
                       [IGN] * 10,
                       [1, 2, 3, 4, 5, 6, 7, 8, 9, IGN]], np.int32)
    at = lm_data.label_positions(labels, multiple=4)
    # Targets in order, then filler 0s; width = most targets (9) rounded up to 4, capped at 10.
    np.testing.assert_array_equal(at, [[1, 3, 4, 0, 0, 0, 0, 0, 0, 0], [0] * 10,
                                       [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]])
    assert lm_data.label_positions(labels[:1], multiple=4).shape == (1, 4)

    model = _tiny_lm()
    pairs = [([5, 6, 7, 8, 9, 10], [8, 9]), ([10, 11], [12, 13, 14, 15]), ([3] * 9, [4])]
    full = _batch(pairs, 12, 0)
    selected = {**full, "label_positions": lm_data.label_positions(full["labels"])}
    assert selected["label_positions"].shape == (3, 8)  # 5 targets at most: 8 of 12 positions
    grad_fn = nnx.jit(nnx.value_and_grad(lambda m, b: lm_data.lm_loss(m, b, None),
                                         has_aux=True))
    (loss_full, aux_full), g_full = grad_fn(model, full)
    (loss_sel, aux_sel), g_sel = grad_fn(model, selected)
    assert float(aux_sel["weight"]) == float(aux_full["weight"]) == 10.0
    assert abs(float(loss_sel) - float(loss_full)) < 1e-6
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_sel)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    nll_full, n_full = lm_data.row_nll(model, full)
    nll_sel, n_sel = lm_data.row_nll(model, selected)
    np.testing.assert_allclose(nll_sel, nll_full, rtol=1e-6)
    np.testing.assert_array_equal(n_sel, [3, 5, 2])
    # build_arrays adds the positions of its labels.
    vocab = CharVocab.build(["春眠不觉晓"])
    arrays = lm_data.build_arrays(vocab, [("春眠", "不觉晓")], max_length=10)
    np.testing.assert_array_equal(arrays["label_positions"], [[2, 3, 4, 5, 0, 0, 0, 0]])


def test_generation_config_eos_ids_also_end_answers(tmp_path):
    assert hf.generation_eos_ids("") == ()
    assert hf.generation_eos_ids(str(tmp_path)) == ()  # no generation_config.json
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7, 3]}')
    assert hf.generation_eos_ids(str(tmp_path)) == (7, 3)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 5}')
    assert hf.generation_eos_ids(str(tmp_path)) == (5,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(UserError, match="generation_config.json: eos_token_id must be"):
        hf.generation_eos_ids(str(tmp_path))

    vocab = CharVocab.build(["春眠不觉晓处处闻啼鸟"])
    ids = vocab.encode("春眠不觉", add_special_tokens=False)
    assert lm_data.decode_answer(vocab, [*ids, vocab.eos_id, ids[0]]) == "春眠不觉"
    assert lm_data.decode_answer(vocab, [*ids, vocab.eos_id], extra_stops=[ids[2]]) == "春眠"

    model = _tiny_lm(vocab.vocab_size)
    settings = dict(max_prompt_length=8, prompt_tail=0, max_new_tokens=6, batch_size=2)
    plain = lm_data.generate_answers(model, vocab, ["春眠", "处处"], **settings)
    assert all(len(text) > 0 for text in plain), plain
    # Stopping at the first generated character of each answer leaves nothing.
    firsts = [vocab.encode(text[0], add_special_tokens=False)[0] for text in plain]
    cut = lm_data.generate_answers(model, vocab, ["春眠", "处处"], **settings, extra_stops=firsts)
    assert cut == ["", ""]


def test_alpaca_template_and_record_formats(tmp_path):
    record = {"instruction": "写一首诗", "input": "春天", "output": "春眠不觉晓"}
    assert sft.alpaca_prompt(record) == (
        "You are an AI assistant. Follow the instruction, using the input if there is one.\n"
        "Instruction:写一首诗.\nInput:春天\nOutput: "
    )
    no_input = sft.alpaca_prompt({"instruction": "写诗"})
    assert no_input.endswith("Instruction:写诗.\nInput:\nOutput: ")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert sft.read_pairs(str(jsonl), "data.train") == [(sft.alpaca_prompt(record), "春眠不觉晓")]
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([{"prompt": "问", "answer": "答"}], ensure_ascii=False))
    assert sft.read_pairs(str(arr), "data.train") == [("问", "答")]
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps([{"prompt": "问"}], ensure_ascii=False))
    with pytest.raises(UserError, match='"answer" is missing'):
        sft.read_pairs(str(bad), "data.train")


def _tiny_config(tmp_path) -> ml_collections.ConfigDict:
    records = [
        {"instruction": "写", "input": w, "output": w * 3}
        for w in "春夏秋冬山水风月花鸟云雨"
    ]
    (tmp_path / "train.json").write_text(json.dumps(records, ensure_ascii=False))
    (tmp_path / "eval.json").write_text(json.dumps(records[:4], ensure_ascii=False))
    c = sft_config.get_config("demo")
    c.workdir = str(tmp_path / "run")
    c.data.train = str(tmp_path / "train.json")
    c.data.eval = str(tmp_path / "eval.json")
    c.data.template = "{instruction}{input}="
    c.data.max_length = 16
    c.data.max_prompt_length = 8
    c.data.prompt_tail = 1
    c.model.hidden_size, c.model.num_hidden_layers, c.model.intermediate_size = 32, 1, 64
    c.model.num_attention_heads, c.model.num_key_value_heads = 2, 1
    c.train.epochs, c.train.steps, c.train.batch_size = 0, 30, 8
    c.train.lr, c.train.warmup_ratio = 1e-2, 0.0
    c.eval.every = c.checkpoint.every = 30
    c.eval.batch_size, c.eval.num_samples, c.eval.max_new_tokens = 4, 1, 4
    c.log.every = 1
    return c


def test_tiny_sft_training_reduces_the_loss(tmp_path):
    config = _tiny_config(tmp_path)
    after = train.train(config, config.workdir, sft.Task.create(config))
    history = json.loads((tmp_path / "run" / "plots" / "history.json").read_text())
    losses = [p["loss"] for p in history["train"]]
    assert len(losses) == 30
    vocab = CharVocab.load(tmp_path / "run" / "tokenizer")
    # Step 1's loss is the untrained model's: near uniform over the vocabulary.
    assert abs(losses[0] - math.log(vocab.vocab_size)) < 0.5
    assert losses[-1] < 0.5 * losses[0]
    assert after["loss"] < 0.5 * losses[0]
    assert after["tokens"] == 16.0  # 4 eval records x (3 answer chars + EOS)
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]), rel=1e-6)
    saved = json.loads((tmp_path / "run" / "eval" / "step_30.json").read_text())
    assert saved["metrics"]["loss"] == pytest.approx(after["loss"])
    assert [s["reference"] for s in saved["samples"]] == ["春春春"]
