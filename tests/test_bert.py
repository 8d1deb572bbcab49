"""BERT / ERNIE port: parity with transformers (PyTorch) on tiny random models, strict loading,
export back to transformers, dropout and remat."""

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
from lib.models import bert

TINY = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=37, max_position_embeddings=64,
)
ERNIE = dict(TINY, use_task_id=True, task_type_vocab_size=3)

# name -> (HF class, our class, HF config class, config kwargs)
KINDS = {
    "bert": (transformers.BertModel, bert.BertModel, transformers.BertConfig, TINY),
    "bert_mlm": (transformers.BertForMaskedLM, bert.BertForMaskedLM, transformers.BertConfig,
                 TINY),
    "bert_cls": (transformers.BertForSequenceClassification, bert.BertForSequenceClassification,
                 transformers.BertConfig, dict(TINY, num_labels=3)),
    "ernie": (transformers.ErnieModel, bert.BertModel, transformers.ErnieConfig, ERNIE),
    "ernie_cls": (transformers.ErnieForSequenceClassification,
                  bert.BertForSequenceClassification, transformers.ErnieConfig,
                  dict(ERNIE, num_labels=3)),
}


def _batch() -> dict[str, np.ndarray]:
    """Three sequences of 12 tokens: full, padded after 7, padded after 3; two segments."""
    rng = np.random.RandomState(0)
    mask = np.ones((3, 12), np.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = np.zeros((3, 12), np.int64)
    types[:, 5:] = 1
    return dict(
        input_ids=rng.randint(1, 99, (3, 12)) * mask,
        attention_mask=mask,
        token_type_ids=types,
        task_type_ids=rng.randint(0, 3, (3, 12)),
    )


def _hf_model(kind: str, seed: int = 0):
    hf_cls, _, cfg_cls, kwargs = KINDS[kind]
    torch.manual_seed(seed)
    return hf_cls(cfg_cls(**kwargs)).eval()


def _hf_outputs(model, batch) -> list[np.ndarray]:
    inputs = {k: torch.tensor(v) for k, v in batch.items()}
    if not getattr(model.config, "use_task_id", False):
        del inputs["task_type_ids"]
    with torch.no_grad():
        out = model(**inputs)
    if "logits" in out:
        return [out.logits.numpy()]
    return [out.last_hidden_state.numpy(), out.pooler_output.numpy()]


def _our_outputs(model, batch) -> list[np.ndarray]:
    out = model(**{k: jnp.asarray(v) for k, v in batch.items()})
    return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]


def _save(model, path, fmt: str):
    """Save an HF model as one safetensors file, sharded safetensors, or an old-style .bin
    (state_dict with the position_ids buffer and, for the MLM, the tied decoder keys)."""
    if fmt == "safetensors":
        model.save_pretrained(path)
    elif fmt == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    else:
        model.config.save_pretrained(path)
        state = dict(model.state_dict())
        base = model.base_model_prefix
        prefix = base + "." if hasattr(model, base) else ""
        state[prefix + "embeddings.position_ids"] = torch.arange(64)[None]
        torch.save(state, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_with_transformers(kind, fmt, tmp_path):
    batch = _batch()
    ref = _hf_model(kind)
    model, cfg = bert.load_pretrained(_save(ref, tmp_path, fmt), KINDS[kind][1])
    assert cfg.model_type == kind.split("_")[0]
    for theirs, ours in zip(_hf_outputs(ref, batch), _our_outputs(model, batch), strict=True):
        diff = float(np.abs(theirs - ours).max())
        print(f"{kind} {fmt} max abs diff {diff:.2e}")
        assert diff <= 1e-4


def test_mlm_bin_has_tied_decoder_keys(tmp_path):
    """The .bin case of the MLM parity test does exercise the tied-decoder check."""
    _save(_hf_model("bert_mlm"), tmp_path, "bin")
    keys = set(hf.load_state_dict(tmp_path))
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert tied | {"bert.embeddings.position_ids"} <= keys


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_reloads_in_transformers(kind, tmp_path):
    batch = _batch()
    ref = _hf_model(kind)
    ref.save_pretrained(tmp_path / "in")
    model, cfg = bert.load_pretrained(tmp_path / "in", KINDS[kind][1])
    # Export over the directory the weights were read from: loading must not keep views of it.
    out = bert.export_pretrained(model, cfg, tmp_path / "in")
    back, info = KINDS[kind][0].from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    back.eval()
    for before, after in zip(_hf_outputs(ref, batch), _hf_outputs(back, batch), strict=True):
        assert float(np.abs(before - after).max()) <= 1e-5
    for before, after in zip(_hf_outputs(ref, batch), _our_outputs(model, batch), strict=True):
        assert float(np.abs(before - after).max()) <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [KINDS[kind][0].__name__]


def test_export_after_change_carries_new_weights(tmp_path):
    """A fine-tuned value (here: a changed classifier bias) is what transformers reads back."""
    ref = _hf_model("bert_cls")
    ref.save_pretrained(tmp_path / "in")
    model, cfg = bert.load_pretrained(tmp_path / "in")
    model.classifier.bias[...] = jnp.array([1.0, 2.0, 3.0])
    back = transformers.AutoModelForSequenceClassification.from_pretrained(
        bert.export_pretrained(model, cfg, tmp_path / "out")
    )
    np.testing.assert_array_equal(back.classifier.bias.detach().numpy(), [1.0, 2.0, 3.0])


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cls")
    _hf_model("bert_cls").save_pretrained(path)
    return path


def _fresh_cls(path):
    return bert.load_pretrained(path)[0], hf.load_state_dict(path)


def test_extra_key_is_an_error(cls_checkpoint):
    model, state = _fresh_cls(cls_checkpoint)
    state["bert.encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(UserError, match=r"unexpected keys \[bert\.encoder\.layer\.0\.attention"
                                        r"\.self\.extra\.weight\]"):
        hf.load_into(model, state, model.hf_to_ours, where="somewhere")


def test_missing_key_is_an_error(cls_checkpoint):
    model, state = _fresh_cls(cls_checkpoint)
    del state["bert.encoder.layer.1.output.dense.weight"]
    with pytest.raises(UserError, match=r"missing keys \[bert\.encoder\.layer\.1\.output\.dense"):
        hf.load_into(model, state, model.hf_to_ours)


def test_wrong_shape_is_an_error(cls_checkpoint):
    model, state = _fresh_cls(cls_checkpoint)
    state["bert.embeddings.word_embeddings.weight"] = np.zeros((100, 32), np.float32)
    with pytest.raises(UserError, match=r"'bert\.embeddings\.word_embeddings\.weight' has shape "
                                        r"\(100, 32\), the model expects \(99, 32\)"):
        hf.load_into(model, state, model.hf_to_ours)


def test_num_labels_mismatch_is_an_error(cls_checkpoint):
    with pytest.raises(UserError, match="classifier has 3 labels, the model 5"):
        bert.load_pretrained(cls_checkpoint, num_labels=5)


def test_untied_mlm_decoder_is_an_error(tmp_path):
    _save(_hf_model("bert_mlm"), tmp_path, "bin")
    model, _ = bert.load_pretrained(tmp_path, bert.BertForMaskedLM)  # tied: fine
    state = dict(hf.load_state_dict(tmp_path))
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(UserError, match="cls.predictions.decoder.weight"):
        hf.load_into(model, state, model.hf_to_ours)


def test_classifier_from_pretraining_checkpoint(tmp_path):
    """bert-base-chinese style: the NSP/MLM heads are dropped, the classifier starts fresh, the
    encoder and pooler are the checkpoint's (also under TF-era gamma/beta LayerNorm names)."""
    torch.manual_seed(0)
    pre = transformers.BertForPreTraining(transformers.BertConfig(**TINY)).eval()
    state = {k: v.numpy() for k, v in pre.state_dict().items()}
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
             "LayerNorm.beta"): v for k, v in state.items()}
    hf.save_pretrained(state, pre.config.to_dict(), tmp_path)
    model, cfg = bert.load_pretrained(tmp_path, num_labels=4)
    assert cfg.num_labels == 4 and model.classifier.kernel[...].shape == (32, 4)
    batch = _batch()
    ref = transformers.BertModel.from_pretrained(tmp_path).eval()  # drops the heads likewise
    seq, pooled = model.bert(**{k: jnp.asarray(v) for k, v in batch.items()})
    want = _hf_outputs(ref, batch)
    assert float(np.abs(np.asarray(seq) - want[0]).max()) <= 1e-4
    assert float(np.abs(np.asarray(pooled) - want[1]).max()) <= 1e-4
    # The masked LM takes its head from the same checkpoint.
    mlm, _ = bert.load_pretrained(tmp_path, bert.BertForMaskedLM)
    np.testing.assert_array_equal(
        mlm.cls.predictions.bias[...], pre.cls.predictions.bias.detach().numpy()
    )


def test_dropout_only_with_rngs(cls_checkpoint):
    model, _ = bert.load_pretrained(cls_checkpoint, hidden_dropout_prob=0.3)
    batch = {k: jnp.asarray(v) for k, v in _batch().items() if k != "task_type_ids"}
    det = np.asarray(model(**batch))
    np.testing.assert_array_equal(det, np.asarray(model(**batch, rngs=None)))
    # One compiled function for the three calls; "rbg" keys because compiling threefry at
    # every dropout site takes seconds on CPU.
    forward = nnx.jit(lambda model, key: model(**batch, rngs=nnx.Rngs(dropout=key)))
    a, b, c = (np.asarray(forward(model, jax.random.key(s, impl="rbg"))) for s in (1, 1, 2))
    assert np.abs(a - det).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    np.testing.assert_array_equal(a, b)  # same key, same mask


def test_remat_gives_the_same_gradients(cls_checkpoint):
    """With dropout on: the recomputed forward must draw the same masks."""
    batch = {k: jnp.asarray(v) for k, v in _batch().items() if k != "task_type_ids"}
    labels = jnp.array([0, 2, 1])

    def loss(model, key):
        logits = model(**batch, rngs=nnx.Rngs(dropout=key))
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

    plain, _ = bert.load_pretrained(cls_checkpoint)
    remat, _ = bert.load_pretrained(cls_checkpoint, remat=True)
    key = jax.random.key(0, impl="rbg")
    # One compiled program for both: compiling is most of this test's time.
    g_plain, g_remat = nnx.jit(
        lambda a, b: (nnx.grad(loss)(a, key), nnx.grad(loss)(b, key))
    )(plain, remat)
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_plain, g_remat)
    assert max(jax.tree.leaves(diffs)) <= 1e-6
    assert float(jnp.abs(g_plain["classifier"]["kernel"][...]).max()) > 1e-3
    assert "remat" in str(jax.make_jaxpr(nnx.grad(loss))(remat, key))


def test_bf16_compute_stays_close(cls_checkpoint):
    batch = {k: jnp.asarray(v) for k, v in _batch().items() if k != "task_type_ids"}
    f32, _ = bert.load_pretrained(cls_checkpoint)
    bf16, _ = bert.load_pretrained(cls_checkpoint, dtype=jnp.bfloat16)
    out = nnx.jit(lambda model: model(**batch))(bf16)
    assert out.dtype == jnp.float32 and bf16.classifier.kernel[...].dtype == jnp.float32
    assert float(jnp.abs(out - f32(**batch)).max()) <= 2e-2


def test_per_query_mask_matches_padding_mask(cls_checkpoint):
    """A [b, t, s] mask (used by UniLM) equal to the padding mask on every row is the same."""
    model, _ = bert.load_pretrained(cls_checkpoint, bert.BertModel)
    batch = _batch()
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    full = jnp.broadcast_to(mask[:, None, :], (3, 12, 12))
    np.testing.assert_allclose(model(ids, full)[0], model(ids, mask)[0], atol=1e-6)


def test_config_round_trip_and_errors(cls_checkpoint):
    raw = hf.read_config(cls_checkpoint)
    cfg = bert.BertConfig.from_hf(raw)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_labels) == (32, 2, 3)
    back = cfg.to_hf("ForMaskedLM")
    assert back["architectures"] == ["BertForMaskedLM"]
    assert back["id2label"] == raw["id2label"] and back["initializer_range"] == 0.02
    assert bert.BertConfig.from_hf(back) == cfg
    assert len(bert.BertConfig.from_hf(raw, num_labels=5).to_hf()["id2label"]) == 5
    with pytest.raises(UserError, match="hiden_size"):
        bert.BertConfig.from_hf(raw, hiden_size=64)
    with pytest.raises(UserError, match="model_type 'roberta'"):
        bert.BertConfig.from_hf(dict(raw, model_type="roberta"))
    with pytest.raises(UserError, match="hidden_act 'quick_gelu'"):
        bert.BertConfig.from_hf(dict(raw, hidden_act="quick_gelu"))
    model = nnx.eval_shape(lambda: bert.BertModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(UserError, match="sequence length 65 exceeds max_position_embeddings 64"):
        model(jnp.ones((1, 65), jnp.int32))


def test_logical_axes():
    cfg = bert.BertConfig(**TINY)
    model = nnx.eval_shape(lambda: bert.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)))
    axes = {
        ".".join(map(str, path)): var.get_metadata()["out_sharding"]
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    layer = "bert.encoder.layer.0."
    assert axes["bert.embeddings.word_embeddings.embedding"] == ("vocab", "embed")
    assert axes[layer + "attention.self.query.kernel"] == ("embed", "heads")
    assert axes[layer + "attention.output.dense.kernel"] == ("heads", "embed")
    assert axes[layer + "intermediate.dense.kernel"] == ("embed", "mlp")
    assert axes[layer + "output.dense.kernel"] == ("mlp", "embed")
    assert axes["classifier.kernel"] == ("embed", None)
    assert all(a is not None for a in axes.values())


def test_mean_pooling_classifier(cls_checkpoint, tmp_path):
    """pooling="mean": HF's encoder output averaged over real tokens, then HF's pooler dense +
    tanh and classifier; such a model refuses HF export (HF's classifier reads [CLS])."""
    model, _ = bert.load_pretrained(cls_checkpoint, pooling="mean")
    hf_model = transformers.BertForSequenceClassification.from_pretrained(cls_checkpoint).eval()
    batch = _batch()
    inputs = {k: torch.tensor(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        hidden = hf_model.bert(**inputs).last_hidden_state
        m = inputs["attention_mask"][..., None].float()
        mean = (hidden * m).sum(1) / m.sum(1)
        want = hf_model.classifier(torch.tanh(hf_model.bert.pooler.dense(mean))).numpy()
    got = _our_outputs(model, {k: v for k, v in batch.items() if k != "task_type_ids"})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Not the [CLS] logits: the option changes the model.
    assert np.max(np.abs(got - _hf_outputs(hf_model, batch)[0])) > 1e-3
    with pytest.raises(UserError, match="pools with 'mean'"):
        bert.export_pretrained(model, bert.BertConfig.from_hf(hf.read_config(cls_checkpoint)),
                               tmp_path / "out")
    with pytest.raises(UserError, match="pooling must be"):
        bert.load_pretrained(cls_checkpoint, pooling="max")
