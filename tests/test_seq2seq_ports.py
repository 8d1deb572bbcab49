"""The encoder-decoder parity harness: T5 v1.0, T5 v1.1, mT5 and Pegasus against HF PyTorch on
tiny random models.

For each entry: a tiny random HF model (norm weights, biases, the relative-position tables and
Pegasus's ``final_logits_bias`` randomized too; v1.1/mT5 with a head separate from the
embedding) saved as safetensors and as a PyTorch ``.bin`` holding every tied copy; the
registry loads both strictly (same weights); teacher-forced logits with padding in the encoder
and decoder inputs match HF within 1e-4; decoding step by step with the cache equals the full
forward (also after ``select`` reorders rows); a greedy loop on ``encode``/``init_cache``/
``decode`` gives HF ``generate``'s tokens; the export reloads in transformers with the same
logits; LoRA on q/v exported as a PEFT ``SEQ_2_SEQ_LM`` adapter gives our logits under ``peft``.
A new encoder-decoder port joins with one ``Entry``.
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
from test_ports import _randomize

from lib import hf, models
from lib.errors import UserError
from lib.models import layers, lora

VOCAB, PAD, EOS, START = 96, 0, 1, 0


@dataclasses.dataclass(frozen=True)
class Entry:
    """One encoder-decoder under test: the HF class, its tiny config, whether its head is
    separate from the embedding, LoRA targets as a user writes them (HF module names) and the
    HF modules (relative to an encoder / a decoder block) they must select."""

    name: str
    hf_class: Callable
    hf_config: Callable[[], transformers.PretrainedConfig]
    separate_head: bool
    lora_targets: tuple[str, ...]
    encoder_modules: tuple[str, ...]
    decoder_modules: tuple[str, ...]


# Few buckets and a short max distance, so that the short test inputs reach the logarithmic
# buckets and the shared last one.
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
           num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
           pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START)
_PEGASUS = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                decoder_ffn_dim=48, max_position_embeddings=64, scale_embedding=True,
                pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START)
_T5_LORA = (("q", "v"), ("layer.0.SelfAttention.q", "layer.0.SelfAttention.v"),
            ("layer.0.SelfAttention.q", "layer.0.SelfAttention.v",
             "layer.1.EncDecAttention.q", "layer.1.EncDecAttention.v"))
_PEGASUS_LORA = (("q_proj", "v_proj"), ("self_attn.q_proj", "self_attn.v_proj"),
                 ("self_attn.q_proj", "self_attn.v_proj", "encoder_attn.q_proj",
                  "encoder_attn.v_proj"))

ENTRIES = [
    Entry("t5", transformers.T5ForConditionalGeneration,
          lambda: transformers.T5Config(**_T5, feed_forward_proj="relu"), False, *_T5_LORA),
    Entry("t5-v1.1", transformers.T5ForConditionalGeneration,
          lambda: transformers.T5Config(**_T5, feed_forward_proj="gated-gelu",
                                        tie_word_embeddings=False), True, *_T5_LORA),
    Entry("mt5", transformers.MT5ForConditionalGeneration,
          lambda: transformers.MT5Config(**_T5), True, *_T5_LORA),
    # A random tied Pegasus repeats its input token whatever the context, which would make
    # the greedy comparison vacuous: the entry has its own head, the tied head is checked by
    # test_tied_pegasus_matches_hf.
    Entry("pegasus", transformers.PegasusForConditionalGeneration,
          lambda: transformers.PegasusConfig(**_PEGASUS),
          True, *_PEGASUS_LORA),
]
FORMATS = ("safetensors", "bin")


def _randomize_seq2seq(ref: torch.nn.Module, separate_head: bool) -> None:
    """``_randomize`` plus what it leaves at HF's init: the relative-position tables (wider,
    so the buckets matter), Pegasus's ``final_logits_bias`` buffer, and a head of its own where
    the family has one (transformers ties it until a checkpoint says otherwise)."""
    _randomize(ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
            elif "embed_positions" in name:  # fixed sinusoids, not weights
                p.copy_(ref.get_submodule(name.rsplit(".", 1)[0]).create_weight())
        if hasattr(ref, "final_logits_bias"):
            ref.final_logits_bias.normal_(0.0, 0.5)
            # Pegasus embeds padding as zeros (padding_idx), as HF initializes it.
            ref.get_input_embeddings().weight[PAD] = 0.0
        if separate_head:
            ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.lm_head.weight) * 0.15)


def _save_tokenizer(directory) -> None:
    """A BERT ``vocab.txt`` of ``VOCAB`` tokens laid out as the Chinese seq2seq checkpoints':
    ``[PAD]`` 0, ``[unused1]`` 1 (Randeng's ``</s>``), ``[UNK]``, ``[CLS]``, ``[SEP]``."""
    vocab = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(0x4E00 + i) for i in range(VOCAB - len(vocab))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")


_BUILT: dict[str, tuple] = {}


def _build(entry: Entry, tmp_path_factory) -> tuple:
    """(HF model, {format: directory}, our model, our config, port), made once per entry."""
    if entry.name not in _BUILT:
        torch.manual_seed(0)
        ref = entry.hf_class(entry.hf_config()).eval()
        _randomize_seq2seq(ref, entry.separate_head)
        assert (ref.lm_head.weight is ref.get_input_embeddings().weight) != entry.separate_head
        dirs = {fmt: tmp_path_factory.mktemp(f"{entry.name}_{fmt}") for fmt in FORMATS}
        ref.save_pretrained(dirs["safetensors"])
        ref.config.save_pretrained(dirs["bin"])
        # Every tied copy (encoder/decoder embed_tokens, a tied lm_head) is in the state dict.
        torch.save(ref.state_dict(), dirs["bin"] / "pytorch_model.bin")
        _save_tokenizer(dirs["safetensors"])
        ref.config._attn_implementation = "eager"
        port = models.port_of_dir(dirs["safetensors"])
        model, cfg = port.load(dirs["safetensors"], "seq2seq_lm", dtype="float32", remat=False)
        _BUILT[entry.name] = (ref, dirs, model, cfg, port)
    return _BUILT[entry.name]


@pytest.fixture(params=ENTRIES, ids=[e.name for e in ENTRIES])
def built(request, tmp_path_factory):
    return (request.param, *_build(request.param, tmp_path_factory))


def padded_batch():
    """Encoder inputs of 10, 7 and 4 real tokens and decoder inputs (from the start token) of
    6, 4 and 2, both padded on the right."""
    rs = np.random.RandomState(3)
    ids = rs.randint(2, VOCAB, (3, 10)).astype(np.int32)
    mask = (np.arange(10)[None] < np.array([[10], [7], [4]])).astype(np.int32)
    dec = rs.randint(2, VOCAB, (3, 6)).astype(np.int32)
    dec[:, 0] = START
    dec_mask = (np.arange(6)[None] < np.array([[6], [4], [2]])).astype(np.int32)
    return ids * mask, mask, dec * dec_mask, dec_mask


def hf_logits(ref, ids, mask, dec, dec_mask=None) -> np.ndarray:
    t = lambda a: None if a is None else torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        return ref(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                   decoder_attention_mask=t(dec_mask)).logits.numpy()


@nnx.jit
def _fwd(model, ids, mask, dec, dec_mask=None):
    return model(ids, mask, dec, dec_mask)


@nnx.jit
def _encode(model, ids, mask):
    return model.encode(ids, mask)


@nnx.jit(static_argnums=3)
def _init_cache(model, encoded, mask, slots):
    return model.init_cache(encoded, mask, slots)


@nnx.jit
def _decode(model, dec, cache):
    return model.decode(dec, cache)


def _diff(a, b, mask) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


def test_every_format_loads_strictly_with_hf_logits(built):
    entry, ref, dirs, model, cfg, port = built
    assert cfg.is_encoder_decoder and cfg.tie_word_embeddings != entry.separate_head
    ids, mask, dec, dec_mask = padded_batch()
    logits = _fwd(model, ids, mask, dec, dec_mask)
    assert logits.dtype == jnp.float32 and logits.shape == (3, 6, VOCAB)
    diff = _diff(logits, hf_logits(ref, ids, mask, dec, dec_mask), dec_mask)
    print(f"{entry.name}: max |logit diff| vs HF {diff:.2e}")
    assert diff <= 1e-4
    other, other_cfg = port.load(dirs["bin"], "seq2seq_lm", dtype="float32", remat=False)
    assert other_cfg == cfg
    ours, again = hf.state_of(model), hf.state_of(other)
    assert sorted(again) == sorted(ours)
    assert all(np.array_equal(again[k], ours[k]) for k in ours)


def test_cached_decoding_equals_full_forward(built):
    """Prefill three tokens, then one at a time; after two steps ``select`` repeats and
    reorders the rows, which must then continue as those rows' full forward."""
    _, _, _, model, _, _ = built
    ids, mask, dec, _ = padded_batch()
    dec = np.random.RandomState(4).randint(2, VOCAB, (3, 7)).astype(np.int32)
    full = _fwd(model, ids, mask, dec)
    cache = _init_cache(model, _encode(model, ids, mask), mask, 10)  # as _greedy: one compile
    rows = jnp.array([2, 2, 0])
    for start, end in [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]:
        if start == 5:
            cache, full, dec = cache.select(rows), full[rows], dec[np.asarray(rows)]
        step, cache = _decode(model, dec[:, start:end], cache)
        diff = float(jnp.abs(step - full[:, start:end]).max())
        assert diff <= 1e-5, (start, end, diff)
    assert int(cache.self_attn.index) == 7


def _greedy(model, ids, mask, steps: int) -> np.ndarray:
    """Greedy decoding written directly on the interface: encode once, then one token per
    ``decode`` call from the decoder start token."""
    cache = _init_cache(model, _encode(model, ids, mask), mask, steps)
    token = jnp.full((ids.shape[0], 1), model.config.decoder_start_token_id, jnp.int32)
    out = [token]
    for _ in range(steps):
        logits, cache = _decode(model, token, cache)
        token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
        out.append(token)
    return np.asarray(jnp.concatenate(out, axis=1))


def test_greedy_tokens_equal_hf_generate(built):
    entry, ref, _, model, _, _ = built
    ids, mask, _, _ = padded_batch()
    ours = _greedy(model, ids, mask, 10)
    unused = next(i for i in range(2, VOCAB) if i not in ours)
    ref.generation_config.forced_eos_token_id = None
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(mask), max_new_tokens=10,
                              num_beams=1, do_sample=False, pad_token_id=PAD,
                              eos_token_id=unused, decoder_start_token_id=START,
                              use_cache=False)
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert len(np.unique(ours[:, 1:])) > 4, entry.name  # real continuations


def test_export_reloads_in_transformers(built, tmp_path):
    entry, ref, _, model, cfg, port = built
    port.export(model, cfg, tmp_path, None)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == ref.config.model_type
    back = entry.hf_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert (back.lm_head.weight is back.get_input_embeddings().weight) != entry.separate_head
    ids, mask, dec, dec_mask = padded_batch()
    diff = _diff(hf_logits(back, ids, mask, dec, dec_mask),
                 hf_logits(ref, ids, mask, dec, dec_mask), dec_mask)
    print(f"{entry.name}: export reload vs HF {diff:.2e}")
    assert diff <= 1e-5
    again, again_cfg = port.load(tmp_path, "seq2seq_lm", dtype="float32", remat=False)
    assert again_cfg == cfg


def test_lora_adapter_loads_in_peft(built, tmp_path):
    entry, ref, dirs, _, _, _ = built
    model_cfg = ml_collections.ConfigDict({
        "path": str(dirs["safetensors"]), "dtype": "float32", "remat": False,
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": entry.lora_targets,
                 "export": "adapter"},
    })
    b = models.build(model_cfg, head="seq2seq_lm")
    assert b.trainable is lora.LoRAParam
    hf_paths = sorted(b.port.hf_name(p) for p in lora.lora_modules(b.model))
    selected = {(p.split(".block." if ".block." in p else ".layers.")[0].split(".")[-1],
                 ".".join(p.split(".")[3 if p.startswith(("encoder", "decoder")) else 4:]))
                for p in hf_paths}
    assert selected == ({("encoder", m) for m in entry.encoder_modules}
                        | {("decoder", m) for m in entry.decoder_modules})
    assert len(hf_paths) == (b.config.num_encoder_layers * len(entry.encoder_modules)
                             + b.config.num_decoder_layers * len(entry.decoder_modules))
    rng = np.random.default_rng(0)
    for module in lora.lora_modules(b.model).values():
        module.lora_b.set_value(jnp.asarray(rng.normal(0, 0.3, module.lora_b.shape), jnp.float32))
    ids, mask, dec, dec_mask = padded_batch()
    ours = _fwd(b.model, ids, mask, dec, dec_mask)
    assert _diff(ours, hf_logits(ref, ids, mask, dec, dec_mask), dec_mask) > 1e-2

    models.export(b, b.model, tmp_path, model_cfg)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_2_SEQ_LM"
    assert sorted(written["target_modules"]) == sorted(entry.lora_targets)
    base = entry.hf_class.from_pretrained(dirs["safetensors"], attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(base.eval(), tmp_path).eval()
    diff = _diff(hf_logits(with_adapter, ids, mask, dec, dec_mask), ours, dec_mask)
    print(f"{entry.name}: PEFT adapter vs ours {diff:.2e}")
    assert diff <= 1e-5


def test_registry_knows_every_entry(built):
    entry, ref, *_ = built
    assert models.port(ref.config.model_type).heads == ("seq2seq_lm",)
    assert jax.tree.leaves(nnx.state(_BUILT[entry.name][2], nnx.Param))


def test_position_helpers_equal_hf():
    """T5's buckets (both directions, several bucket counts) and Pegasus's sinusoidal table
    equal HF's, integer for integer and float for float."""
    from transformers.models.pegasus.modeling_pegasus import PegasusSinusoidalPositionalEmbedding
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-700, 700)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12), (64, 256)):
            ours = layers.relative_position_bucket(
                jnp.asarray(relative, jnp.int32), bidirectional=bidirectional,
                num_buckets=buckets, max_distance=distance)
            theirs = T5Attention._relative_position_bucket(
                torch.tensor(relative), bidirectional, buckets, distance)
            np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
    for n, dim in ((64, 32), (40, 7)):
        table = PegasusSinusoidalPositionalEmbedding(n, dim).create_weight().numpy()
        np.testing.assert_array_equal(layers.sinusoidal_table(n, dim), table)


def test_tied_pegasus_matches_hf(tmp_path):
    """Pegasus as Randeng ships it: the head tied to the shared embedding; a ``.bin`` with
    every tied copy (encoder/decoder ``embed_tokens``, ``lm_head``) and the position tables."""
    torch.manual_seed(1)
    ref = transformers.PegasusForConditionalGeneration(
        transformers.PegasusConfig(**_PEGASUS, attn_implementation="eager")).eval()
    _randomize_seq2seq(ref, separate_head=False)
    assert ref.lm_head.weight is ref.model.shared.weight
    ref.config.save_pretrained(tmp_path)
    state = ref.state_dict()
    assert {"lm_head.weight", "model.encoder.embed_tokens.weight",
            "model.decoder.embed_positions.weight"} <= set(state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, cfg = models.port_of_dir(tmp_path).load(tmp_path, "seq2seq_lm", dtype="float32",
                                                   remat=False)
    assert cfg.tie_word_embeddings and cfg.final_logits_bias and cfg.scale_embedding
    ids, mask, dec, dec_mask = padded_batch()
    diff = _diff(_fwd(model, ids, mask, dec, dec_mask),
                 hf_logits(ref, ids, mask, dec, dec_mask), dec_mask)
    print(f"pegasus (tied): max |logit diff| vs HF {diff:.2e}")
    assert diff <= 1e-4


def test_bad_checkpoints_name_the_problem(tmp_path):
    torch.manual_seed(0)
    ref = transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(**_PEGASUS))
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["model.encoder.embed_positions.weight"].normal_()
    ref.config.save_pretrained(tmp_path / "learned")
    torch.save(state, tmp_path / "learned" / "pytorch_model.bin")
    with pytest.raises(UserError, match="embed_positions.*not the sinusoidal table"):
        models.port("pegasus").load(tmp_path / "learned", "seq2seq_lm", dtype="float32",
                                    remat=False)
    config = json.loads((tmp_path / "learned" / "config.json").read_text())
    config["decoder_ffn_dim"] = 64
    (tmp_path / "learned" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="encoder_ffn_dim=48 and decoder_ffn_dim=64"):
        models.port("pegasus").load(tmp_path / "learned", "seq2seq_lm", dtype="float32",
                                    remat=False)
    untied = tmp_path / "untied"
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**_T5))
    ref.config.save_pretrained(untied)
    state = dict(ref.state_dict())
    state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1.0
    torch.save(state, untied / "pytorch_model.bin")
    with pytest.raises(UserError, match=f"checkpoint {untied}: encoder.embed_tokens.weight "
                                        "differs from shared.weight"):
        models.port("t5").load(untied, "seq2seq_lm", dtype="float32", remat=False)
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    (t5_dir / "config.json").write_text(json.dumps(
        {"model_type": "t5", **_T5, "feed_forward_proj": "gated-gelu-x"}))
    torch.save({}, t5_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match="feed_forward_proj 'gated-gelu-x'"):
        models.port("t5").load(t5_dir, "seq2seq_lm", dtype="float32", remat=False)


@pytest.mark.parametrize("family", ["t5", "mt5", "pegasus"])
def test_scratch_model_exports_for_transformers(family, tmp_path):
    """``config.model.path=""``: the registry sizes a model from ``config.model`` and the
    task's vocabulary; its export is the same network in transformers."""
    _save_tokenizer(tmp_path)
    tokenizer = transformers.BertTokenizer.from_pretrained(tmp_path)
    model_cfg = ml_collections.ConfigDict({
        "path": "", "family": family, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 48,
        "dropout": 0.1, "dtype": "float32", "remat": False,
    })
    b = models.build(model_cfg, head="seq2seq_lm", tokenizer=tokenizer, max_length=32)
    assert b.config.vocab_size == VOCAB and b.config.decoder_start_token_id == PAD
    b.port.export(b.model, b.config, tmp_path / "out", tokenizer)
    back = models.port_of_dir(tmp_path / "out")
    assert back is b.port
    ref = ENTRIES[[e.name for e in ENTRIES].index(family)].hf_class.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    ids, mask, dec, dec_mask = padded_batch()
    diff = _diff(_fwd(b.model, ids, mask, dec, dec_mask),
                 hf_logits(ref, ids, mask, dec, dec_mask), dec_mask)
    assert diff <= 1e-4, diff


def test_dropout_and_remat(tmp_path_factory):
    """Training mode: dropout (T5's ``dropout_rate``) changes the logits, and recomputing the
    layers in the backward pass (``remat``) gives the same gradients."""
    _, dirs, plain, cfg, port = _build(ENTRIES[0], tmp_path_factory)
    remat, remat_cfg = port.load(dirs["safetensors"], "seq2seq_lm", dtype="float32", remat=True)
    assert remat_cfg.remat and cfg.hidden_dropout > 0
    ids, mask, dec, dec_mask = padded_batch()

    def loss(m):
        return jnp.mean(m(ids, mask, dec, dec_mask, rngs=nnx.Rngs(dropout=1)) ** 2)

    assert "remat" in str(jax.make_jaxpr(lambda m: nnx.grad(loss)(m))(remat))
    g_plain, g_remat, train = nnx.jit(lambda a, b: (
        nnx.grad(loss)(a), nnx.grad(loss)(b),
        a(ids, mask, dec, dec_mask, rngs=nnx.Rngs(dropout=1))))(plain, remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert _diff(train, _fwd(plain, ids, mask, dec, dec_mask), dec_mask) > 1e-2
