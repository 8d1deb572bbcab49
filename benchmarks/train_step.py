"""Train-step speed: our jitted, sharded train step vs Hugging Face PyTorch, on this machine.

Four pairs, each at a small and a base size (vocab 21128; ``tiny`` is a toy size for quick
checks, ``tests/test_train_step_benchmark.py``). The model is built with ``transformers``,
saved, and loaded by our port, so both sides train the same weights on the same batch:

- ``bert-cls``: BERT sequence classification. Ours: ``lib.train.init_state`` + ``compile_step``
  (exactly what training runs: AdamW with the weight-decay mask, global-norm clipping, fp32,
  dropout on, donated state) around the loss of ``tasks.classification``; PyTorch:
  ``BertForSequenceClassification`` in train mode.
- ``qwen2-sft``: causal-LM SFT with the answer-only loss of ``tasks.sft`` (``lib.lm_data``) on a
  Qwen2-architecture decoder vs ``Qwen2ForCausalLM`` with the same labels.
- ``gpt2-sft``: the same SFT step on GPT-2 (``lib.models.gpt2``: learned positions, LayerNorm,
  fused ``c_attn``, gelu_new, tied head; the shapes of BERT's sizes, so base is GPT-2 small /
  ``uer/gpt2-chinese-cluecorpussmall``) vs ``GPT2LMHeadModel``.
- ``t5-seq2seq``: seq2seq fine-tuning with the teacher-forced, padding-free token-mean loss of
  ``tasks.seq2seq`` (``seq2seq_loss``) on a T5 v1.1 / mT5 (gated-GELU MLP, untied head: the
  architecture of t5-pegasus, which users fine-tune) vs ``MT5ForConditionalGeneration`` with the
  same ``labels`` (-100 on padding). Small is t5-v1_1-small's shape (6 + 6 layers, d_model 512,
  8 heads, d_ff 1024), base t5-v1_1-base's (12 + 12, 768, 12 heads, d_ff 2048); rows of 256
  source and 64 target tokens (``--seq`` sets the source, the target is a quarter of it),
  batch 8 (small) and 2 (base). Tokens/s count source and target tokens.

The decoders and T5 run without dropout (Qwen2 has none; GPT-2's ``*_pdrop`` and T5's
``dropout_rate`` are set to 0), so both sides compute the same loss; BERT keeps its dropout 0.1.

PyTorch runs ``torch.optim.AdamW`` with the same decay groups (no decay on biases and norm
weights) and linear schedule,
``clip_grad_norm_``, fp32, one thread per core. Each pair first prints how far the two models'
eval-mode outputs are apart and both first losses (the same weights and batch: they agree).

The first step (compilation, warm-up) is excluded and reported separately; then the two
alternate, ``--block`` steps each, so both see the same machine load. The table gives tokens/s
(batch x seq, padding included, over the median step), the ratio ours / PyTorch of the median
steps and of the fastest steps, and the mean load average while timing. On a shared machine
PyTorch's OpenMP threads slow down far more than XLA's under contention: compare runs taken at
a load average below the core count, or pin both to one core with ``--cores 1``.

    .venv/bin/python benchmarks/train_step.py [--pairs bert-cls,qwen2-sft,gpt2-sft,t5-seq2seq]
                                              [--sizes small,base] [--steps 10] [--batch N]
                                              [--seq 128] [--cores N]
    .venv/bin/python benchmarks/train_step.py --profile [--pairs gpt2-sft] [--sizes base]
                                              [--cores 1] [--trace DIR]

``--pairs`` defaults to all four; e.g. ``--pairs t5-seq2seq --sizes small --steps 2`` is a
quick check of one pair. ``--pairs t5-seq2seq --sizes small,base --steps 8`` prints (one run
on the 2-core development machine at load 1-2; see ``benchmarks/README.md``)::

    t5-seq2seq small: batch 8 x seq 256; eval outputs differ by 7.2e-07; ...; first loss
        9.9794 / 9.9794; fastest step 2.583 / 2.683 s
    ...
    step            batch ours tok/s torch tok/s  ratio ratio fastest  ours s torch s ...
    t5-seq2seq small     8        945         919   1.03          1.04   2.708   2.784 ...
    t5-seq2seq base      2        194         184   1.06          1.04   3.293   3.482 ...

``--profile`` (at the small size unless ``--sizes`` names others) prints XLA's cost analysis of
the compiled step, the time of the forward pass, of forward + backward and of the whole step,
then the step's time per kind of XLA op and its heaviest ops, from a ``jax.profiler`` trace
(``--trace DIR`` keeps it for Perfetto).
Matmuls on XLA's Eigen path run asynchronously on its thread pool and their trace spans
undercount them; ``--cores 1`` gives a complete per-op account.

Another model/step pair is one more function returning a ``Pair`` (see ``bert_classification``)
and one more ``PairSpec`` in ``PAIRS`` (with its own default batch and row length if it needs
them, as ``t5-seq2seq``); another causal-LM SFT pair is an HF config and our loader passed
to ``causal_lm_sft`` (see ``gpt2_sft``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from configs import classification as cls_config  # noqa: E402
from lib import lm_data, sharding, train  # noqa: E402
from lib.models import bert, gpt2, qwen2, t5  # noqa: E402
from tasks import classification, seq2seq  # noqa: E402

SIZES = {
    # A toy size for quick checks of the code paths (tests/test_train_step_benchmark.py).
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 intermediate_size=128),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                  intermediate_size=1024),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                 intermediate_size=3072),
}
# Qwen2-architecture decoders of about the same sizes (grouped-query attention 2:1, SwiGLU).
QWEN2_SIZES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=704),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                 num_key_value_heads=6, intermediate_size=2048),
}
# T5 v1.1 / mT5 (t5-pegasus's architecture: gated-GELU MLP, untied head) at the shapes of
# Google's t5-v1_1-small (6 + 6 layers, d_model 512, 8 heads of 64, d_ff 1024) and
# t5-v1_1-base (12 + 12, 768, 12 heads of 64, d_ff 2048).
T5_SIZES = {
    "tiny": dict(num_layers=2, num_decoder_layers=2, d_model=64, num_heads=4, d_kv=16,
                 d_ff=128),
    "small": dict(num_layers=6, num_decoder_layers=6, d_model=512, num_heads=8, d_kv=64,
                  d_ff=1024),
    "base": dict(num_layers=12, num_decoder_layers=12, d_model=768, num_heads=12, d_kv=64,
                 d_ff=2048),
}
# HF initialises T5's head and norms with std / value 1 (logits of std ~sqrt(d_model), a first
# loss in the hundreds); scaled by this factor the first loss is near ln(vocab), as in the
# other pairs.
T5_INIT_FACTOR = 0.1
# Base is run at batch 8 to keep a run within a few minutes; --batch sets both.
DEFAULT_BATCH = {"tiny": 8, "small": 16, "base": 8}
# The seq2seq pair's batches (its rows hold 256 + 64 tokens): a base step takes 6-8 s on one
# core of the 2-core development machine.
SEQ2SEQ_BATCH = {"tiny": 8, "small": 8, "base": 2}
VOCAB = 21128
NUM_LABELS = 2
# The training hyper-parameters of both sides (a typical BERT fine-tuning run).
TRAIN = dict(lr=2e-5, warmup_steps=10, schedule="linear", weight_decay=0.01, grad_clip=1.0,
             seed=0)
TOTAL_STEPS = 1000


@dataclasses.dataclass
class Pair:
    """One model/step pair: a step of ours and of PyTorch on the same batch.

    ``ours()`` / ``torch()`` run one train step, block until it is done and return the loss.
    ``tokens`` is the number of tokens one step processes. ``lower()`` lowers our jitted step
    for the batch (for ``--profile``); ``parts`` are extra jitted pieces to time there.
    Build a pair before any step runs: both sides start from the same weights.
    """

    name: str
    tokens: int
    ours: Callable[[], float]
    torch: Callable[[], float]
    lower: Callable[[], jax.stages.Lowered] | None = None
    parts: dict[str, Callable[[], object]] = dataclasses.field(default_factory=dict)
    # Max |ours - PyTorch| of the eval-mode outputs before training: both compute the same.
    output_diff: float = float("nan")


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids with some right padding (a quarter of the rows are half padding) and labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::4, seq // 2:] = 0
    ids[mask == 0] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "labels": rng.integers(0, NUM_LABELS, size=batch).astype(np.int32),
    }


def _torch_optimizer(model: torch.nn.Module):
    """AdamW with decay on everything but biases and norm weights (as ``lib.train``), linear
    schedule. Norms are found by module class (``LayerNorm``, ``Qwen2RMSNorm``), whatever their
    parameter names (GPT-2's ``ln_1``)."""
    norms = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower()
             for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or id(p) in norms else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAIN["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAIN["lr"], betas=(0.9, 0.999), eps=1e-8,
    )
    sched = transformers.get_linear_schedule_with_warmup(opt, TRAIN["warmup_steps"], TOTAL_STEPS)
    return opt, sched


def _our_step(model, loss_fn, logits_fn, host: dict[str, np.ndarray]):
    """Our side of a pair, exactly the trainer's pieces: ``init_state`` + ``compile_step`` on a
    one-axis data mesh, for ``loss_fn(model, batch, rng)``.

    Returns ``(step, parts, lower, forward)``: one train step returning its loss, the loss and
    loss + gradient as separate jitted functions (for ``--profile``), the lowering of the step,
    and the eval-mode ``logits_fn(model, batch)`` of the initial params as numpy.
    """
    tcfg = ml_collections.ConfigDict(TRAIN)
    mesh = sharding.make_mesh(-1, 1, 1)
    schedule = train.make_schedule(tcfg, TOTAL_STEPS)
    tx = train.make_optimizer(tcfg, schedule)
    graphdef, state, state_sh, frozen, frozen_sh = train.init_state(model, tx, mesh)
    step = train.compile_step(graphdef, loss_fn, tx, schedule, state_sh, frozen_sh, mesh,
                              grad_accum=1, seed=TRAIN["seed"])
    device_batch = sharding.shard_batch(host, mesh)
    holder = {"state": state}

    def ours() -> float:
        holder["state"], metrics = step(holder["state"], frozen, device_batch)
        return float(jax.block_until_ready(metrics["loss"]))

    def loss_only(params, batch):
        return loss_fn(nnx.merge(graphdef, params, frozen), batch, jax.random.key(0))[0]

    # Compiled as the train step is (lib.train's XLA options for this platform).
    options = train._compiler_options(jax.devices()[0].platform)
    fwd = jax.jit(loss_only, compiler_options=options)
    fwd_bwd = jax.jit(jax.grad(loss_only), compiler_options=options)
    parts = {
        "forward (loss)": lambda: jax.block_until_ready(fwd(holder["state"]["params"],
                                                            device_batch)),
        "forward + backward": lambda: jax.block_until_ready(
            fwd_bwd(holder["state"]["params"], device_batch)),
    }
    eval_logits = jax.jit(
        lambda params, b: logits_fn(nnx.merge(graphdef, params, frozen), b),
        compiler_options=options,
    )
    params0 = state["params"]
    forward = lambda: np.asarray(eval_logits(params0, device_batch))
    lower = lambda: step.lower(holder["state"], frozen, device_batch)
    return ours, parts, lower, forward


def _torch_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], float]:
    """PyTorch's side: forward with labels, backward, clip, AdamW, schedule (train mode)."""
    model.train()
    opt, sched = _torch_optimizer(model)

    def step() -> float:
        out = model(**inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def _hf_and_ours(hf_class: Callable[..., torch.nn.Module], hf_cfg,
                 load: Callable[[str], tuple]):
    """A randomly initialised (seed 0) ``hf_class(hf_cfg)`` and our port of it: saved, then
    read back by ``load(dir) -> (model, cfg)``."""
    torch.manual_seed(0)
    hf_model = hf_class(hf_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model, _ = load(tmp)
    return hf_model, model


def bert_classification(size: str, batch: int, seq: int) -> Pair:
    """BERT sequence classification: ``lib.train`` step vs ``BertForSequenceClassification``."""
    hf_cfg = transformers.BertConfig(
        vocab_size=VOCAB, max_position_embeddings=512, num_labels=NUM_LABELS,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        **SIZES[size],
    )
    hf_model, model = _hf_and_ours(
        transformers.BertForSequenceClassification, hf_cfg,
        lambda d: bert.load_pretrained(d, bert.BertForSequenceClassification),
    )
    host = random_batch(batch, seq, VOCAB)

    # The demo config's loss: plain cross-entropy (no focal term, no class weights).
    task = classification.Task(cls_config.get_config())
    ours, parts, lower, forward = _our_step(model, task.loss, task.logits, host)
    del model

    # --- PyTorch
    tb = {k: torch.from_numpy(v.astype(np.int64)) for k, v in host.items()}
    inputs = {k: tb[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        hf_logits = hf_model.eval()(**inputs).logits.numpy()
    diff = float(np.max(np.abs(forward() - hf_logits)))
    torch_step = _torch_step(hf_model, dict(inputs, labels=tb["labels"]))
    return Pair(f"bert-cls {size}", batch * seq, ours, torch_step, lower, parts, diff)


def lm_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """SFT rows as ``lib.lm_data`` builds them: a prompt, an answer, right padding (every other
    row ends a quarter early); ``labels`` are the next tokens of the answer part only, and
    ``label_positions`` where they are (the LM head runs there only)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, vocab, size=(batch, seq)).astype(np.int32)
    lengths = np.where(np.arange(batch) % 2 == 0, seq, seq - seq // 4)
    prompt = seq // 2
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids[mask == 0] = 0
    labels = np.full_like(ids, lm_data.IGNORE)
    labels[:, prompt - 1 : -1] = ids[:, prompt:]
    labels[:, :-1][mask[:, 1:] == 0] = lm_data.IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "label_positions": lm_data.label_positions(labels)}


def causal_lm_sft(name: str, hf_class: type, hf_cfg, load: Callable[[str], tuple],
                  batch: int, seq: int) -> Pair:
    """Causal-LM SFT (answer-only loss): ``tasks.sft``'s loss in the ``lib.train`` step vs the
    HF ``hf_class(hf_cfg)`` (a ``*ForCausalLM``) with ``labels`` (HF shifts them itself; ours
    are stored shifted); ``load(dir) -> (model, cfg)`` is our port's loader. ``hf_cfg`` must
    have no dropout: the two sides' first losses are compared."""
    hf_model, model = _hf_and_ours(hf_class, hf_cfg, load)
    host = lm_batch(batch, seq, VOCAB)
    logits_fn = lambda m, b: m(b["input_ids"], b["attention_mask"])[0]
    ours, parts, lower, forward = _our_step(model, lm_data.lm_loss, logits_fn, host)
    del model

    tb = {k: torch.from_numpy(v.astype(np.int64)) for k, v in host.items()}
    # HF labels are unshifted: the token itself at each target position, -100 elsewhere.
    hf_labels = torch.full_like(tb["labels"], lm_data.IGNORE)
    hf_labels[:, 1:] = tb["labels"][:, :-1]
    inputs = {"input_ids": tb["input_ids"], "attention_mask": tb["attention_mask"]}
    with torch.no_grad():
        hf_logits = hf_model.eval()(**inputs).logits.numpy()
    real = host["attention_mask"].astype(bool)  # padded positions' logits are not compared
    diff = float(np.max(np.abs(forward() - hf_logits)[real]))
    torch_step = _torch_step(hf_model, dict(inputs, labels=hf_labels))
    return Pair(name, batch * seq, ours, torch_step, lower, parts, diff)


def qwen2_sft(size: str, batch: int, seq: int) -> Pair:
    """``causal_lm_sft`` on a Qwen2-architecture decoder vs ``Qwen2ForCausalLM``."""
    hf_cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, max_position_embeddings=1024, rope_theta=10000.0,
        tie_word_embeddings=True, **QWEN2_SIZES[size],
    )
    return causal_lm_sft(f"qwen2-sft {size}", transformers.Qwen2ForCausalLM, hf_cfg,
                         qwen2.load_pretrained, batch, seq)


def gpt2_sft(size: str, batch: int, seq: int) -> Pair:
    """``causal_lm_sft`` on GPT-2 (BERT's shapes at each size, MLP 4 x hidden, tied head) vs
    ``GPT2LMHeadModel``, dropout off on both sides (HF's default ``*_pdrop`` is 0.1)."""
    s = SIZES[size]
    hf_cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=max(1024, seq), n_layer=s["num_hidden_layers"],
        n_embd=s["hidden_size"], n_head=s["num_attention_heads"], n_inner=s["intermediate_size"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None,  # HF's 50256 is outside this vocab
    )
    return causal_lm_sft(f"gpt2-sft {size}", transformers.GPT2LMHeadModel, hf_cfg,
                         gpt2.load_pretrained, batch, seq)


def seq2seq_batch(batch: int, source: int, target: int, vocab: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Training rows as ``tasks.seq2seq.encode_pairs`` builds them, right-padded: a source of
    ``source`` slots (every other row a quarter shorter), a target of ``target`` slots (every
    other row, offset by one, a third shorter) whose ``labels`` are ``IGNORE`` on padding; the
    decoder reads ``[start] + target[:-1]`` (start and pad 0, as T5's)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(batch)
    src_len = np.where(rows % 2 == 0, source, source - source // 4)
    tgt_len = np.where(rows % 2 == 1, target, target - target // 3)
    mask = (np.arange(source)[None, :] < src_len[:, None]).astype(np.int32)
    ids = rng.integers(10, vocab, size=(batch, source)).astype(np.int32) * mask
    dec_mask = (np.arange(target)[None, :] < tgt_len[:, None]).astype(np.int32)
    labels = np.where(dec_mask == 1, rng.integers(10, vocab, size=(batch, target)),
                      seq2seq.IGNORE).astype(np.int32)
    dec_in = np.zeros_like(labels)
    dec_in[:, 1:] = np.maximum(labels[:, :-1], 0)
    dec_in *= dec_mask
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_in,
            "decoder_attention_mask": dec_mask, "labels": labels}


def _untied_mt5(hf_cfg) -> torch.nn.Module:
    """``MT5ForConditionalGeneration`` with its own LM head, as t5-pegasus and Google's mT5 /
    T5 v1.1 checkpoints load. transformers 5 builds every (m)T5 with the head tied to the
    shared embedding (its configs force ``tie_word_embeddings``) and unties a checkpoint whose
    stored ``lm_head.weight`` differs; this gives the head its own weights, initialised as HF
    initialises an untied one."""
    model = transformers.MT5ForConditionalGeneration(hf_cfg)
    head = torch.empty_like(model.shared.weight).normal_(0.0, hf_cfg.initializer_factor)
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


def t5_seq2seq(size: str, batch: int, seq: int) -> Pair:
    """Seq2seq fine-tuning (teacher forcing, token-mean loss over the targets) of a T5 v1.1 /
    mT5 (``T5_SIZES``): ``tasks.seq2seq``'s loss in the ``lib.train`` step vs
    ``MT5ForConditionalGeneration`` with the same ``labels`` (HF shifts them into the decoder
    input itself). ``seq`` source tokens, ``seq // 4`` target tokens; no dropout on either side
    (``dropout_rate`` 0), so the first losses agree."""
    hf_cfg = transformers.MT5Config(
        vocab_size=VOCAB, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
        decoder_start_token_id=0, eos_token_id=1, initializer_factor=T5_INIT_FACTOR,
        **T5_SIZES[size],
    )
    hf_model, model = _hf_and_ours(_untied_mt5, hf_cfg, t5.load_pretrained)
    assert not model.config.tie_word_embeddings and hf_model.lm_head.weight is not \
        hf_model.shared.weight
    target = max(seq // 4, 2)
    host = seq2seq_batch(batch, seq, target, VOCAB)
    logits_fn = lambda m, b: m(b["input_ids"], b["attention_mask"], b["decoder_input_ids"],
                               b["decoder_attention_mask"])
    ours, parts, lower, forward = _our_step(model, seq2seq.seq2seq_loss, logits_fn, host)
    del model

    tb = {k: torch.from_numpy(v.astype(np.int64)) for k, v in host.items()}
    inputs = {"input_ids": tb["input_ids"], "attention_mask": tb["attention_mask"]}
    with torch.no_grad():
        hf_logits = hf_model.eval()(**inputs, labels=tb["labels"]).logits.numpy()
    real = host["decoder_attention_mask"].astype(bool)  # padded targets are not compared
    diff = float(np.max(np.abs(forward() - hf_logits)[real]))
    torch_step = _torch_step(hf_model, dict(inputs, labels=tb["labels"]))
    return Pair(f"t5-seq2seq {size}", batch * (seq + target), ours, torch_step, lower, parts,
                diff)


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """A pair's builder and the batch shape it runs at when ``--batch`` / ``--seq`` are not
    given."""

    # builder(size, batch, seq) -> Pair.
    build: Callable[[str, int, int], Pair]
    # Rows per batch at each size.
    batch: dict[str, int] = dataclasses.field(default_factory=lambda: DEFAULT_BATCH)
    # Tokens per row (seq2seq: source tokens; the target has a quarter as many).
    seq: int = 128


# name -> PairSpec; a new model/step pair is one more entry.
PAIRS: dict[str, PairSpec] = {
    "bert-cls": PairSpec(bert_classification),
    "qwen2-sft": PairSpec(qwen2_sft),
    "gpt2-sft": PairSpec(gpt2_sft),
    "t5-seq2seq": PairSpec(t5_seq2seq, SEQ2SEQ_BATCH, seq=256),
}


def measure(pair: Pair, steps: int, block: int) -> dict[str, float]:
    """Warm up both sides, then alternate blocks of ``block`` steps until each ran ``steps``.

    Returns the first-step times (compile / warm-up), the median and fastest step times, the
    first losses and the mean load average while timing.
    """
    t0 = time.perf_counter()
    loss_ours = pair.ours()
    first_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss_torch = pair.torch()
    first_torch = time.perf_counter() - t0
    pair.ours(), pair.torch()  # a second warm-up step each (allocator, caches)
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    loads = [os.getloadavg()[0]]
    while len(times["ours"]) < steps:
        for side, fn in (("ours", pair.ours), ("torch", pair.torch)):
            for _ in range(min(block, steps - len(times[side]))):
                t0 = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    out = {"first_ours": first_ours, "first_torch": first_torch, "loss_ours": loss_ours,
           "loss_torch": loss_torch, "load": statistics.mean(loads)}
    for side, t in times.items():
        out[side] = statistics.median(t)
        out[side + "_min"] = min(t)
    return out


def print_table(rows: list[tuple[Pair, int, dict[str, float]]]) -> None:
    """tokens/s (median step) of both sides and the ratios ours / PyTorch, one line per run."""
    head = (f"{'step':<15} {'batch':>5} {'ours tok/s':>10} {'torch tok/s':>11} {'ratio':>6} "
            f"{'ratio fastest':>13} {'ours s':>7} {'torch s':>7} {'compile s':>9} {'load':>5}")
    print(head)
    print("-" * len(head))
    for pair, batch, r in rows:
        print(f"{pair.name:<15} {batch:>5} {pair.tokens / r['ours']:>10.0f} "
              f"{pair.tokens / r['torch']:>11.0f} {r['torch'] / r['ours']:>6.2f} "
              f"{r['torch_min'] / r['ours_min']:>13.2f} {r['ours']:>7.3f} {r['torch']:>7.3f} "
              f"{r['first_ours'] - r['ours']:>9.1f} {r['load']:>5.1f}")


def profile(pair: Pair, trace_dir: str | None, top: int) -> None:
    """Cost analysis, timing of the step's parts, and where the step's time goes per XLA op."""
    compiled = pair.lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    print(f"XLA cost analysis: {flops / 1e9:.1f} GFLOP, "
          f"{float(cost.get('bytes accessed', 0.0)) / 1e9:.2f} GB accessed per step")
    step_s = 0.0
    for name, fn in {**pair.parts, "whole step": pair.ours}.items():
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        step_s = min(times)
        print(f"  {name:<20} {step_s:.3f} s (fastest of 3)")
    print(f"  whole step: {flops / 1e9 / step_s:.1f} GFLOP/s")
    steps = 3
    with tempfile.TemporaryDirectory() as tmp:
        out = trace_dir or tmp
        with jax.profiler.trace(out):
            for _ in range(steps):
                pair.ours()
        files = sorted(Path(out).rglob("*.trace.json.gz"))
        per_op = _op_times(files[-1]) if files else {}
        if trace_dir:
            print(f"trace written to {trace_dir} (open the .trace.json.gz in Perfetto)")
    if not per_op:
        print("the trace has no per-op events")
        return
    _print_op_table(per_op, compiled.as_text(), steps, top)


def _op_times(trace_file: Path) -> dict[str, tuple[float, int]]:
    """Total microseconds and count of each XLA op (thunk) in a ``jax.profiler`` trace."""
    events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    out: dict[str, tuple[float, int]] = {}
    for e in events:
        name = e.get("name", "")
        # Python frames ($...), the executor's own spans and waits are not ops.
        if e.get("ph") != "X" or name.startswith(("$", "Thunk", "Slinky", "end: ", "Wait ",
                                                  "PjitFunction")):
            continue
        total, n = out.get(name, (0.0, 0))
        out[name] = (total + float(e.get("dur", 0.0)), n + 1)
    return out


def _print_op_table(per_op: dict[str, tuple[float, int]], hlo: str, steps: int, top: int):
    """Per step: time by op kind (the name without its number), then the heaviest single ops
    with the jax operation they come from (HLO ``op_name`` metadata)."""
    kinds: dict[str, list[float]] = {}
    for name, (us, n) in per_op.items():
        kind = re.sub(r"\.\d+$", "", name)
        acc = kinds.setdefault(kind, [0.0, 0])
        acc[0] += us
        acc[1] += n
    total = sum(us for us, _ in per_op.values())
    print(f"time in XLA ops: {total / steps / 1e3:.0f} ms per step; by kind (top {top}):")
    for kind, (us, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us / steps / 1e3:8.1f} ms {100 * us / total:5.1f}% {n // steps:5d}x  {kind}")
    origin = {}
    for m in re.finditer(r"%(\S+) = (\S+) .*?op_name=\"([^\"]*)\"", hlo):
        origin.setdefault(m.group(1), (m.group(2), m.group(3)))
    print(f"heaviest ops (top {top}):")
    for name, (us, _) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]:
        shape, op_name = origin.get(name, ("", ""))
        print(f"  {us / steps / 1e3:8.1f} ms  {name:<28} {shape:<22} {op_name[:70]}")


def main() -> None:
    """Parse flags, run every requested size, print the table (or the profile)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"of {sorted(PAIRS)}")
    parser.add_argument("--sizes", default=None,
                        help=f"of {sorted(SIZES)} (default small,base; small with --profile)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--block", type=int, default=1, help="steps per alternation")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch of every size (default {DEFAULT_BATCH}; t5-seq2seq "
                             f"{SEQ2SEQ_BATCH})")
    parser.add_argument("--seq", type=int, default=None,
                        help="tokens per row (default 128; t5-seq2seq: 256 source tokens, "
                             "the target a quarter of the source)")
    parser.add_argument("--cores", type=int, default=None,
                        help="pin the process to this many cores (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="profile our step instead of comparing")
    parser.add_argument("--trace", default=None, help="with --profile: jax.profiler trace dir")
    parser.add_argument("--top", type=int, default=15, help="with --profile: rows per table")
    args = parser.parse_args()
    pairs = args.pairs.split(",")
    sizes = (args.sizes or ("small" if args.profile else "small,base")).split(",")
    for names, known, flag in ((pairs, PAIRS, "--pairs"), (sizes, SIZES, "--sizes")):
        for name in names:
            if name not in known:
                parser.error(f"{flag}: unknown {name!r}; choose from {sorted(known)}")

    allowed = sorted(os.sched_getaffinity(0))
    if args.cores:
        # Before jax starts its backend: XLA sizes its thread pool by the usable cores.
        os.sched_setaffinity(0, allowed[: args.cores])
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}, {jax.device_count()} device), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    for pair_name in pairs:
        for size in sizes:
            spec = PAIRS[pair_name]
            batch, seq = args.batch or spec.batch[size], args.seq or spec.seq
            pair = spec.build(size, batch, seq)
            if args.profile:
                print(f"{pair.name}: batch {batch}, seq {seq}")
                profile(pair, args.trace, args.top)
                continue
            r = measure(pair, args.steps, args.block)
            print(f"{pair.name}: batch {batch} x seq {seq}; eval outputs differ by "
                  f"{pair.output_diff:.1e}; first step ours {r['first_ours']:.1f} s, torch "
                  f"{r['first_torch']:.2f} s; first loss {r['loss_ours']:.4f} / "
                  f"{r['loss_torch']:.4f}; fastest step {r['ours_min']:.3f} / "
                  f"{r['torch_min']:.3f} s", flush=True)
            rows.append((pair, batch, r))
            del pair
    if rows:
        print()
        print_table(rows)


if __name__ == "__main__":
    main()
