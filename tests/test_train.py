"""The trainer: sharding on 8 simulated devices, gradient accumulation, schedules, decay mask;
the shared config fields and their validation."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import tasks
from configs import classification, loopcot, sft
from lib import config as config_lib
from lib import sharding, train
from lib.errors import UserError
from lib.models import bert


def tiny_model(seed: int = 0) -> bert.BertForSequenceClassification:
    cfg = bert.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    return bert.BertForSequenceClassification(cfg, rngs=nnx.Rngs(seed))


def loss_fn(model, batch, rng):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"],
                   rngs=None if rng is None else nnx.Rngs(dropout=rng))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return ce.mean(), {"accuracy": (logits.argmax(-1) == batch["labels"]).mean()}


def make_batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 64, size=(n, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, 9:] = 0  # some padding
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "labels": rng.integers(0, 3, size=n).astype(np.int32),
    }


def tcfg(**kw) -> ml_collections.ConfigDict:
    base = dict(lr=1e-2, warmup_steps=2, schedule="linear", weight_decay=0.01, grad_clip=1.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def run_steps(mesh_shape, steps=3, *, grad_accum=1, batch=8, dropout=True):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    schedule = train.make_schedule(tcfg(), 10)
    tx = train.make_optimizer(tcfg(), schedule)
    model = tiny_model()
    graphdef, state, state_sh, frozen, frozen_sh = train.init_state(model, tx, mesh)
    fn = loss_fn if dropout else (lambda m, b, r: loss_fn(m, b, None))
    step = train.compile_step(graphdef, fn, tx, schedule, state_sh, frozen_sh, mesh,
                              grad_accum=grad_accum, seed=0)
    losses = []
    for i in range(steps):
        state, metrics = step(state, frozen, sharding.shard_batch(make_batch(batch, i), mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


def max_param_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def test_eight_devices():
    assert jax.device_count() == 8


def test_params_are_sharded_on_a_3d_mesh():
    state, _ = run_steps((2, 2, 2), steps=1)
    params = state["params"]
    attn = params["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]
    assert attn["kernel"].sharding.spec == P("fsdp", "tensor")
    assert attn["bias"].sharding.spec == P("tensor")
    inter = params["bert"]["encoder"]["layer"][0]["intermediate"]["dense"]["kernel"]
    assert inter.sharding.spec == P("fsdp", "tensor")
    # vocab 64 splits over tensor=2, embed 32 over fsdp=2
    emb = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    # each device holds a quarter of the query kernel
    shard_shapes = {s.data.shape for s in attn["kernel"].addressable_shards}
    assert shard_shapes == {(16, 16)}
    # Adam moments follow their parameter
    mu = state["train"]["opt_state"][1][0].mu
    assert mu["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]["kernel"].sharding \
        .spec == P("fsdp", "tensor")


def test_sharded_steps_equal_single_device():
    sharded, loss8 = run_steps((2, 2, 2))
    single, loss1 = run_steps((1, 1, 1))
    np.testing.assert_allclose(loss8, loss1, atol=1e-5)
    assert max_param_diff(sharded["params"], single["params"]) <= 1e-5


def test_grad_accumulation_equals_larger_batch():
    # Dropout off: with dropout each micro-batch draws its own mask, by design.
    big, loss_big = run_steps((1, 1, 1), steps=2, batch=8, dropout=False)
    acc, loss_acc = run_steps((1, 1, 1), steps=2, batch=8, grad_accum=4, dropout=False)
    np.testing.assert_allclose(loss_acc, loss_big, atol=1e-5)
    assert max_param_diff(acc["params"], big["params"]) <= 1e-5


def test_weighted_accumulation_is_token_exact():
    """A loss that reports ``weight`` (its token count) averages exactly across micro-batches."""

    def token_loss(model, batch, rng):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        per_tok = (logits[:, 0] ** 2) * batch["attention_mask"].sum(-1)
        weight = batch["attention_mask"].sum()
        return per_tok.sum() / weight, {"weight": weight}

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    schedule = train.make_schedule(tcfg(), 10)
    tx = train.make_optimizer(tcfg(), schedule)
    results = []
    for k in (1, 4):
        graphdef, state, ssh, frozen, fsh = train.init_state(tiny_model(), tx, mesh)
        step = train.compile_step(graphdef, token_loss, tx, schedule, ssh, fsh, mesh,
                                  grad_accum=k, seed=0)
        state, metrics = step(state, frozen, sharding.shard_batch(make_batch(8), mesh))
        results.append((float(metrics["loss"]), state["params"]))
    assert abs(results[0][0] - results[1][0]) <= 1e-5
    assert max_param_diff(results[0][1], results[1][1]) <= 1e-5


def test_schedule_warmup_then_linear_decay():
    s = train.make_schedule(tcfg(lr=1.0, warmup_steps=4), 12)
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4, 8, 12)],
                               [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    r = train.make_schedule(tcfg(lr=1.0, warmup_ratio=0.25, schedule="cosine"), 8)
    np.testing.assert_allclose([float(r(i)) for i in (1, 2, 5, 8)],
                               [0.5, 1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(UserError, match="config.train.schedule"):
        train.make_schedule(tcfg(schedule="step"), 10)


def test_metric_titles_print_acronyms_in_capitals():
    names = ["f1", "weighted_f1", "rouge-l", "rouge-1", "bleu-4", "loss", "ranking_accuracy"]
    assert [train.metric_title(n) for n in names] == [
        "F1", "weighted_F1", "ROUGE-L", "ROUGE-1", "BLEU-4", "loss", "ranking_accuracy"]


def test_decay_mask_skips_bias_and_norm_scales():
    _, params, _ = train.split_model(tiny_model())
    mask = train.decay_mask(nnx.to_pure_dict(params))
    layer = mask["bert"]["encoder"]["layer"][0]
    assert layer["attention"]["self"]["query"]["kernel"] is True
    assert layer["attention"]["self"]["query"]["bias"] is False
    assert layer["attention"]["output"]["LayerNorm"]["scale"] is False
    assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"] is True


def test_mesh_errors():
    with pytest.raises(UserError, match="data\\*fsdp\\*tensor = 6"):
        sharding.make_mesh(3, 2, 1)
    with pytest.raises(UserError, match="at most one"):
        sharding.make_mesh(-1, -1, 1)
    mesh = sharding.make_mesh(-1, 2, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(UserError, match="batch_size=6 is not divisible"):
        sharding.check_batch_size(6, mesh)


def test_indivisible_dims_stay_replicated():
    mesh = sharding.make_mesh(2, 2, 2)
    assert sharding.logical_to_mesh(("vocab", "embed"), (33, 32), mesh) == P(None, "fsdp")
    assert sharding.logical_to_mesh(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert jnp.zeros(()).shape == ()


def test_shipped_configs_pass_their_checks():
    for module, variants in ((classification, ("demo", "loss-sweep", "bert-base-chinese")),
                             (sft, ("demo", "qwen2.5-1.5b-lora")),
                             (loopcot, ("demo", "chatglm2-6b-lora"))):
        for variant in variants:
            config = module.get_config(variant)
            assert type(tasks.create(config)).__module__ == f"tasks.{config.task}"
            # The trainer's fields come from the one base: same keys in every experiment.
            for section in ("train", "mesh", "checkpoint", "log", "sweep"):
                assert set(config[section]) == set(config_lib.base("", "")[section]), section


@pytest.mark.parametrize("key, value, allowed", [
    ("train.batch_size", 0, "must be >= 1"),
    ("train.grad_clip", -1.0, "must be >= 0"),
    ("train.eps", 0.0, "must be > 0"),
    ("train.b2", 1.0, "must be in [0, 1)"),
    ("model.dropout", 1.0, "must be in [0, 1)"),
    ("model.dtype", "float16", "choose one of float32, bfloat16"),
    ("eval.best_mode", "best", "choose one of max, min"),
    ("checkpoint.keep", 0, "must be >= 1"),
    ("log.every", -1, "must be >= 0"),
    ("mesh.fsdp", 0, "must be >= 1, or -1 (the devices left over)"),
    ("sweep.repeats", 0, "must be >= 1"),
    ("data.loss_mode", "half", "choose one of masked, unmasked"),
    ("model.lora.export", "both", "choose one of adapter, merged"),
    ("eval.top_p", 0.0, "must be in (0, 1]"),
    ("data.mix", "single", "choose one of single_generation, single_appreciation, mix, "
                           "mix_summarize_keywords"),
    ("data.theme_file", "nope.json", "no such file (empty: none)"),
])
def test_a_bad_value_names_its_key_and_what_is_allowed(key, value, allowed):
    config = loopcot.get_config()
    section, name = key.rsplit(".", 1)
    config_lib.lookup(config, section)[name] = value
    message = f"config.{key}={value!r}: {allowed}"
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        tasks.create(config)
    # Data files are read in train and eval only: predict and export use the run's assets.
    if key == "data.theme_file":
        tasks.create(config, "predict")


def test_overrides_and_partial_sections():
    config = classification.get_config()
    over = config_lib.with_overrides(config, config_lib.nest({"loss.focal_gamma": 2.0,
                                                              "train.steps": 5}), "sweep.runs.x")
    assert (over.loss.focal_gamma, over.train.steps) == (2.0, 5)
    assert (config.loss.focal_gamma, config.train.steps) == (0.0, 1200)  # a copy
    with pytest.raises(UserError, match=r"config.sweep.runs.x: 'loss.gamma' is not a config key"):
        config_lib.with_overrides(config, {"loss": {"gamma": 1.0}}, "sweep.runs.x")
    with pytest.raises(UserError, match=r"train.steps='many' does not fit the field's type"):
        config_lib.with_overrides(config, {"train": {"steps": "many"}}, "sweep.runs.x")
    # A hand-made section takes the base defaults for what it omits.
    partial = config_lib.complete("train", ml_collections.ConfigDict({"lr": 0.5}))
    assert (partial.lr, partial.b2, partial.schedule) == (0.5, 0.999, "linear")
