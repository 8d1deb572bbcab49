"""LoRA export in THUDM's ChatGLM2/3 naming: q/k/v adapters fused into one query_key_value.

THUDM's ChatGLM2 model is remote code from the Hub, which cannot be fetched here. The reference
is therefore the exported adapter applied by hand in numpy (PEFT's rule
``W += lora_alpha / r * B @ A``) to a ChatGLM-named checkpoint whose fused layouts are written
out independently of ``lib.models.glm``, then loaded through our ChatGLM loader: its logits must
be our LoRA model's. PEFT itself loads the adapter onto a bare torch tree of ChatGLM's Linear
layers, which checks that the numpy rule, the names and ``target_modules`` are PEFT's.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from test_glm import CHATGLM2_CONFIG, HEAD_DIM, HEADS, KV, LAYERS, VOCAB, chatglm_state

from lib import hf, models
from lib.errors import UserError
from lib.models import glm, lora, qwen2

RANK, ALPHA = 4, 8.0
PREFIX = "base_model.model."
LAYER = "transformer.encoder.layers."


def _write_chatglm(path, state: dict[str, np.ndarray], config: dict):
    path.mkdir(parents=True)
    hf.write_safetensors(state, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def chatglm_dirs(tmp_path_factory):
    """``multi_query -> (dir, state)``: tiny random ChatGLM2 checkpoints made from an HF GLM,
    multi-query (4 heads, 2 groups) and plain multi-head (``multi_query_attention: false``,
    whose qkv rows are interleaved per head)."""
    out = {}
    for multi_query in (True, False):
        torch.manual_seed(0)
        model = transformers.GlmForCausalLM(transformers.GlmConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV if multi_query else HEADS,
            head_dim=HEAD_DIM, partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0,
        ))
        with torch.no_grad():  # std 0.2 and norms around 1: O(1) logits
            for name, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
        sd = {k: v.numpy() for k, v in model.state_dict().items()}
        state = chatglm_state(sd, multi_query)
        config = {**CHATGLM2_CONFIG, "multi_query_attention": multi_query}
        root = tmp_path_factory.mktemp("chatglm")
        out[multi_query] = _write_chatglm(root / "base", state, config), state
    return out


@nnx.jit
def _logits(model, ids):
    return model(ids)[0]


IDS = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, size=(2, 10)), jnp.int32)


def _apply_by_hand(state: dict, adapter_dir) -> dict:
    """PEFT's merge in numpy: ``W += lora_alpha / r * B @ A`` for every adapted module."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = hf.read_safetensors(adapter_dir / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    merged = dict(state)
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            a = tensors[key].astype(np.float64)
            b = tensors[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
            merged[f"{module}.weight"] = (state[f"{module}.weight"] + scale * b @ a).astype(
                np.float32
            )
    return merged


class _ChatGLMTree(torch.nn.Module):
    """The Linear layers of THUDM's ChatGLM2 under their names: all PEFT needs to inject and
    load a LoRA adapter (the forward pass is the remote code we cannot run)."""

    def __init__(self, state: dict[str, np.ndarray]):
        super().__init__()
        for key, value in state.items():
            if value.ndim != 2 or "word_embeddings" in key:
                continue
            *parents, name, _ = key.split(".")
            node = self
            for part in parents:
                if not hasattr(node, part):
                    node.add_module(part, torch.nn.Module())
                node = getattr(node, part)
            bias = key.replace(".weight", ".bias")
            linear = torch.nn.Linear(value.shape[1], value.shape[0], bias=bias in state)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(value))
                if bias in state:
                    linear.bias.copy_(torch.from_numpy(state[bias]))
            node.add_module(name, linear)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's causal-LM wrapper asks
        raise NotImplementedError


def _check_with_peft(state: dict, adapter_dir, merged: dict, exported: set[str]) -> None:
    """PEFT wraps exactly the exported modules and merges them into ``merged``'s weights."""
    model = peft.PeftModel.from_pretrained(_ChatGLMTree(state), adapter_dir)
    wrapped = {n[len(PREFIX) :] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == exported
    for key, value in model.merge_and_unload().state_dict().items():
        np.testing.assert_allclose(value.numpy(), merged[key], atol=1e-6, err_msg=key)


CASES = {
    # The chatglm2-6b-lora setup, exported through the task's export (the wired call site).
    "qkv-multi-query": (True, ["q_proj", "k_proj", "v_proj"]),
    "attention-and-mlp-multi-head": (
        False, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
    # q and v only (k is a zero block), one layer's down_proj and the LM head: rank 2r, the
    # unfused modules zero-padded to it, and target_modules as exact paths.
    "qv-down1-head-multi-query": (True, ["q_proj", "v_proj", r".*layers\.1\.mlp\.down_proj",
                                         "lm_head"]),
}
EXPECTED = {
    "qkv-multi-query": (3, ["query_key_value"]),
    "attention-and-mlp-multi-head": (
        3, ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    ),
    "qv-down1-head-multi-query": (2, [
        f"{LAYER}0.self_attention.query_key_value",
        f"{LAYER}1.mlp.dense_4h_to_h",
        f"{LAYER}1.self_attention.query_key_value",
        "transformer.output_layer",
    ]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chatglm_named_export_is_exact(case, chatglm_dirs, tmp_path):
    multi_query, targets = CASES[case]
    base_dir, state = chatglm_dirs[multi_query]
    model, config = glm.load_pretrained(base_dir)
    assert config.num_key_value_heads == (KV if multi_query else HEADS)
    before = np.asarray(_logits(model, IDS))
    lora.apply_lora(model, targets, RANK, ALPHA, 0.05, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for module in lora.lora_modules(model).values():
        module.lora_b.set_value(jnp.asarray(rng.normal(0, 0.3, module.lora_b.shape), jnp.float32))
    ours = np.asarray(_logits(model, IDS))
    assert np.abs(ours - before).max() > 0.1  # the adapters matter

    out = tmp_path / "adapter"
    if case == "qkv-multi-query":
        # What a task's --mode=export does for a LoRA run on a ChatGLM base.
        model_cfg = ml_collections.ConfigDict({
            "path": str(base_dir), "hub_id": "THUDM/chatglm2-6b", "lora": {"targets": targets},
        })
        built = models.Built(model, None, lora.LoRAParam, model.config, models.port("chatglm"))
        models.export(built, model, out, model_cfg)
    else:
        lora.export_peft(model, out, str(base_dir), base_config=hf.read_config(base_dir))

    # (2) The config: rank and alpha grow by the fused factor, the scaling stays alpha / r.
    factor, target_modules = EXPECTED[case]
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["r"] == factor * RANK
    assert written["lora_alpha"] == factor * ALPHA
    assert written["target_modules"] == target_modules
    assert written["lora_dropout"] == 0.05
    tensors = hf.read_safetensors(out / "adapter_model.safetensors")
    exported = {k[len(PREFIX) : -len(".lora_A.weight")] for k in tensors if "lora_A" in k}
    assert len(tensors) == 2 * len(exported)
    for module in exported:
        out_features, in_features = state[f"{module}.weight"].shape
        assert tensors[f"{PREFIX}{module}.lora_A.weight"].shape == (factor * RANK, in_features)
        assert tensors[f"{PREFIX}{module}.lora_B.weight"].shape == (out_features, factor * RANK)

    # (1) The adapter applied by hand to the ChatGLM checkpoint gives our LoRA model's logits.
    merged = _apply_by_hand(state, out)
    reloaded, _ = glm.load_pretrained(_write_chatglm(tmp_path / "merged", merged,
                                                     hf.read_config(base_dir)))
    diff = np.abs(np.asarray(_logits(reloaded, IDS)) - ours).max()
    print(f"{case}: max |logit diff| ChatGLM-named adapter vs ours = {diff:.1e}")
    assert diff <= 1e-5
    _check_with_peft(state, out, merged, exported)


def test_qkv_blocks_of_a_partial_adapter(chatglm_dirs, tmp_path):
    """With q and v adapted, A is ``[a_q; a_v]`` and B has b_q in the q rows of the first r
    columns, b_v in the v rows of the last r, and zeros in every k row."""
    base_dir, _ = chatglm_dirs[True]
    model, _ = glm.load_pretrained(base_dir)
    lora.apply_lora(model, ["q_proj", "v_proj"], RANK, ALPHA, 0.0, nnx.Rngs(0))
    adapters = lora.lora_modules(model)
    for module in adapters.values():
        module.lora_b.set_value(jnp.ones(module.lora_b.shape, jnp.float32))
    out = lora.export_peft(model, tmp_path / "a", "x", base_config=hf.read_config(base_dir))
    tensors = hf.read_safetensors(out / "adapter_model.safetensors")
    name = f"{PREFIX}{LAYER}1.self_attention.query_key_value"
    a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
    a_q = np.asarray(adapters["model.layers.1.self_attn.q_proj"].lora_a[...])
    a_v = np.asarray(adapters["model.layers.1.self_attn.v_proj"].lora_a[...])
    np.testing.assert_array_equal(a, np.concatenate([a_q.T, a_v.T]))
    q, k = HEADS * HEAD_DIM, KV * HEAD_DIM
    expected = np.zeros(((HEADS + 2 * KV) * HEAD_DIM, 2 * RANK), np.float32)
    expected[:q, :RANK] = 1.0
    expected[q + k :, RANK:] = 1.0
    np.testing.assert_array_equal(b, expected)


def test_chatglm_base_needs_a_glm_model(tmp_path):
    model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    ), rngs=nnx.Rngs(0))
    lora.apply_lora(model, ["q_proj"], RANK, ALPHA, 0.0, nnx.Rngs(0))
    with pytest.raises(UserError, match="needs a lib.models.glm model, got Qwen2ForCausalLM"):
        lora.export_peft(model, tmp_path, "x", base_config=CHATGLM2_CONFIG)
