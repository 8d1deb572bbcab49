"""Qwen2 port: parity with HF PyTorch, export round trip, KV-cache consistency, strict loading."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from lib import hf
from lib.errors import UserError
from lib.models import qwen2

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,  # GQA: 2 query heads per kv head
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=10000.0,
)


def make_hf_qwen2(out_dir, *, tied: bool, seed: int = 0) -> transformers.Qwen2ForCausalLM:
    """A tiny random HF Qwen2 (eval, fp32, eager attention) saved to ``out_dir``.

    Biases and norm weights are randomized: HF initializes them to 0 / 1, which would hide a
    mix-up in their conversion.
    """
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(out_dir)
    model.config._attn_implementation = "eager"
    return model


_BUILT: dict[bool, tuple] = {}


def _build(tied: bool, tmp_path_factory):
    """(HF model, its directory, our loaded model, our config), made once per module."""
    if tied not in _BUILT:
        path = tmp_path_factory.mktemp("qwen2_tied" if tied else "qwen2_untied")
        ref = make_hf_qwen2(path, tied=tied)
        _BUILT[tied] = (ref, path, *qwen2.load_pretrained(path))
    return _BUILT[tied]


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    """Tied and untied LM heads."""
    return _build(request.param, tmp_path_factory)


@pytest.fixture
def untied(tmp_path_factory):
    """The untied model only, for checks that do not depend on the head (saves compiles)."""
    return _build(False, tmp_path_factory)


@nnx.jit
def forward(model, ids, mask, cache=None):
    """One compiled forward pass (eager op-by-op dispatch is far slower on CPU)."""
    return model(ids, mask, cache=cache)


def padded_batch():
    """Three left-padded rows of 12, 8 and 5 real tokens."""
    rs = np.random.RandomState(1)
    ids = rs.randint(0, TINY["vocab_size"], (3, 12)).astype(np.int32)
    mask = np.ones((3, 12), np.int32)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids, mask


def hf_logits(ref, ids, mask) -> np.ndarray:
    """HF logits with the positions HF ``generate`` uses for left padding."""
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = ref(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


def test_logits_match_hf(pair):
    ref, _, model, cfg = pair
    ids, mask = padded_batch()
    ours, cache = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert cache is None and ours.dtype == jnp.float32
    assert hasattr(model, "lm_head") != cfg.tie_word_embeddings
    diff = np.abs(np.asarray(ours) - hf_logits(ref, ids, mask))[mask.astype(bool)].max()
    print(f"max abs logit diff vs HF (tied={cfg.tie_word_embeddings}): {diff:.2e}")
    assert diff <= 1e-4


def test_export_reloads_in_pytorch(pair, tmp_path):
    ref, _, model, cfg = pair
    qwen2.export_pretrained(model, cfg, tmp_path)
    written = hf.load_state_dict(tmp_path)
    assert ("lm_head.weight" in written) != cfg.tie_word_embeddings
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    back.eval()
    assert back.config.rope_parameters["rope_theta"] == TINY["rope_theta"]
    assert back.config.tie_word_embeddings == cfg.tie_word_embeddings
    ids, mask = padded_batch()
    diff = np.abs(hf_logits(back, ids, mask) - hf_logits(ref, ids, mask))[mask.astype(bool)]
    print(f"exported model vs original HF: {diff.max():.2e}")
    assert diff.max() <= 1e-5


def test_cache_matches_full_forward(untied):
    _, _, model, _ = untied
    ids, mask = padded_batch()
    full, _ = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    # A prompt prefix, then single cached steps (as in decoding).
    cache = model.init_cache(3, 16)
    cuts = [(0, 9), (9, 10), (10, 11), (11, 12)]
    for start, end in cuts:
        logits, cache = forward(
            model, jnp.asarray(ids[:, start:end]), jnp.asarray(mask[:, start:end]), cache
        )
        diff = np.abs(np.asarray(logits) - np.asarray(full[:, start:end]))
        assert diff[mask[:, start:end].astype(bool)].max() <= 1e-5, (start, end)
    assert int(cache.index) == 12
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :12]), mask.astype(bool))


def test_remat_wraps_every_layer(untied):
    _, _, plain, cfg = untied
    remat = qwen2.Qwen2ForCausalLM(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(1))
    nnx.update(remat, nnx.state(plain, nnx.Param))
    ids, mask = padded_batch()

    def checkpoints(model) -> int:
        """How many rematerialized blocks the gradient computation contains."""
        graphdef, state = nnx.split(model)
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(jnp.asarray(ids), jnp.asarray(mask))[0])
        jaxpr = jax.make_jaxpr(jax.grad(loss))(state)
        return sum(eqn.primitive.name == "remat2" for eqn in jaxpr.jaxpr.eqns)

    assert (checkpoints(plain), checkpoints(remat)) == (0, cfg.num_hidden_layers)
    # Remat changes what the backward pass stores, never the values.
    a, _ = forward(plain, jnp.asarray(ids), jnp.asarray(mask))
    b, _ = forward(remat, jnp.asarray(ids), jnp.asarray(mask))
    assert float(jnp.abs(a - b).max()) <= 1e-6


def test_strict_loading_names_keys(pair, tmp_path):
    _, path, _, cfg = pair
    state = dict(hf.load_state_dict(path))
    state["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    del state["model.layers.1.mlp.up_proj.weight"]
    hf.save_pretrained(state, hf.read_config(path), tmp_path / "bad")
    with pytest.raises(UserError) as err:
        qwen2.load_pretrained(tmp_path / "bad")
    assert "missing keys [model.layers.1.mlp.up_proj.weight]" in str(err.value)
    assert "unexpected keys [model.layers.0.self_attn.extra.weight]" in str(err.value)

    state = dict(hf.load_state_dict(path))
    state["model.norm.weight"] = np.ones((3,), np.float32)
    hf.save_pretrained(state, hf.read_config(path), tmp_path / "shape")
    with pytest.raises(UserError, match="'model.norm.weight' has shape \\(3,\\)"):
        qwen2.load_pretrained(tmp_path / "shape")


def test_tied_checkpoint_may_store_lm_head(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_tied_head")
    ref = make_hf_qwen2(path, tied=True)
    state = dict(hf.load_state_dict(path))
    state["lm_head.weight"] = np.array(state["model.embed_tokens.weight"])
    hf.save_pretrained(state, hf.read_config(path), path / "with_head")
    model, cfg = qwen2.load_pretrained(path / "with_head")
    assert cfg.tie_word_embeddings
    ids, mask = padded_batch()
    ours, _ = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    diff = np.abs(np.asarray(ours) - hf_logits(ref, ids, mask))[mask.astype(bool)].max()
    assert diff <= 1e-4


def test_config_from_released_qwen25_json():
    # The shape of Qwen2.5-0.5B-Instruct's config.json (transformers 4.x era).
    released = {
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    cfg = qwen2.Qwen2Config.from_hf(released, dtype="bfloat16", remat=True)
    assert (cfg.head_dim, cfg.rope_theta, cfg.eos_token_id) == (64, 1e6, 151645)
    assert cfg.compute_dtype == jnp.bfloat16 and cfg.remat
    back = transformers.Qwen2Config(**json.loads(json.dumps(cfg.to_hf())))
    assert back.rope_parameters["rope_theta"] == 1e6
    assert (back.num_key_value_heads, back.head_dim, back.tie_word_embeddings) == (2, 64, True)
    assert qwen2.Qwen2Config.from_hf(cfg.to_hf(), dtype="bfloat16", remat=True) == cfg


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ({"hidden_act": "mish"}, "hidden_act"),
    ],
)
def test_config_rejects_unsupported(patch, message):
    with pytest.raises(UserError, match=message):
        qwen2.Qwen2Config.from_hf({**TINY, **patch})


def test_unknown_override_is_an_error():
    with pytest.raises(UserError, match="unknown Qwen2 config override"):
        qwen2.Qwen2Config.from_hf(TINY, hidden=3)


def test_bfloat16_compute_stays_close(untied):
    ref, path, _, _ = untied
    model, cfg = qwen2.load_pretrained(path, dtype="bfloat16")
    assert cfg.compute_dtype == jnp.bfloat16
    assert model.model.embed_tokens.embedding.get_value().dtype == jnp.float32  # params fp32
    ids, mask = padded_batch()
    ours, _ = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert ours.dtype == jnp.float32
    expected = hf_logits(ref, ids, mask)
    diff = np.abs(np.asarray(ours) - expected)[mask.astype(bool)].max()
    print(f"bf16 compute vs fp32 HF: {diff:.3f} (logit scale {np.abs(expected).max():.2f})")
    assert diff <= 0.05 * np.abs(expected).max()


def test_tied_logits_gradient_equals_autodiff():
    """``layers.tied_logits`` (custom backward) has the gradients of plain ``x @ table.T``."""
    from lib.models import layers

    emb = layers.embedding(50, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 8))
    w = jax.random.normal(jax.random.key(2), (3, 5, 50))

    graphdef, state = nnx.split(emb)

    def ours(x, table):
        fresh = nnx.merge(graphdef, jax.tree.map(lambda _: table, state))  # one leaf: the table
        return jnp.sum(layers.tied_logits(x, fresh) * w)

    def plain(x, table):
        return jnp.sum(jnp.dot(x, table.T) * w)

    table = emb.embedding[...]
    got = jax.grad(ours, argnums=(0, 1))(x, table)
    want = jax.grad(plain, argnums=(0, 1))(x, table)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layers.tied_logits(x, emb)),
                               np.asarray(emb.attend(x)), rtol=1e-6, atol=1e-6)
