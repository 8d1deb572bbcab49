"""GLM port: parity with HF ``GlmForCausalLM``, ChatGLM2 naming, cache, prefix, tokenizer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from flax import nnx
from transformers import GlmConfig as HFGlmConfig
from transformers import GlmForCausalLM as HFGlmForCausalLM

from lib import hf
from lib.chatglm_tokenizer import ChatGLMTokenizer
from lib.errors import UserError
from lib.models import glm

VOCAB, LAYERS, HEADS, KV, HEAD_DIM = 96, 2, 4, 2, 8

# The released ChatGLM2-6B config.json, shrunk to the tiny model (same keys).
CHATGLM2_CONFIG = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 64,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 32,
    "kv_channels": HEAD_DIM,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": KV,
    "num_attention_heads": HEADS,
    "num_layers": LAYERS,
    "original_rope": True,
    "padded_vocab_size": VOCAB,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 128,
    "use_cache": True,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random HF GLM (GQA 4/2 heads, half-rotary, qkv bias) saved to disk, and the
    torch model. Weights are drawn with std 0.2 (norms around 1) so logits are O(1)."""
    torch.manual_seed(0)
    config = HFGlmConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HEAD_DIM,
        partial_rotary_factor=0.5,
        attention_bias=True,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = HFGlmForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    path = tmp_path_factory.mktemp("glm_hf")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def ours(hf_dir):
    model, config = glm.load_pretrained(hf_dir[0])
    return model, config


@nnx.jit
def _fwd(model, ids, mask=None, positions=None, cache=None, prefix=None):
    """One compiled forward per shape: eager op-by-op dispatch is far slower on CPU."""
    return model(ids, mask, positions, cache, prefix=prefix)


def _batch():
    """Three left-padded rows of length 9 (0, 3 and 5 pads) and their HF-style positions."""
    ids = np.random.RandomState(0).randint(3, VOCAB, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ids, mask, positions


def _torch_logits(model, ids, mask, positions):
    with torch.no_grad():
        out = model(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def test_logits_match_hf_on_left_padded_batch(hf_dir, ours):
    model, config = ours
    assert (config.num_key_value_heads, config.rotary_dim, config.attention_bias) == (2, 4, True)
    ids, mask, positions = _batch()
    ref = _torch_logits(hf_dir[1], ids, mask, positions)
    logits, cache = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))  # default positions
    assert cache is None and logits.dtype == jnp.float32 and logits.shape == (3, 9, VOCAB)
    diff = np.abs(np.asarray(logits) - ref)[mask == 1].max()
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers
    assert diff <= 1e-4, diff  # measured: ~2e-6


def test_export_reloads_in_transformers(hf_dir, ours, tmp_path):
    model, config = ours
    glm.export_pretrained(model, config, tmp_path / "export")
    reloaded = HFGlmForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert reloaded.config.rope_parameters["partial_rotary_factor"] == 0.5
    ids, mask, positions = _batch()
    ref = _torch_logits(hf_dir[1], ids, mask, positions)
    got = _torch_logits(reloaded, ids, mask, positions)
    # Same weights; the reload runs sdpa instead of eager attention: ~1e-6 apart.
    assert np.abs(got - ref)[mask == 1].max() <= 1e-5


def chatglm_state(sd: dict[str, np.ndarray], multi_query: bool = True) -> dict[str, np.ndarray]:
    """THUDM's ChatGLM2 names and fused layouts written out by hand from HF GLM weights
    (independent of ``ours_to_chatglm``): query_key_value rows are ``[q | k | v]`` with
    multi-query attention and ``[q_h | k_h | v_h]`` for each head h without; dense_h_to_4h
    rows are ``[gate | up]`` (HF GLM's gate_up_proj already)."""
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
    }
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            q, k, v = (sd[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv")
            if multi_query:
                fused = np.concatenate([q, k, v])
            else:
                heads = [slice(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in range(HEADS)]
                fused = np.concatenate([x[s] for s in heads for x in (q, k, v)])
            out[f"{dst}self_attention.query_key_value.{leaf}"] = fused
        out[dst + "self_attention.dense.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.down_proj.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
    return out


def test_chatglm2_checkpoint_loads_with_equal_logits(hf_dir, ours, tmp_path):
    model, config = ours
    expected = chatglm_state({k: v.numpy() for k, v in hf_dir[1].state_dict().items()})
    converted = glm.ours_to_chatglm(hf.state_of(model), config)
    assert sorted(converted) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(converted[name], value, err_msg=name)
    assert sorted(glm.chatglm_to_ours(converted, config)) == sorted(hf.state_of(model))

    # A ChatGLM2-style directory: .bin weights with the rotary buffer, THUDM's config keys.
    chat_dir = tmp_path / "chatglm2"
    chat_dir.mkdir()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expected.items()}
    state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(HEAD_DIM // 4)
    torch.save(state, chat_dir / "pytorch_model.bin")
    (chat_dir / "config.json").write_text(json.dumps(CHATGLM2_CONFIG))
    chat_model, chat_config = glm.load_pretrained(chat_dir)
    assert chat_config == config.__class__(**{**config.__dict__, "max_position_embeddings": 128})
    ids, mask, _ = _batch()
    a, _ = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
    b, _ = _fwd(chat_model, jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() == 0.0

    # Strict: a missing tensor is named.
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    torch.save(state, chat_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"missing keys \[model\.layers\.1\.mlp\.down_proj"):
        glm.load_pretrained(chat_dir)


def test_chatglm_config_mapping_and_errors():
    six_b = {**CHATGLM2_CONFIG, "padded_vocab_size": 65024, "hidden_size": 4096,
             "ffn_hidden_size": 13696, "kv_channels": 128, "num_attention_heads": 32,
             "multi_query_group_num": 2, "num_layers": 28, "seq_length": 32768}
    c = glm.GlmConfig.from_hf(six_b)
    assert c == glm.GlmConfig()  # the defaults are ChatGLM2-6B
    assert (c.rotary_dim, c.rope_theta) == (64, 10000.0)
    assert glm.GlmConfig.from_hf({**six_b, "rope_ratio": 50}).rope_theta == 500000.0
    assert glm.GlmConfig.from_hf(glm.GlmConfig(vocab_size=100).to_hf()).vocab_size == 100
    eos = glm.GlmConfig.from_hf({**glm.GlmConfig().to_hf(), "eos_token_id": [2, 5]})
    assert eos.eos_token_id == (2, 5)
    v1 = {"model_type": "chatglm", "vocab_size": 130528, "position_encoding_2d": True}
    with pytest.raises(UserError, match="first-generation ChatGLM-6B"):
        glm.GlmConfig.from_hf(v1)
    with pytest.raises(UserError, match="add_bias_linear"):
        glm.GlmConfig.from_hf({**six_b, "add_bias_linear": True})
    with pytest.raises(UserError, match="lacks the key 'num_layers'"):
        glm.GlmConfig.from_hf({k: v for k, v in six_b.items() if k != "num_layers"})
    # Without multi-query attention the fused rows are per head [q_h | k_h | v_h].
    mha = glm.GlmConfig(num_attention_heads=2, num_key_value_heads=2, head_dim=3)
    q, k, v = (np.full((6, 4), x, np.float32) for x in (1, 2, 3))
    ours = {"model.layers.0.self_attn.q_proj.weight": q,
            "model.layers.0.self_attn.k_proj.weight": k,
            "model.layers.0.self_attn.v_proj.weight": v}
    fused = glm.ours_to_chatglm(ours, mha, multi_query=False)
    qkv = fused["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert qkv[:, 0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3] * 2
    back = glm.chatglm_to_ours(fused, mha, multi_query=False)
    assert all(np.array_equal(back[n], ours[n]) for n in ours)


def test_cached_decoding_matches_full_forward(ours):
    model, _ = ours
    ids, mask, _ = _batch()
    full, _ = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
    # Prefill 6 tokens, then 3 single steps; positions come from the cache by default.
    cache = model.init_cache(3, 9)
    step, cache = _fwd(model, jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]), cache=cache)
    got = [step]
    for t in range(6, 9):
        step, cache = _fwd(model, jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]),
                           cache=cache)
        got.append(step)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    assert int(cache.index) == 9
    assert np.abs(got - np.asarray(full))[mask == 1].max() <= 1e-5


def test_prefix_equals_cached_keys_of_earlier_tokens(ours):
    """A prefix is exactly "keys/values of tokens that came before". So: run the first N
    tokens with a cache, hand their cached k/v over as the prefix, and run the remaining
    tokens at positions N.. — the logits must equal the full forward's (which they cannot
    if the prefix were ignored). All rows share the first N tokens, so a batch-1 prefix
    (broadcast) is checked too. Shapes match the other tests' calls to reuse compilations."""
    model, _ = ours
    n, total = 6, 9
    ids = np.random.RandomState(1).randint(3, VOCAB, size=(3, total)).astype(np.int32)
    ids[1:, :n] = ids[0, :n]
    ones = np.ones_like(ids)
    full, _ = _fwd(model, jnp.asarray(ids), jnp.asarray(ones))
    _, cache = _fwd(model, jnp.asarray(ids[:, :n]), jnp.asarray(ones[:, :n]),
                    cache=model.init_cache(3, total))
    prefix = glm.Prefix(k=cache.k[:, :1, :n], v=cache.v[:, :1, :n])  # [layers, 1, N, kv, d]
    positions = jnp.broadcast_to(jnp.arange(n, total), (3, total - n))
    rest, _ = _fwd(model, jnp.asarray(ids[:, n:]), positions=positions, prefix=prefix)
    assert np.abs(np.asarray(rest) - np.asarray(full[:, n:])).max() <= 1e-5
    # The same with a cache for the new tokens (prefill, then one decode step).
    cache = model.init_cache(3, total - n)
    _, cache = _fwd(model, jnp.asarray(ids[:, n:-1]), positions=positions[:, :-1], cache=cache,
                    prefix=prefix)
    last, _ = _fwd(model, jnp.asarray(ids[:, -1:]), positions=positions[:, -1:], cache=cache,
                   prefix=prefix)
    assert np.abs(np.asarray(last[:, 0]) - np.asarray(full[:, -1])).max() <= 1e-5


def test_remat_gradients_match_torch(hf_dir):
    """Gradients of a rematerialized model equal PyTorch autograd's on the HF model."""
    ids, mask, positions = _batch()
    real = jnp.asarray(mask, jnp.float32)

    def loss(m):
        logits, _ = m(jnp.asarray(ids), jnp.asarray(mask))
        return jnp.sum(jax.nn.logsumexp(logits, -1) * real) / jnp.sum(real)

    model, _ = glm.load_pretrained(hf_dir[0], remat=True)
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)

    torch_model = hf_dir[1]
    torch_model.zero_grad()
    logits = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions, dtype=torch.long)).logits
    real_t = torch.tensor(mask, dtype=torch.float32)
    ref = (torch.logsumexp(logits, -1) * real_t).sum() / real_t.sum()
    ref.backward()
    ref_grads = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}
    torch_model.zero_grad()

    assert abs(float(value) - ref.item()) <= 1e-5
    flat = dict(nnx.to_flat_state(grads))
    worst = 0.0
    for name, path in hf.param_names(model).items():
        g = np.asarray(flat[path].get_value())
        g = g.T if path[-1] == "kernel" else g
        worst = max(worst, float(np.abs(g - ref_grads[name]).max()))
    assert len(ref_grads) == len(hf.param_names(model)) and worst <= 1e-5, worst


def test_greedy_generation_matches_hf(hf_dir, ours):
    generate = pytest.importorskip("lib.generate")
    model, _ = ours
    prompts = [[5, 17, 33, 9, 60, 41, 7], [12, 70], [88, 3, 45, 19]]
    ids, mask = generate.left_pad(prompts, 0)
    new = 8
    got = generate.generate(model, ids, mask, max_new_tokens=new)
    with torch.no_grad():
        ref = hf_dir[1].generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=0,
            eos_token_id=2,
        )[:, ids.shape[1] :].numpy()
    ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])), constant_values=0)
    np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny SentencePiece model (byte fallback, like ChatGLM2's) trained on a few lines."""
    root = tmp_path_factory.mktemp("chatglm_tok")
    lines = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "白日依山尽，黄河入海流。",
             "欲穷千里目，更上一层楼。", "春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。",
             "请根据以下诗歌进行鉴赏：", "问：你好 答：你好！我是人工智能助手。",
             "红豆生南国，春来发几枝。愿君多采撷，此物最相思。"]
    (root / "corpus.txt").write_text("\n".join(lines * 3), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"), vocab_size=400,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
    )
    return ChatGLMTokenizer.from_pretrained(root)


def test_chatglm_tokenizer(tokenizer, tmp_path):
    n = tokenizer.sp.vocab_size()
    assert n == 400 and tokenizer.vocab_size == 405
    assert tokenizer.prefix_ids == [n + 1, n + 3]  # [gMASK], sop (64790, 64792 in ChatGLM2)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    prompt = tokenizer.build_prompt("写一首诗", history=[("你好", "你好！")])
    assert prompt == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：写一首诗\n\n答："
    assert tokenizer.build_prompt("床前明月光") == "[Round 1]\n\n问：床前明月光\n\n答："
    ids = tokenizer.encode_chat("床前明月光")
    body = tokenizer.sp.encode("[Round 1]\n\n问：床前明月光\n\n答：")
    assert ids == [n + 1, n + 3] + body
    assert tokenizer.encode("明月", add_special_tokens=False) == tokenizer.sp.encode("明月")
    # Special, eos and pad ids vanish in decoding; the text round-trips exactly.
    assert tokenizer.decode(ids + [2, 0]) == "[Round 1]\n\n问：床前明月光\n\n答："
    batch = tokenizer.batch([[7, 8, 9], [5]])
    assert batch["input_ids"].tolist() == [[7, 8, 9], [0, 0, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(UserError, match="tokenizer.model"):
        ChatGLMTokenizer.from_pretrained(tmp_path)
