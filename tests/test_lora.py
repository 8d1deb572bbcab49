"""LoRA: frozen base under the trainer, merge, PEFT export parity, target errors, GLM q/k/v."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx

from lib import hf, sharding, train
from lib.errors import UserError
from lib.models import glm, layers, lora, qwen2

VOCAB = 96
QWEN_TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rope_theta=10000.0, tie_word_embeddings=False,
)
TARGETS = ["q_proj", "v_proj"]
RANK, ALPHA = 4, 8.0


def _randomize(model: torch.nn.Module) -> None:
    """Nonzero biases and norms around 1: HF's 0 / 1 init would hide conversion mix-ups."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))


def _ids(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, size=(rows, 10)).astype(np.int32)


@nnx.jit
def _logits(model, ids):
    return model(ids)[0]


def _torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def _lm_loss(model, batch, rng):
    logits, _ = model(batch["input_ids"], batch["attention_mask"], rngs=nnx.Rngs(dropout=rng))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:])
    weight = batch["attention_mask"][:, 1:].astype(jnp.float32)
    return (ce * weight).sum() / weight.sum(), {}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny random HF Qwen2 (untied head) saved to disk."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN_TINY)).eval()
    _randomize(model)
    path = tmp_path_factory.mktemp("qwen2_lora")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(qwen_dir):
    """Our Qwen2 with LoRA on q/v, trained 4 steps by the trainer on a 1x2x2 mesh.

    Returns ``(model, frozen snapshot before training, initial adapters, state, losses)``.
    """
    model, _ = qwen2.load_pretrained(qwen_dir)
    replaced = lora.apply_lora(model, TARGETS, RANK, ALPHA, 0.0, nnx.Rngs(0))
    assert replaced == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in TARGETS]
    not_lora = nnx.All(nnx.Param, nnx.Not(lora.LoRAParam))
    base_before = {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(
        nnx.state(model, not_lora))}
    lora_before = {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(
        nnx.state(model, lora.LoRAParam))}

    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    tcfg = ml_collections.ConfigDict(dict(lr=1e-2, schedule="constant", weight_decay=0.0))
    schedule = train.make_schedule(tcfg, 4)
    tx = train.make_optimizer(tcfg, schedule)
    graphdef, state, state_sh, frozen, frozen_sh = train.init_state(
        model, tx, mesh, trainable=lora.LoRAParam
    )
    step = train.compile_step(graphdef, _lm_loss, tx, schedule, state_sh, frozen_sh, mesh,
                              grad_accum=1, seed=0)
    batch = {"input_ids": _ids(8), "attention_mask": np.ones((8, 10), np.int32)}
    losses = []
    for _ in range(4):
        state, metrics = step(state, frozen, sharding.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    trained_model = nnx.merge(graphdef, state["params"], frozen)
    return trained_model, base_before, lora_before, state, losses


def test_training_moves_only_adapters(trained):
    model, base_before, lora_before, state, losses = trained
    # The trainable state is the 8 adapter matrices (2 layers x q, v x a, b) and nothing else.
    param_paths = [p for p, _ in nnx.to_flat_state(nnx.State(state["params"]))]
    assert len(param_paths) == 8
    assert {p[-1] for p in param_paths} == {"lora_a", "lora_b"}
    # Adam keeps mu and nu per adapter; every other optimizer leaf is a scalar counter.
    param_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state["params"]))
    moments = sorted(np.shape(x) for x in jax.tree.leaves(state["train"]["opt_state"])
                     if np.ndim(x) > 0)
    assert moments == sorted(param_shapes * 2)
    # The base is bit-identical; every adapter matrix moved; the loss went down.
    not_lora = nnx.All(nnx.Param, nnx.Not(lora.LoRAParam))
    base_after = dict(nnx.to_flat_state(nnx.state(model, not_lora)))
    assert base_after.keys() == base_before.keys()
    for path, before in base_before.items():
        assert np.array_equal(np.asarray(base_after[path].get_value()), before), path
    for path, var in nnx.to_flat_state(nnx.state(model, lora.LoRAParam)):
        assert np.max(np.abs(np.asarray(var.get_value()) - lora_before[path])) > 1e-3, path
    assert losses[-1] < losses[0] - 0.05, losses
    # The adapters follow the base kernel's logical axes on the mesh (embed -> fsdp).
    q = state["params"]["model"]["layers"][0]["self_attn"]["q_proj"]
    assert q["lora_a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert q["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")


def test_merge_equals_adapter_model(trained, qwen_dir):
    model = trained[0]
    ids = _ids(3, seed=1)
    adapter_logits = np.asarray(_logits(model, ids))
    merged = lora.merge_lora(nnx.clone(model))
    merged_logits = np.asarray(_logits(merged, ids))
    assert np.max(np.abs(merged_logits - adapter_logits)) <= 1e-5
    # Merged, the model has the original parameter names again, so HF export is unchanged...
    assert hf.state_of(merged).keys() == hf.load_state_dict(qwen_dir).keys()
    # ...and the adapters really changed the function.
    base, _ = qwen2.load_pretrained(qwen_dir)
    assert np.max(np.abs(np.asarray(_logits(base, ids)) - adapter_logits)) > 1e-2


def test_peft_export_loads_in_peft(trained, qwen_dir, tmp_path):
    model = trained[0]
    out = lora.export_peft(model, tmp_path / "adapter", str(qwen_dir), TARGETS, RANK, ALPHA, 0.0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    tensors = hf.read_safetensors(out / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.self_attn.v_proj"
    assert tensors[f"{name}.lora_A.weight"].shape == (RANK, 64)  # [r, in]
    assert tensors[f"{name}.lora_B.weight"].shape == (32, RANK)  # [out, r]: 2 kv heads x 16

    ref = transformers.Qwen2ForCausalLM.from_pretrained(qwen_dir, attn_implementation="eager")
    adapted = peft.PeftModel.from_pretrained(ref, out).eval()
    loaded = peft.get_peft_model_state_dict(adapted)
    assert sorted(loaded) == sorted(tensors)
    ids = _ids(3, seed=2)
    diff = np.max(np.abs(_torch_logits(adapted, ids) - np.asarray(_logits(model, ids))))
    print(f"PEFT vs ours max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_target_errors(qwen_dir):
    model, _ = qwen2.load_pretrained(qwen_dir)
    with pytest.raises(UserError, match=r"'query_key_value' matches no Linear.*'q_proj'.*"
                                        r"split into q_proj, k_proj, v_proj"):
        lora.apply_lora(model, ["q_proj", "query_key_value"], RANK, ALPHA, 0.0, nnx.Rngs(0))
    # The failed call changed nothing.
    assert not lora.lora_modules(model)
    with pytest.raises(UserError, match="rank must be a positive integer"):
        lora.apply_lora(model, ["q_proj"], 0, ALPHA, 0.0, nnx.Rngs(0))
    lora.apply_lora(model, ["q_proj"], RANK, ALPHA, 0.0, nnx.Rngs(0))
    with pytest.raises(UserError, match="already have LoRA adapters"):
        lora.apply_lora(model, ["q_proj"], RANK, ALPHA, 0.0, nnx.Rngs(0))
    with pytest.raises(UserError, match="rank=8 but the model's adapters were built with rank=4"):
        lora.export_peft(model, "/nonexistent", "x", rank=8)


def test_dropout_applies_to_adapter_input_only():
    base = layers.dense(16, 8, ("embed", "heads"), rngs=nnx.Rngs(0))
    layer = lora.LoRALinear(base, 4, 8.0, 0.5, rngs=nnx.Rngs(1), init="gaussian")
    rng = np.random.default_rng(0)
    layer.lora_b.set_value(jnp.asarray(rng.normal(size=(4, 8)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)

    @nnx.jit
    def outputs(layer, x):
        """(deterministic, with dropout, both recomputed by hand) in one compile."""
        a, b, base_y = layer.lora_a[...], layer.lora_b[...], layer.base(x)
        dropped = layers.dropout(x, 0.5, nnx.Rngs(dropout=7))
        return (layer(x), layer(x, rngs=nnx.Rngs(dropout=7)),
                base_y + x @ a @ b * 2.0, base_y + dropped @ a @ b * 2.0)

    plain, noisy, plain_ref, noisy_ref = map(np.asarray, outputs(layer, x))
    assert np.max(np.abs(plain - plain_ref)) <= 1e-5  # rngs=None: deterministic
    assert np.max(np.abs(noisy - noisy_ref)) <= 1e-5  # the mask falls on the adapter input
    assert np.max(np.abs(noisy - plain)) > 0.1


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    """A tiny random HF GLM (GQA 4/2 heads, qkv bias) saved to disk."""
    torch.manual_seed(0)
    config = transformers.GlmConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, partial_rotary_factor=0.5,
        attention_bias=True, max_position_embeddings=128, pad_token_id=0, eos_token_id=2,
    )
    model = transformers.GlmForCausalLM(config).eval()
    _randomize(model)
    path = tmp_path_factory.mktemp("glm_lora")
    model.save_pretrained(path)
    return path


def test_glm_qkv_adapters(glm_dir, tmp_path):
    model, _ = glm.load_pretrained(glm_dir)
    ids = _ids(3, seed=3)
    before = np.asarray(_logits(model, ids))
    # A regex over full paths: q, k and v of the second layer only.
    replaced = lora.apply_lora(model, [r".*layers\.1\.self_attn\.[qkv]_proj"], RANK, ALPHA, 0.05,
                               nnx.Rngs(0))
    assert replaced == [f"model.layers.1.self_attn.{p}_proj" for p in "kqv"]
    # lora_b starts at zero: the adapted model computes what the base did.
    assert np.max(np.abs(np.asarray(_logits(model, ids)) - before)) <= 1e-6

    # Random adapters, then PEFT parity with the exact module list as target_modules.
    rng = np.random.default_rng(0)
    for module in lora.lora_modules(model).values():
        module.lora_b.set_value(jnp.asarray(rng.normal(0, 0.3, module.lora_b.shape), jnp.float32))
    ours = np.asarray(_logits(model, ids))
    assert np.max(np.abs(ours - before)) > 1e-2
    out = lora.export_peft(model, tmp_path / "adapter", str(glm_dir),
                           [r".*layers\.1\.self_attn\.[qkv]_proj"])
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == replaced
    ref = transformers.GlmForCausalLM.from_pretrained(glm_dir, attn_implementation="eager")
    adapted = peft.PeftModel.from_pretrained(ref, out).eval()
    diff = np.max(np.abs(_torch_logits(adapted, ids) - ours))
    print(f"GLM PEFT vs ours max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    merged = lora.merge_lora(model)
    assert np.max(np.abs(np.asarray(_logits(merged, ids)) - ours)) <= 1e-5


@nnx.jit
def _without_and_with_dropout(model, ids, key):
    return model(ids)[0], model(ids, rngs=nnx.Rngs(dropout=key))[0]


# Every projection each port has: attention, MLP and the LM head.
ALL_LINEARS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "lm_head"],
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"],
}


@pytest.mark.parametrize("family", ["qwen2", "glm"])
def test_adapter_dropout_inside_the_model(family, qwen_dir, glm_dir):
    """The model hands its ``rngs`` to every projection: with rngs each adapter's dropout is
    active (checked one projection kind at a time, the others' adapters at zero); without,
    the forward is deterministic and equals the merged model's."""
    if family == "qwen2":
        model, _ = qwen2.load_pretrained(qwen_dir)
    else:
        model, _ = glm.load_pretrained(glm_dir)
    targets = ALL_LINEARS[family]
    lora.apply_lora(model, targets, RANK, ALPHA, 0.5, nnx.Rngs(0))
    adapters = lora.lora_modules(model)
    rng = np.random.default_rng(0)
    b_values = {p: jnp.asarray(rng.normal(0, 0.3, m.lora_b.shape), jnp.float32)
                for p, m in adapters.items()}
    ids, key = _ids(2, seed=4), jax.random.key(3)

    def set_b(kind):
        """Adapters of projection ``kind`` (all when None) get their random B, others 0."""
        for path, module in adapters.items():
            on = kind is None or path.rsplit(".", 1)[-1] == kind
            module.lora_b.set_value(b_values[path] if on else jnp.zeros_like(b_values[path]))

    gaps = {}
    for kind in targets:
        set_b(kind)
        plain, noisy = map(np.asarray, _without_and_with_dropout(model, ids, key))
        gaps[kind] = float(np.abs(noisy - plain).max())
    print(f"{family} max |logit change| from adapter dropout: {gaps}")
    assert min(gaps.values()) > 0.5, gaps  # measured: >= 2.7 (Qwen2), >= 1.6 (GLM)
    # All adapters at zero: dropout (on the adapter input only) changes nothing.
    for module in adapters.values():
        module.lora_b.set_value(jnp.zeros_like(module.lora_b.get_value()))
    plain, noisy = map(np.asarray, _without_and_with_dropout(model, ids, key))
    assert np.abs(noisy - plain).max() == 0.0
    # No rngs: deterministic, the merged model's function.
    set_b(None)
    plain, _ = _without_and_with_dropout(model, ids, key)
    merged = np.asarray(_logits(lora.merge_lora(nnx.clone(model)), ids))
    assert np.abs(np.asarray(plain) - merged).max() <= 1e-4
