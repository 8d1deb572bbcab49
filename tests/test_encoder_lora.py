"""LoRA on the BERT/ERNIE encoder tasks and their HF exports.

For each PEFT task type (``SEQ_CLS``: pointwise matching; ``FEATURE_EXTRACTION``: DSSM, the
Sentence-Transformer and SimCSE; the plain ``PeftModel`` of a masked LM: PET; ``TOKEN_CLS``:
UIE on an ERNIE 3.0 with task-type embeddings) a tiny random HF checkpoint is fine-tuned for a
few steps by the trainer with LoRA on query/value; only the adapters and the task head move;
the exported adapter loads with ``peft.PeftModel.from_pretrained`` onto the HF model and gives
our outputs (fp32, within 1e-4). The two-tower tasks are also exported without LoRA (an HF
encoder plus the head file) and reloaded. Bad LoRA settings are one-line errors naming the key.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file

from configs import matching as matching_config
from configs import p_tuning as p_tuning_config
from configs import pet as pet_config
from configs import simcse as simcse_config
from configs import uie as uie_config
from lib import cli, pairs, sharding, train
from lib.errors import UserError
from lib.models import bert, lora
from tasks import matching, p_tuning, pet, simcse, uie

PAIRS = [("北京举行新年音乐会", "今晚的长安街流光溢彩。", 1),
         ("明天气象预报", "江南将有小到中雨。", 1),
         ("江泽民会见美国客人", "今天下雨，天很冷。", 0),
         ("上海举办博览会", "王五在广州开会。", 0)]
SENTENCES = ["北京举行新年音乐会", "明天气象预报", "江泽民会见美国客人", "上海举办博览会",
             "今晚的长安街流光溢彩", "江南将有小到中雨", "王五在广州开会", "天津很冷"]
REVIEWS = [("正面", "质量很好，非常满意"), ("负面", "太差了，再也不买"),
           ("正面", "物流快，包装好"), ("负面", "做工粗糙，不满意")]
RECORDS = [("张三在北京会见李四。", "人物", [(0, 2), (7, 9)]),
           ("王五到上海。", "地点", [(3, 5)]),
           ("今天下雨。", "人物", []),
           ("李四去广州开会。", "人物", [(0, 2)])]
RANK, ALPHA = 4, 8.0
STEPS = 3
transformers.logging.set_verbosity_error()  # the base's unused pretraining heads, as expected


def _uie_line(content, prompt, found):
    return json.dumps({"content": content, "prompt": prompt, "result_list": [
        {"text": content[s:e], "start": s, "end": e} for s, e in found]}, ensure_ascii=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoder_lora_data")
    pair_lines = [f"{q}\t{doc}\t{y}" for q, doc, y in PAIRS]
    (d / "pairs.tsv").write_text("\n".join(pair_lines * 2) + "\n", encoding="utf-8")
    (d / "sentences.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    (d / "reviews.tsv").write_text("\n".join(f"{y}\t{x}" for y, x in REVIEWS * 2) + "\n",
                                   encoding="utf-8")
    (d / "labels.txt").write_text("正面\n负面\n", encoding="utf-8")
    (d / "uie.jsonl").write_text("\n".join(_uie_line(*r) for r in RECORDS * 2) + "\n",
                                 encoding="utf-8")
    return d


def _checkpoint(path, family: str):
    """A tiny random HF pretraining checkpoint (encoder with pooler, MLM and NSP heads) and a
    vocabulary of the test's characters; ERNIE 3.0 with its task-type embedding."""
    text = "".join(q + doc for q, doc, _ in PAIRS) + "".join(SENTENCES) + "".join(
        x for _, x in REVIEWS) + "".join(c + p for c, p, _ in RECORDS) + "这是一条评论：。正负面"
    vocab = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 7)]
             + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(text)))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizer.from_pretrained(path).save_pretrained(path)
    sizes = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                 initializer_range=0.1)
    torch.manual_seed(0)
    if family == "ernie":
        model = transformers.ErnieForPreTraining(
            transformers.ErnieConfig(**sizes, use_task_id=True, task_type_vocab_size=3))
    else:
        model = transformers.BertForPreTraining(transformers.BertConfig(**sizes))
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("bert_pretraining"), "bert")


@pytest.fixture(scope="module")
def ernie_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ernie_pretraining"), "ernie")


def tiny_config(module, variant, data_dir, model_dir, workdir, rank=RANK):
    """``module``'s config on the tiny checkpoint: LoRA of ``rank`` (0: none) on query/value,
    ``STEPS`` steps, one evaluation and checkpoint at the end."""
    c = module.get_config(variant)
    c.workdir = str(workdir)
    c.model.path = str(model_dir)
    c.model.lora.update(rank=rank, alpha=ALPHA, dropout=0.1)
    c.train.update(steps=STEPS, batch_size=8, lr=1e-2, schedule="constant", warmup_ratio=0.0,
                   warmup_steps=0)
    c.log.every, c.eval.every, c.checkpoint.every, c.eval.batch_size = STEPS, STEPS, STEPS, 8
    return c


def matching_config_of(variant, data_dir, model_dir, workdir, rank=RANK):
    c = tiny_config(matching_config, variant, data_dir, model_dir, workdir, rank)
    c.data.train = c.data.eval = str(data_dir / "pairs.tsv")
    c.data.test = ""
    c.data.max_length = 24
    c.model.sentence_pooling = ""  # the originals': DSSM the pooler, the ST the mean
    c.predict.candidates = SENTENCES[:3]
    return c


def _params(model) -> dict:
    return {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model,
                                                                              nnx.Param))}


def _check_moved(config, before: dict, model) -> None:
    """Exactly the LoRA adapters and the head layers trained whole (``HeadParam``) moved;
    without LoRA, everything trains."""
    after = _params(model)
    assert after.keys() == before.keys()
    moved = {p for p in after if not np.array_equal(after[p], before[p])}
    trained = {p for p, _ in nnx.to_flat_state(nnx.state(model, lora.LoRAParam))}
    if config.model.lora.rank:
        assert moved == trained, sorted(moved ^ trained)
        assert {p[-1] for p in trained} >= {"lora_a", "lora_b"}
    else:
        assert not trained and len(moved) > 10


def train_steps(task_cls, config):
    """``STEPS`` steps of the trainer's own step (``lib.train``: the task's loss, AdamW with
    its decay mask, the task's trainable filter) on one device; returns ``(task, trained
    model, tokenizer)`` after ``_check_moved``."""
    task = task_cls.create(config)
    model, tok = task.build()
    before = _params(model)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    schedule = train.make_schedule(config.train, STEPS)
    tx = train.make_optimizer(config.train, schedule)
    graphdef, state, state_sh, frozen, frozen_sh = train.init_state(
        model, tx, mesh, trainable=task.trainable())
    step = train.compile_step(graphdef, task.loss, tx, schedule, state_sh, frozen_sh, mesh,
                              grad_accum=1, seed=0)
    data, _ = task.datasets(tok)
    for i in range(STEPS):
        batch = data.batch(i, int(config.train.batch_size), 0)
        state, _ = step(state, frozen, sharding.shard_batch(batch, mesh))
    model = nnx.merge(graphdef, state["params"], frozen)
    _check_moved(config, before, model)
    return task, model, tok


def train_and_restore(task_cls, config, workdir):
    """As ``train_steps``, through ``lib.train.train`` (8 devices, checkpoints) and back by
    ``restore_model``, as ``--mode=export`` does."""
    before = _params(task_cls.create(config).build()[0])
    train.train(config, workdir, task_cls.create(config))
    task = task_cls.create(config, "export")
    model, tok, step = train.restore_model(task, workdir)
    assert step == STEPS
    _check_moved(config, before, model)
    return task, model, tok


def _torch(arrays: dict) -> dict:
    return {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in arrays.items()}


def _peft(base_cls, model_dir, out, **kw):
    """The HF base with the exported adapter, and the base alone (to see the adapter act)."""
    adapted = peft.PeftModel.from_pretrained(base_cls.from_pretrained(model_dir, **kw), out)
    return adapted.eval(), base_cls.from_pretrained(model_dir, **kw).eval()


def _adapter_config(out) -> dict:
    return json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))


def _report(name, diff, change):
    print(f"{name}: max |ours - HF/PEFT| = {diff:.2e}, adapter effect {change:.2e}")
    assert diff <= 1e-4 and change > 1e-3


# ----------------------------------------------------------------------------- SEQ_CLS


def test_pointwise_seq_cls_adapter(data_dir, bert_dir, tmp_path):
    config = matching_config_of("pointwise", data_dir, bert_dir, tmp_path)
    task, model, tok = train_steps(matching.Task, config)
    head = {p for p, v in nnx.to_flat_state(nnx.state(model, lora.HeadParam))}
    assert head == {("classifier", "kernel"), ("classifier", "bias")}
    out = tmp_path / "export"
    task.export(model, tok, str(out))
    cfg = _adapter_config(out)
    assert (cfg["task_type"], cfg["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
    assert cfg["target_modules"] == ["query", "value"] and cfg["r"] == RANK
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.classifier.weight"].shape == (2, 32)
    assert "base_model.model.bert.encoder.layer.0.attention.self.value.lora_B.weight" in tensors

    arrays = task.encode(tok, [q for q, _, _ in PAIRS], [d for _, d, _ in PAIRS])
    ours = task.scores(model, arrays)
    adapted, base = _peft(transformers.BertForSequenceClassification, bert_dir, out)
    with torch.no_grad():
        theirs = adapted(**_torch(arrays)).logits.numpy()
        plain = base(**_torch(arrays)).logits.numpy()
    _report("pointwise SEQ_CLS", np.abs(ours - theirs).max(), np.abs(plain - theirs).max())


# ----------------------------------------------------------------------------- FEATURE_EXTRACTION


def _hf_encoder(model_dir, out, with_lora: bool):
    """The exported encoder in transformers: the base plus the PEFT adapter, or the full HF
    directory; and the torch layers of ``sentence_head.safetensors``."""
    if with_lora:
        encoder = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(model_dir),
                                                 out).eval()
        assert _adapter_config(out)["task_type"] == "FEATURE_EXTRACTION"
        assert _adapter_config(out)["modules_to_save"] is None
    else:
        encoder = transformers.BertModel.from_pretrained(out).eval()
    head = json.loads((out / "sentence_head.json").read_text(encoding="utf-8"))
    layers = {}
    if (out / "sentence_head.safetensors").is_file():
        state = load_file(str(out / "sentence_head.safetensors"))
        for name in ("classifier", "projection"):
            if f"{name}.weight" in state:
                w = state[f"{name}.weight"]
                layers[name] = torch.nn.Linear(w.shape[1], w.shape[0])
                layers[name].load_state_dict({"weight": w, "bias": state[f"{name}.bias"]})
    return encoder, head, layers


def _sentence_vectors(encoder, head, layers, arrays) -> torch.Tensor:
    """The towers' sentence vector in torch, as ``sentence_head.json`` describes it."""
    with torch.no_grad():
        out = encoder(**_torch(arrays))
        if head["pooling"] == "pooler":
            x = out.pooler_output
        elif head["pooling"] == "cls":
            x = out.last_hidden_state[:, 0]
        else:
            m = torch.tensor(arrays["attention_mask"], dtype=torch.float32)[..., None]
            x = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0)
        if head["projection"]:
            x = torch.nn.functional.normalize(layers["projection"](x), dim=-1)
        return x


@pytest.mark.parametrize("with_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("variant", ["dssm", "sentence-transformer"])
def test_two_tower_export(data_dir, bert_dir, tmp_path, variant, with_lora):
    config = matching_config_of(variant, data_dir, bert_dir, tmp_path, RANK if with_lora else 0)
    out = tmp_path / "export"
    if variant == "sentence-transformer" and with_lora:  # the checkpoint round trip too
        task, model, tok = train_and_restore(matching.Task, config, tmp_path)
        cli.run(config, tmp_path, "export")  # --mode=export: restores and writes workdir/export
    else:
        task, model, tok = train_steps(matching.Task, config)
        task.export(model, tok, str(out))
    encoder, head, layers = _hf_encoder(bert_dir, out, with_lora)
    arrays = task.encode(tok, [q for q, _, _ in PAIRS], [d for _, d, _ in PAIRS])
    u, v = (_sentence_vectors(encoder, head, layers, pairs.side(arrays, p)) for p in pairs.SIDES)
    ours = task.scores(model, arrays)
    if variant == "dssm":
        assert head == {"pooling": "pooler", "num_labels": 0, "projection": 0} and not layers
        theirs = torch.nn.functional.cosine_similarity(u, v).numpy()
    else:
        assert head == {"pooling": "mean", "num_labels": 2, "projection": 0}
        with torch.no_grad():
            theirs = layers["classifier"](torch.cat([u, v, (u - v).abs()], -1)).numpy()
    plain = transformers.BertModel.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        base_pooled = plain(**_torch(pairs.side(arrays, "a_"))).pooler_output
        our_pooled = encoder(**_torch(pairs.side(arrays, "a_"))).pooler_output
    _report(f"{variant} {'LoRA' if with_lora else 'full'}", np.abs(ours - theirs).max(),
            float((base_pooled - our_pooled).abs().max()))


def test_simcse_projection_on_lora_encoder(data_dir, bert_dir, tmp_path):
    config = tiny_config(simcse_config, "demo", data_dir, bert_dir, tmp_path)
    config.data.train = str(data_dir / "sentences.txt")
    config.data.eval, config.data.test = str(data_dir / "pairs.tsv"), ""
    config.data.max_length, config.model.projection = 24, 8
    config.model.sentence_pooling = ""  # the original's: the pooler
    task, model, tok = train_steps(simcse.Task, config)
    head = {p[0] for p, v in nnx.to_flat_state(nnx.state(model, lora.HeadParam))}
    assert head == {"projection"}
    out = tmp_path / "export"
    task.export(model, tok, str(out))
    encoder, spec, layers = _hf_encoder(bert_dir, out, with_lora=True)
    assert spec == {"pooling": "pooler", "num_labels": 0, "projection": 8}
    arrays = pairs.encode_texts(tok, SENTENCES, 24)
    ours = np.asarray(model.embed(jnp.asarray(arrays["input_ids"]),
                                  jnp.asarray(arrays["attention_mask"]),
                                  jnp.asarray(arrays["token_type_ids"])))
    theirs = _sentence_vectors(encoder, spec, layers, arrays).numpy()
    base = transformers.BertModel.from_pretrained(bert_dir).eval()
    plain = _sentence_vectors(base, spec, layers, arrays).numpy()  # the head without adapters
    _report("SimCSE FEATURE_EXTRACTION", np.abs(ours - theirs).max(), np.abs(plain - theirs).max())


# ----------------------------------------------------------------------------- masked LM


def test_pet_masked_lm_adapter(data_dir, bert_dir, tmp_path):
    config = tiny_config(pet_config, "demo", data_dir, bert_dir, tmp_path)
    config.data.train = config.data.eval = str(data_dir / "reviews.tsv")
    config.data.test, config.data.labels = "", str(data_dir / "labels.txt")
    config.data.max_length = 24
    task, model, tok = train_steps(pet.Task, config)
    assert not nnx.to_flat_state(nnx.state(model, lora.HeadParam))  # the MLM head is the base's
    out = tmp_path / "export"
    task.export(model, tok, str(out))
    cfg = _adapter_config(out)
    assert (cfg["task_type"], cfg["modules_to_save"]) == (None, None)
    arrays = task.encode(tok, [x for _, x in REVIEWS])
    ours = np.asarray(task.slot_logits(model, {k: jnp.asarray(v) for k, v in arrays.items()}))
    adapted, base = _peft(transformers.BertForMaskedLM, bert_dir, out)
    assert type(adapted) is peft.PeftModel
    slots = np.argwhere(arrays["input_ids"] == tok.mask_token_id)
    inputs = _torch({k: arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    with torch.no_grad():
        theirs = adapted(**inputs).logits.numpy()[slots[:, 0], slots[:, 1]].reshape(ours.shape)
        plain = base(**inputs).logits.numpy()[slots[:, 0], slots[:, 1]].reshape(ours.shape)
    _report("PET masked LM", np.abs(ours - theirs).max(), np.abs(plain - theirs).max())


# ----------------------------------------------------------------------------- TOKEN_CLS


def uie_config_of(data_dir, model_dir, workdir, rank=RANK):
    c = tiny_config(uie_config, "demo", data_dir, model_dir, workdir, rank)
    c.data.train = c.data.eval = str(data_dir / "uie.jsonl")
    c.data.test = ""
    c.data.max_length, c.data.stride = 16, 0
    c.schema.entities = ("人物", "地点")
    c.schema.relations = {}
    return c


def test_uie_token_cls_adapter_on_ernie(data_dir, ernie_dir, tmp_path):
    config = uie_config_of(data_dir, ernie_dir, tmp_path)
    task, model, tok = train_steps(uie.Task, config)
    head = {p[0] for p, v in nnx.to_flat_state(nnx.state(model, lora.HeadParam))}
    assert head == {"linear_start", "linear_end"}
    out = tmp_path / "export"
    task.export(model, tok, str(out))
    cfg = _adapter_config(out)
    assert (cfg["task_type"], cfg["modules_to_save"]) == ("TOKEN_CLS", ["classifier"])
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.classifier.weight"].shape == (2, 32)
    assert "base_model.model.ernie.encoder.layer.0.attention.self.query.lora_A.weight" in tensors

    records = [{"content": c, "prompt": p, "result_list": []} for c, p, _ in RECORDS]
    batch = task.encode(tok, records, with_targets=False)[2]
    start, end = model(**{k: jnp.asarray(v) for k, v in batch.items()})
    ours = np.stack([np.asarray(start), np.asarray(end)], -1)
    adapted, base = _peft(transformers.ErnieForTokenClassification, ernie_dir, out, num_labels=2)
    with torch.no_grad():
        theirs = adapted(**_torch(batch)).logits.numpy()
        plain = base(**_torch(batch)).logits.numpy()
    _report("UIE TOKEN_CLS (ERNIE)", np.abs(ours - theirs).max(), np.abs(plain - theirs).max())


# ----------------------------------------------------------------------------- bad settings


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_lora_settings_are_one_line_errors(data_dir, bert_dir, tmp_path):
    config = matching_config_of("pointwise", data_dir, bert_dir, tmp_path)
    config.model.lora.targets = ("q_proj",)  # the decoders' name: BERT's is "query"
    with pytest.raises(UserError) as e:
        matching.Task.create(config).build()
    assert _one_line(e).startswith("LoRA target 'q_proj' matches no Linear layer")
    assert "'query'" in str(e.value) and str(e.value).endswith("(config.model.lora.targets)")

    config.model.lora.targets = ("query", "classifier")  # the head is trained whole
    with pytest.raises(UserError, match=r"'classifier' is the task head.*"
                                        r"\(config.model.lora.targets\)$") as e:
        matching.Task.create(config).build()
    _one_line(e)

    config.model.lora.targets = ("query", "value")
    config.model.pooling = "mean"  # HF's classifier pools [CLS]: no adapter can stand for it
    with pytest.raises(UserError, match=r"config.model.pooling='mean' with a LoRA adapter") as e:
        matching.Task.create(config).build()
    _one_line(e)
    config.model.lora.export = "merged"  # folded in, the model builds (and trains)
    matching.Task.create(config).build()

    # p-tuning learns its prompt tokens' embeddings: LoRA would keep them frozen.
    config = tiny_config(p_tuning_config, "demo", data_dir, bert_dir, tmp_path)
    config.data.train = config.data.eval = str(data_dir / "reviews.tsv")
    config.data.test, config.data.labels = "", str(data_dir / "labels.txt")
    with pytest.raises(UserError, match=r"model.lora.rank.*p-tuning learns its prompt") as e:
        p_tuning.Task.create(config)
    _one_line(e)


def test_uie_checkpoint_base_needs_merged_export(data_dir, ernie_dir, tmp_path):
    """A UIE-layout checkpoint (``encoder.*`` keys, ``architectures: ["UIE"]``) is no base
    transformers loads as a token classifier, so an adapter of it is refused up front."""
    config = uie_config_of(data_dir, ernie_dir, tmp_path)
    task = uie.Task.create(config)
    model, tok = task.build()
    model = lora.merge_lora(model)
    bert.export_pretrained(model, task.built.config, tmp_path / "uie_ckpt", tok)
    config.model.path = str(tmp_path / "uie_ckpt")
    with pytest.raises(UserError, match=r"is a UIE checkpoint .*lora.export=merged") as e:
        uie.Task.create(config).build()
    _one_line(e)
    config.model.lora.export = "merged"
    built_model, _ = uie.Task.create(config).build()
    assert lora.lora_modules(built_model)
