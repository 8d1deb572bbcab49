"""The port-parity harness: every decoder port against HF PyTorch on a tiny random model.

For each entry of ``PORTS``: a tiny random HF model (biases and norm weights randomized too) is
saved as safetensors, sharded safetensors and a PyTorch ``.bin``; the registry loads each
strictly (same weights); logits on a left-padded batch match HF within 1e-4; cached decoding
equals the full forward; greedy tokens equal HF ``generate``; the export reloads in
transformers with the same logits; LoRA adapters (targets in HF names) exported for PEFT give
the same logits under ``peft``; a p-tuning v2 prefix equal to the cached keys/values of earlier
tokens reproduces the full forward. A new port joins with one ``Entry``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from test_qwen2 import hf_logits, padded_batch

from lib import generate as gen
from lib import hf, models
from lib.models import lora
from lib.models.prefix import Prefix, PrefixLM, PrefixParam

VOCAB, PAD = 96, 0


@dataclasses.dataclass(frozen=True)
class Entry:
    """One port under test: the HF class, its tiny config, LoRA targets as a user writes them
    (HF module names) and the HF modules those select."""

    name: str
    hf_class: Callable
    hf_config: Callable[[], transformers.PretrainedConfig]
    lora_targets: tuple[str, ...]
    lora_modules: tuple[str, ...]


_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=PAD, bos_token_id=1, eos_token_id=2)

ENTRIES = [
    Entry("qwen2", transformers.Qwen2ForCausalLM,
          lambda: transformers.Qwen2Config(**_LLAMA, tie_word_embeddings=False,
                                           rope_theta=10000.0),
          ("q_proj", "v_proj"), ("self_attn.q_proj", "self_attn.v_proj")),
    Entry("llama", transformers.LlamaForCausalLM,
          lambda: transformers.LlamaConfig(**_LLAMA, tie_word_embeddings=False),
          ("q_proj", "v_proj", "down_proj"),
          ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")),
    Entry("llama-bias-tied", transformers.LlamaForCausalLM,
          lambda: transformers.LlamaConfig(**_LLAMA, tie_word_embeddings=True,
                                           attention_bias=True, mlp_bias=True, head_dim=8),
          ("o_proj",), ("self_attn.o_proj",)),
    Entry("glm", transformers.GlmForCausalLM,
          lambda: transformers.GlmConfig(**{**_LLAMA, "hidden_size": 32}, head_dim=8,
                                         partial_rotary_factor=0.5),
          ("q_proj", "k_proj"), ("self_attn.q_proj", "self_attn.k_proj")),
    Entry("gpt2", transformers.GPT2LMHeadModel,
          lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                          n_positions=64, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=PAD),
          ("c_attn", "c_fc"), ("attn.c_attn", "mlp.c_fc")),
]
FORMATS = ("safetensors", "sharded", "bin")


def _randomize(model: torch.nn.Module) -> None:
    """HF initializes biases to 0 and norms to 1, which would hide a mix-up in conversion;
    weights of std 0.15 (not 0.02) give logits far from ties, so greedy decoding varies."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name or ".ln_" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.15)


_BUILT: dict[str, tuple] = {}


def _save_tokenizer(directory) -> None:
    """A BERT ``vocab.txt`` tokenizer of ``VOCAB`` tokens (what GPT-2 Chinese ships)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(0x4E00 + i) for i in range(VOCAB - len(vocab))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizer.from_pretrained(directory).save_pretrained(directory)


def _build(entry: Entry, tmp_path_factory) -> tuple:
    """(HF model, {format: directory}, our model, our config, port), made once per entry."""
    if entry.name not in _BUILT:
        torch.manual_seed(0)
        ref = entry.hf_class(entry.hf_config()).eval()
        _randomize(ref)
        dirs = {fmt: tmp_path_factory.mktemp(f"{entry.name}_{fmt}") for fmt in FORMATS}
        ref.save_pretrained(dirs["safetensors"])
        ref.save_pretrained(dirs["sharded"], max_shard_size="40KB")
        ref.config.save_pretrained(dirs["bin"])
        torch.save(ref.state_dict(), dirs["bin"] / "pytorch_model.bin")
        _save_tokenizer(dirs["safetensors"])
        ref.config._attn_implementation = "eager"
        port = models.port_of_dir(dirs["safetensors"])
        model, cfg = port.load(dirs["safetensors"], "causal_lm", dtype="float32", remat=False)
        _BUILT[entry.name] = (ref, dirs, model, cfg, port)
    return _BUILT[entry.name]


@pytest.fixture(params=ENTRIES, ids=[e.name for e in ENTRIES])
def built(request, tmp_path_factory):
    return (request.param, *_build(request.param, tmp_path_factory))


@nnx.jit
def _fwd(model, ids, mask=None, positions=None, cache=None, prefix=None):
    return model(ids, mask, positions, cache, prefix=prefix)


def _diff(a, b, mask) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


def test_every_format_loads_strictly_withhf_logits(built):
    entry, ref, dirs, model, cfg, port = built
    ids, mask = padded_batch()
    logits, cache = _fwd(model, ids, mask)
    assert cache is None and logits.dtype == jnp.float32
    diff = _diff(logits, hf_logits(ref, ids, mask), mask)
    print(f"{entry.name}: max |logit diff| vs HF {diff:.2e}")
    assert diff <= 1e-4
    ours = hf.state_of(model)
    for fmt in ("sharded", "bin"):
        if fmt == "sharded":
            assert (dirs[fmt] / "model.safetensors.index.json").is_file()
        other, other_cfg = port.load(dirs[fmt], "causal_lm", dtype="float32", remat=False)
        assert other_cfg == cfg
        again = hf.state_of(other)
        assert sorted(again) == sorted(ours)
        assert all(np.array_equal(again[k], ours[k]) for k in ours), fmt


def test_cached_decoding_equals_full_forward(built):
    _, _, _, model, _, _ = built
    ids, mask = padded_batch()
    full, _ = _fwd(model, ids, mask)
    cache = model.init_cache(3, 16)
    for start, end in [(0, 9), (9, 10), (10, 11), (11, 12)]:
        step, cache = _fwd(model, ids[:, start:end], mask[:, start:end], cache=cache)
        assert _diff(step, full[:, start:end], mask[:, start:end]) <= 1e-5, (start, end)


def test_greedy_tokens_equal_hf_generate(built):
    entry, ref, _, model, _, _ = built
    ids, mask = padded_batch()
    ours = gen.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD)
    unused = next(i for i in range(VOCAB) if i not in ours)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(mask), max_new_tokens=12,
                              do_sample=False, pad_token_id=PAD, eos_token_id=unused)
    np.testing.assert_array_equal(ours, theirs[:, ids.shape[1]:].numpy())
    assert len(set(ours[0].tolist())) > 3, entry.name  # a real continuation


def test_export_reloads_in_transformers(built, tmp_path):
    entry, ref, _, model, cfg, port = built
    port.export(model, cfg, tmp_path, None)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == ref.config.model_type
    back = entry.hf_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = padded_batch()
    assert _diff(hf_logits(back, ids, mask), hf_logits(ref, ids, mask), mask) <= 1e-5


def test_lora_adapter_loads_in_peft(built, tmp_path):
    entry, ref, dirs, _, _, _ = built
    model_cfg = ml_collections.ConfigDict({
        "path": str(dirs["safetensors"]), "dtype": "float32", "remat": False,
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": entry.lora_targets,
                 "export": "adapter"},
    })
    b = models.build(model_cfg, head="causal_lm")
    assert b.trainable is lora.LoRAParam and b.port is models.port_of_dir(model_cfg.path)
    adapted = lora.lora_modules(b.model)
    # Every layer's selected modules, named the HF way.
    layers = b.config.num_hidden_layers
    hf_paths = sorted(b.port.hf_name(p) for p in adapted)
    assert len(hf_paths) == layers * len(entry.lora_modules)
    assert {".".join(p.split(".")[3:]) for p in hf_paths} == set(entry.lora_modules)
    rng = np.random.default_rng(0)
    for module in adapted.values():
        module.lora_b.set_value(jnp.asarray(rng.normal(0, 0.3, module.lora_b.shape), jnp.float32))
    ids, mask = padded_batch()
    ours, _ = _fwd(b.model, ids, mask)
    assert _diff(ours, hf_logits(ref, ids, mask), mask) > 1e-2  # the adapters matter

    models.export(b, b.model, tmp_path, model_cfg)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == sorted(entry.lora_targets)
    base = entry.hf_class.from_pretrained(dirs["safetensors"], attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(base.eval(), tmp_path).eval()
    diff = _diff(hf_logits(with_adapter, ids, mask), ours, mask)
    print(f"{entry.name}: PEFT adapter vs ours {diff:.2e}")
    assert diff <= 1e-5


def test_prefix_equals_cached_keys_of_earlier_tokens(built):
    """p-tuning v2: the cached k/v of the first n tokens, given as the prefix, reproduce the
    full forward of the remaining tokens at positions n.. (learned or rotary positions)."""
    _, _, _, model, _, _ = built
    n, total = 5, 9
    ids = np.random.RandomState(2).randint(3, VOCAB, size=(2, total)).astype(np.int32)
    ids[1, :n] = ids[0, :n]
    ones = np.ones_like(ids)
    full, _ = _fwd(model, ids, ones)
    _, cache = _fwd(model, ids[:, :n], ones[:, :n], cache=model.init_cache(2, total))
    prefix = Prefix(k=cache.k[:, :1, :n], v=cache.v[:, :1, :n])
    positions = jnp.broadcast_to(jnp.arange(n, total), (2, total - n))
    rest, _ = _fwd(model, ids[:, n:], positions=positions, prefix=prefix)
    assert float(jnp.abs(rest - full[:, n:]).max()) <= 1e-5
    alone, _ = _fwd(model, ids[:, n:], positions=positions)
    assert float(jnp.abs(alone - full[:, n:]).max()) > 1e-2


def test_registry_knows_every_entry(built):
    entry, ref, *_ = built
    assert models.port(ref.config.model_type).heads == ("causal_lm",)
    with pytest.raises(models.UserError, match="has no port"):
        models.port("not-a-model")
    assert jax.tree.leaves(nnx.state(_BUILT[entry.name][2], nnx.Param))


def test_prefix_tuning_through_the_registry(built, tmp_path):
    """``model.prefix.length > 0``: the registry wraps the port in a ``PrefixLM`` whose prefix
    is all that trains; the export is the unchanged base plus the prefix encoder."""
    entry, ref, dirs, _, _, _ = built
    model_cfg = ml_collections.ConfigDict({
        "path": str(dirs["safetensors"]), "dtype": "float32", "remat": False,
        "lora": {"rank": 0}, "prefix": {"length": 3, "projection": False, "hidden_size": 0,
                                        "dropout": 0.0},
    })
    b = models.build(model_cfg, head="causal_lm")
    assert b.trainable is PrefixParam and isinstance(b.model, PrefixLM)
    trained = nnx.state(b.model, PrefixParam)
    assert [p for p, _ in nnx.to_flat_state(trained)] == [("prefix_encoder", "embedding",
                                                          "embedding")]
    ids, mask = padded_batch()
    with_prefix, _ = _fwd(b.model, ids, mask)
    assert _diff(with_prefix, hf_logits(ref, ids, mask), mask) > 1e-2  # the prefix matters
    tokens = gen.generate(b.model, ids, mask, max_new_tokens=4, eos_token_id=[],
                          pad_token_id=PAD)
    assert tokens.shape == (3, 4)

    models.export(b, b.model, tmp_path, model_cfg)
    saved = hf.read_safetensors(tmp_path / "prefix_encoder.safetensors")
    assert list(saved) == ["transformer.prefix_encoder.embedding.weight"]
    assert saved["transformer.prefix_encoder.embedding.weight"].shape == (
        3, 2 * b.config.num_hidden_layers * b.config.num_key_value_heads * b.config.head_dim)
    back = entry.hf_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert _diff(hf_logits(back, ids, mask), hf_logits(ref, ids, mask), mask) <= 1e-5
