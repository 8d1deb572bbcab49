"""GPU readiness: a Qwen2.5-0.5B-shaped SFT train step and batched greedy decoding, ours vs HF
PyTorch, side by side in one run on one CUDA GPU.

The model is a randomly initialised ``transformers.Qwen2ForCausalLM`` of the Qwen2.5-0.5B shape
(vocab 151936, hidden 896, intermediate 4864, 24 layers, 14 heads, 2 kv heads, tied
embeddings, rope_theta 1e6), saved to a temporary directory and loaded by our port with
``lib.models.qwen2.load_pretrained(dir, dtype=...)``: both sides start from the same weights.
No network is needed. Both compute in bf16 with fp32 parameters: ours through the config's
compute dtype, PyTorch through ``torch.autocast(dtype=bfloat16)`` around the forward (the
backward and the optimizer outside it, as PyTorch's AMP recipe does), with
``attn_implementation="sdpa"``.

1. SFT train step, built as ``benchmarks/train_step.py``'s ``qwen2-sft`` pair builds it (its
   helpers are imported, not copied): ours is ``lib.train.init_state`` + ``compile_step``
   around ``lib.lm_data.lm_loss`` with ``label_positions`` (the LM head runs at the answer
   positions only, as in training); PyTorch is ``Qwen2ForCausalLM`` with ``labels``
   (every position's logits), ``torch.optim.AdamW`` with the same decay groups, schedule and
   gradient clipping. Same batch (``lm_batch``: half prompt, half answer, some right padding).
2. Batched greedy decoding of the same prompts (left-padded, lengths from ``--prompt`` down to
   half of it), no EOS so both produce exactly ``--new`` tokens: ``lib.generate.generate``
   against HF ``generate`` (under autocast; its KV cache is bf16 as ours). The fraction of
   identical greedy tokens is reported, not asserted: in bf16 the two may diverge.

Timing: the first step / call of each side (compilation, warm-up) is excluded and reported
separately, with one more warm-up train step each; then the train steps of both sides
alternate and the median step counts; decoding is timed ``--repeats`` times, median. Every
timed call ends synchronised (``jax.block_until_ready`` / ``np.asarray`` for ours,
``torch.cuda.synchronize`` for PyTorch).

MFU (model FLOPs utilisation) = model FLOPs per step / median step time / peak FLOP/s, with
model FLOPs per step = tokens * (6 * N + 12 * L * S * H): N the parameter count (the tied
embedding counted once: it is the LM head's matmul), L layers, S the sequence length, H the
hidden size (= heads x head dim), tokens = batch x S, padding included. The ``6 N`` term is
forward + backward of every weight matmul, the ``12 L S H`` term the attention products
(scores and weighted values, causal masking not discounted). Both sides are charged the same
model FLOPs, although ours skips the LM head at prompt and padding positions. The peak is
``--peak-tflops`` (default 989: H100 / H200 SXM bf16 dense).

    python benchmarks/gpu.py [--batch 8] [--seq 1024] [--steps 10] [--decode-batch 16]
                             [--prompt 128] [--new 128] [--repeats 3] [--peak-tflops 989]
    python benchmarks/gpu.py --dry

``--dry`` runs the same code on the CPU at a toy size (2 layers, hidden 64, vocab 512, seq 64,
batch 2, 2 timed steps, 8 new tokens) in fp32, where both sides compute the same thing: the
test suite runs it. Without ``--dry`` and without a GPU visible to both jax and torch the
script exits with a one-line message. The output ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

# Before jax (and torch) start: the toy run is a CPU run whatever accelerators there are; a
# GPU run uses one GPU for both frameworks, and jax allocates GPU memory as it needs it
# instead of taking 75% up front (PyTorch trains in the same process).
if "--dry" in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
else:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import decode as decode_bench  # noqa: E402
from benchmarks import train_step  # noqa: E402
from lib import lm_data  # noqa: E402
from lib.generate import generate, left_pad  # noqa: E402
from lib.models import qwen2  # noqa: E402

# Qwen2.5-0.5B (its config.json, weights aside).
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
    rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
)
# The --dry toy: the same architecture (GQA 2:1, tied embeddings), tiny.
TOY = dict(QWEN25_05B, vocab_size=512, hidden_size=64, intermediate_size=176,
           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024)
# Run sizes: the GPU defaults and the --dry ones; a flag overrides either.
GPU_RUN = dict(batch=8, seq=1024, steps=10, decode_batch=16, prompt=128, new=128, repeats=3,
               dtype="bfloat16")
DRY_RUN = dict(batch=2, seq=64, steps=2, decode_batch=4, prompt=16, new=8, repeats=2,
               dtype="float32")
PEAK_TFLOPS = 989.0  # H100 / H200 SXM, bf16 dense
PAD = 0


class Autocast(torch.nn.Module):
    """``model``'s forward under ``torch.autocast`` (bf16 compute, fp32 parameters) when
    ``enabled``; ``train_step``'s PyTorch step runs backward and AdamW outside of it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, enabled: bool):
        super().__init__()
        self.model = model
        self.device_type = device.type
        self.enabled = enabled

    def context(self):
        """The autocast context of this wrapper (also for ``generate``)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled)

    def forward(self, **inputs):
        with self.context():
            return self.model(**inputs)


def synchronized(fn, device: torch.device):
    """``fn`` followed by ``torch.cuda.synchronize`` on a GPU: a timed call ends when the GPU
    is done."""

    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def build_models(run: dict, model_cfg: dict, device: torch.device):
    """The random HF model (on ``device``) and ours loaded from its saved copy: same weights."""
    hf_cfg = transformers.Qwen2Config(**model_cfg, attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:  # initialise on the GPU directly: 0.5 B parameters
        hf_model = transformers.Qwen2ForCausalLM(hf_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model, _ = qwen2.load_pretrained(tmp, dtype=run["dtype"])
    autocast = Autocast(hf_model, device, enabled=run["dtype"] == "bfloat16")
    return hf_model, autocast, model


def sft_pair(run: dict, model_cfg: dict, model, autocast: Autocast, device: torch.device):
    """``train_step``'s SFT pair on this model: our ``lib.train`` step and PyTorch's, one batch.

    Builds our step from ``model`` (which the donated train state then owns) and PyTorch's
    from ``autocast.model``.
    """
    host = train_step.lm_batch(run["batch"], run["seq"], model_cfg["vocab_size"])
    logits_fn = lambda m, b: m(b["input_ids"], b["attention_mask"])[0]
    ours, _, _, _ = train_step._our_step(model, lm_data.lm_loss, logits_fn, host)

    batch = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in host.items()}
    # HF shifts the labels itself: the target token sits at its own position, -100 elsewhere.
    hf_labels = torch.full_like(batch["labels"], lm_data.IGNORE)
    hf_labels[:, 1:] = batch["labels"][:, :-1]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=hf_labels)
    torch_fn = synchronized(train_step._torch_step(autocast, inputs), device)
    return train_step.Pair("qwen2.5-0.5b sft", run["batch"] * run["seq"], ours, torch_fn)


def median_calls(fn, repeats: int) -> tuple[float, float, object]:
    """Time of a first (warm-up) call, median of ``repeats`` more calls, the last result."""
    first, out = decode_bench._timed(fn)
    times = []
    for _ in range(repeats):
        seconds, out = decode_bench._timed(fn)
        times.append(seconds)
    return first, statistics.median(times), out


def decode_both(run: dict, model_cfg: dict, model, autocast: Autocast, device) -> dict:
    """Greedy decoding of the same left-padded prompts by both; tokens/s, warm-up, agreement."""
    batch, prompt, new = run["decode_batch"], run["prompt"], run["new"]
    rs = np.random.RandomState(0)
    # From --prompt tokens down to about half of it: left padding is exercised.
    lengths = [prompt - i * (prompt // 2) // max(batch - 1, 1) for i in range(batch)]
    ids, mask = left_pad([list(rs.randint(1, model_cfg["vocab_size"], n)) for n in lengths], PAD)
    ids_t, mask_t = (torch.tensor(a, dtype=torch.long, device=device) for a in (ids, mask))

    def ours():
        # No EOS: exactly `new` tokens. Returns numpy, so the call ends synchronised.
        return generate(model, ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=PAD)

    def theirs():
        with torch.inference_mode(), autocast.context():
            out = autocast.model.generate(ids_t, attention_mask=mask_t, max_new_tokens=new,
                                          do_sample=False, pad_token_id=PAD, eos_token_id=None)
        return out[:, ids.shape[1]:].cpu().numpy()  # a device-to-host copy: synchronised

    autocast.model.eval()
    first_ours, t_ours, tokens_ours = median_calls(ours, run["repeats"])
    first_torch, t_torch, tokens_torch = median_calls(synchronized(theirs, device),
                                                      run["repeats"])
    n = batch * new
    return {
        "decode_tok_s_ours": n / t_ours, "decode_tok_s_torch": n / t_torch,
        "decode_ratio": t_torch / t_ours,
        "decode_s_ours": t_ours, "decode_s_torch": t_torch,
        "decode_first_s_ours": first_ours, "decode_first_s_torch": first_torch,
        "decode_identical": float(np.mean(tokens_ours == tokens_torch)),
        "prompt_lengths": lengths,
    }


def train_both(run: dict, model_cfg: dict, model, autocast, device, peak_tflops: float) -> dict:
    """Both SFT train steps (``train_step.measure``: warm-up, then alternating), MFU."""
    pair = sft_pair(run, model_cfg, model, autocast, device)
    r = train_step.measure(pair, run["steps"], block=1)
    n_params = sum(p.numel() for p in autocast.model.parameters())  # tied: counted once
    flops = pair.tokens * (
        6 * n_params
        + 12 * model_cfg["num_hidden_layers"] * run["seq"] * model_cfg["hidden_size"]
    )
    out = {"params": n_params, "tokens_per_step": pair.tokens,
           "model_tflop_per_step": flops / 1e12}
    for side in ("ours", "torch"):
        out[f"train_tok_s_{side}"] = pair.tokens / r[side]
        out[f"mfu_{side}"] = flops / r[side] / (peak_tflops * 1e12)
        out[f"train_step_s_{side}"] = r[side]
        out[f"train_first_s_{side}"] = r[f"first_{side}"]
        out[f"first_loss_{side}"] = r[f"loss_{side}"]
    out["train_ratio"] = r["torch"] / r["ours"]
    return out


def print_table(res: dict) -> None:
    """The figures side by side: ours, HF PyTorch, ours / PyTorch (tokens/s: higher is
    better; the ratios are speed ratios)."""
    rows = [
        ("sft train tokens/s", "train_tok_s", ".0f", "train_ratio"),
        ("sft train MFU", "mfu", ".2%", None),
        ("sft median step s", "train_step_s", ".4f", None),
        ("sft first step s (compile)", "train_first_s", ".2f", None),
        ("sft first loss", "first_loss", ".6f", None),
        ("decode tokens/s", "decode_tok_s", ".1f", "decode_ratio"),
        ("decode median call s", "decode_s", ".4f", None),
        ("decode first call s (compile)", "decode_first_s", ".2f", None),
    ]
    head = f"{'':<30} {'ours':>12} {'HF PyTorch':>12} {'ours / HF':>10}"
    print(head)
    print("-" * len(head))
    for label, key, fmt, ratio in rows:
        ours, theirs = res[f"{key}_ours"], res[f"{key}_torch"]
        ratio_text = f"{res[ratio]:>10.2f}" if ratio else ""
        print(f"{label:<30} {ours:>12{fmt}} {theirs:>12{fmt}} {ratio_text}")
    print(f"{'identical greedy tokens':<30} {res['decode_identical']:>25.1%}")


def main() -> None:
    """Parse flags, check the devices, build the models, decode, train, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true",
                        help="toy sizes on the CPU, fp32 (what the test suite runs)")
    for name in ("batch", "seq", "steps", "decode-batch", "prompt", "new", "repeats"):
        key = name.replace("-", "_")
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"default {GPU_RUN[key]} ({DRY_RUN[key]} with --dry)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="compute dtype of both sides (default bfloat16; float32 with --dry)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                        help=f"peak FLOP/s of the device for MFU, in TFLOP/s (default "
                             f"{PEAK_TFLOPS:g}: H100/H200 bf16 dense)")
    args = parser.parse_args()
    run = dict(DRY_RUN if args.dry else GPU_RUN)
    run.update({k: v for k, v in vars(args).items() if k in run and v is not None})
    model_cfg = TOY if args.dry else QWEN25_05B

    jax_dev = jax.devices()[0]
    if not args.dry and (jax_dev.platform != "gpu" or not torch.cuda.is_available()):
        sys.exit(f"gpu.py: no GPU visible (jax: {jax_dev.platform}, torch.cuda.is_available(): "
                 f"{torch.cuda.is_available()}); run with --dry for the CPU toy run")
    device = torch.device("cpu" if args.dry else "cuda")
    if args.dry:
        # The toy run checks the code paths, not speed: one thread keeps PyTorch's OpenMP pool
        # from stalling on a busy machine.
        torch.set_num_threads(1)
    torch_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"jax {jax.__version__}: {jax_dev.platform} {jax_dev.device_kind} "
          f"({jax.device_count()} device); torch {torch.__version__} (cuda "
          f"{torch.version.cuda}): {torch_name}; transformers {transformers.__version__}")
    print(f"{'dry run (CPU, toy size)' if args.dry else 'GPU run'}: model {model_cfg}")
    print(f"compute {run['dtype']}, fp32 params; sft batch {run['batch']} x seq {run['seq']}, "
          f"{run['steps']} timed steps; decode batch {run['decode_batch']}, prompt "
          f"{run['prompt']}, {run['new']} new tokens, {run['repeats']} timed calls; peak "
          f"{args.peak_tflops:g} TFLOP/s", flush=True)

    hf_model, autocast, model = build_models(run, model_cfg, device)
    # Decoding first: the train steps change both models' weights (ours are donated).
    res = decode_both(run, model_cfg, model, autocast, device)
    res.update(train_both(run, model_cfg, model, autocast, device, args.peak_tflops))
    del model, hf_model

    print(f"{res['params'] / 1e6:.1f} M params, {res['model_tflop_per_step']:.3f} model "
          f"TFLOP per train step; decode prompts {res.pop('prompt_lengths')} tokens")
    print()
    print_table(res)
    print()
    print(json.dumps({
        "mode": "dry" if args.dry else "gpu", "jax_device": jax_dev.device_kind,
        "torch_device": torch_name, "jax": jax.__version__, "torch": torch.__version__,
        "peak_tflops": args.peak_tflops, **run, **res,
    }))


if __name__ == "__main__":
    main()
