"""lib.generate: greedy parity with HF generate, EOS handling, sampling, top-k / top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from lib import generate as gen
from lib.models import qwen2

VOCAB = 96
PAD = 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random HF Qwen2 (GQA, qkv bias, untied head) and our port of it."""
    path = tmp_path_factory.mktemp("qwen2_gen")
    torch.manual_seed(3)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    ref = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" not in name:
                # Larger weights than HF's 0.02 init spread the logits, so greedy choices are
                # far from ties and decoding does not collapse into one repeated token.
                p.normal_(0.0, 0.15)
    ref.save_pretrained(path)
    ref.config._attn_implementation = "eager"
    model, _ = qwen2.load_pretrained(path)
    return ref, model


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of 7, 12 and 3 tokens, left-padded to 12."""
    rs = np.random.RandomState(0)
    return gen.left_pad([list(rs.randint(1, VOCAB, n)) for n in (7, 12, 3)], PAD)


def hf_greedy(ref, ids, mask, new: int, eos: int) -> np.ndarray:
    """HF greedy continuation, padded to ``new`` columns (HF stops when all rows ended)."""
    with torch.no_grad():
        out = ref.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=eos,
        )
    out = out[:, ids.shape[1] :].numpy()
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=PAD)


def test_left_pad():
    ids, mask = gen.left_pad([[5, 6], [7], []], 0, length=3)
    np.testing.assert_array_equal(ids, [[0, 5, 6], [0, 0, 7], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="more than length=1"):
        gen.left_pad([[5, 6]], 0, length=1)


def test_greedy_matches_hf(pair, prompts):
    ref, model = pair
    ids, mask = prompts
    # First without an EOS that can occur (HF's eos must be some id: use one never chosen).
    ours = gen.generate(model, ids, mask, max_new_tokens=20, eos_token_id=[], pad_token_id=PAD)
    assert ours.shape == (3, 20) and ours.dtype == np.int32
    unused = next(i for i in range(VOCAB) if i not in ours)
    np.testing.assert_array_equal(ours, hf_greedy(ref, ids, mask, 20, unused))
    assert len(set(ours[0].tolist())) > 3  # a real continuation, not one repeated token

    # Then with an EOS that one row produces mid-way: the same EOS/pad semantics as HF.
    eos = int(ours[1, 5])
    stop = gen.generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(stop, hf_greedy(ref, ids, mask, 20, eos))
    first = int(np.argmax(ours[1] == eos))
    np.testing.assert_array_equal(stop[1, : first + 1], ours[1, : first + 1])
    assert np.all(stop[1, first + 1 :] == PAD)


def test_stops_once_every_row_ended(pair, prompts):
    _, model = pair
    ids, mask = prompts
    ours = gen.generate(model, ids, mask, max_new_tokens=20, eos_token_id=[], pad_token_id=PAD)
    # Every row's first token as EOS: all rows end at step 0, the rest is padding.
    eos = sorted(set(ours[:, 0].tolist()))
    out = gen.generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(out[:, 0], ours[:, 0])
    assert np.all(out[:, 1:] == PAD)


def test_one_compile_per_shape_and_settings(pair, prompts):
    _, model = pair
    ids, mask = prompts
    kwargs = dict(max_new_tokens=20, eos_token_id=[], pad_token_id=PAD)
    gen.generate(model, ids, mask, **kwargs)
    before = gen._generate._cache_size()
    gen.generate(model, ids, mask, **kwargs)
    gen.generate(model, ids[::-1].copy(), mask[::-1].copy(), **kwargs)
    # EOS and pad ids are data, not compile-time constants.
    gen.generate(model, ids, mask, max_new_tokens=20, eos_token_id=[5], pad_token_id=1)
    assert gen._generate._cache_size() == before


def test_sampling_is_reproducible(pair, prompts):
    _, model = pair
    ids, mask = prompts
    kwargs = dict(
        max_new_tokens=20,
        eos_token_id=[],
        pad_token_id=PAD,
        do_sample=True,
        temperature=0.8,
        top_p=0.9,
    )
    a = gen.generate(model, ids, mask, rng=jax.random.key(1), **kwargs)
    b = gen.generate(model, ids, mask, rng=jax.random.key(1), **kwargs)
    c = gen.generate(model, ids, mask, rng=jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.2


def test_top_k_1_sampling_is_greedy(pair, prompts):
    _, model = pair
    ids, mask = prompts
    kwargs = dict(max_new_tokens=20, eos_token_id=[], pad_token_id=PAD)
    greedy = gen.generate(model, ids, mask, **kwargs)
    sampled = gen.generate(
        model,
        ids,
        mask,
        rng=jax.random.key(7),
        do_sample=True,
        top_k=1,
        temperature=1.5,
        **kwargs,
    )
    np.testing.assert_array_equal(sampled, greedy)


# Compiled per setting: one compile is cheaper than dispatching each op eagerly on CPU.
warp = jax.jit(gen.warp_logits, static_argnames=("temperature", "top_k", "top_p"))


def test_top_p_on_a_hand_made_distribution():
    probs = jnp.asarray([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(probs)
    kept = lambda **kw: np.isfinite(np.asarray(warp(logits, **kw)))[0].tolist()
    # Sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative 0.5, 0.8, 0.95, 1.0.
    assert kept(top_p=0.4) == [False, True, False, False]  # the top token always stays
    assert kept(top_p=0.75) == [False, True, False, True]
    assert kept(top_p=0.9) == [False, True, True, True]
    assert kept(top_p=0.97) == [True, True, True, True]
    assert kept(top_p=1.0) == [True, True, True, True]
    assert kept(top_k=2) == [False, True, False, True]
    assert kept(top_k=3, top_p=0.75) == [False, True, False, True]
    # Kept logits are untouched (then divided by the temperature).
    warped = warp(logits, temperature=0.5, top_p=0.75)
    np.testing.assert_allclose(np.asarray(warped)[0, [1, 3]], np.log([0.5, 0.3]) / 0.5, rtol=1e-6)


def test_warp_matches_hf_warpers():
    rs = np.random.RandomState(0)
    logits = rs.normal(0.0, 2.0, (8, 50)).astype(np.float32)
    for temperature, top_k, top_p in [(1.0, 0, 0.8), (0.7, 10, 0.9), (1.3, 5, 1.0)]:
        warpers = transformers.LogitsProcessorList(
            [
                transformers.TemperatureLogitsWarper(temperature),
                *([transformers.TopKLogitsWarper(top_k)] if top_k else []),
                *([transformers.TopPLogitsWarper(top_p)] if top_p < 1.0 else []),
            ]
        )
        expected = warpers(None, torch.tensor(logits)).numpy()
        ours = np.asarray(
            warp(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p)
        )
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6)


def test_rejects_right_padding(pair):
    _, model = pair
    ids = np.array([[5, 6, 0]], np.int32)
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate(model, ids, np.array([[1, 1, 0]]), max_new_tokens=2, pad_token_id=PAD)


def _word_tokenizer(chat_template: str | None):
    """A whitespace word-level tokenizer with ``<s>`` / ``</s>`` specials."""
    words = ["[UNK]", "<s>", "</s>", "user", "assistant", ":", "hi", "there"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    out.chat_template = chat_template
    return out


def test_apply_chat_template():
    messages = [{"role": "user", "content": "hi there"}]
    template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant{% endif %}"
    )
    with_template = gen.apply_chat_template(_word_tokenizer(template), messages)
    assert with_template == [1, 3, 6, 7, 2, 1, 4]
    # No template: "user: hi there\nassistant: ".
    plain = gen.apply_chat_template(_word_tokenizer(None), messages)
    assert plain == [3, 5, 6, 7, 4, 5]
