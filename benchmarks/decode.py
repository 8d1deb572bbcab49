"""Decoding speed: our jitted ``lib.generate`` vs Hugging Face PyTorch ``generate``, side by side.

Both decode the same random model (built with transformers, saved, loaded by our port) from the
same prompts; compile/warm-up time is excluded from the timed runs and reported separately.
PyTorch uses as many threads as there are cores. The cases (``--cases``, all by default):

- ``greedy``: greedy decoding of ``--batch`` left-padded prompts;
- ``sample20``: LoopCoT's repeated evaluation, 20 sampled answers per prompt (top-k 50,
  top-p 0.8, temperature 0.8) for ``--sample-prompts`` prompts: ours prefills each prompt once
  (``num_return_sequences=20``), HF's ``generate(num_return_sequences=20)`` 20 times;
- ``beam3``: beam search with 3 beams (HF's defaults: length penalty 1, no early stopping);
- ``t5-beam3``: the same beam search with a T5 (v1.0, t5-small's shape: 6 + 6 layers, hidden
  512, 8 heads, MLP 2048) encoding ``--batch`` inputs of ``--prompt`` tokens.

``--model`` picks the decoder of the first three (``MODELS``), of about the same size
(8 layers, hidden 512, vocab 5000; the T5 has the same vocabulary):

- ``qwen2`` (default): Qwen2 (rotary, RMSNorm, grouped-query attention 8:2, SwiGLU) vs
  ``Qwen2ForCausalLM``;
- ``gpt2``: GPT-2 (learned positions, LayerNorm, fused ``c_attn``, gelu_new MLP 4 x hidden) vs
  ``GPT2LMHeadModel``.

    .venv/bin/python benchmarks/decode.py [--model qwen2|gpt2] [--cases greedy,sample20,...]
        [--batch 4 --sample-prompts 2 --prompt 64 --new 128 --repeats 3]

A quick check: ``--batch 2 --sample-prompts 1 --prompt 16 --new 8`` (about a minute).

After one warm-up call each, the two sides take turns for ``--repeats`` calls each (so that
a change of the machine's load hits both), and the median call counts. Prints, per case, the
median seconds of one call of each, tokens/s (returned tokens), the ratio PyTorch time /
ours, and for the deterministic cases the share of identical tokens; then the table of every
case. No EOS: both decode exactly ``--new`` tokens. The load average is printed too: on a
shared machine PyTorch's threaded BLAS slows down far more than XLA under contention
(``--torch-threads 1`` is the fairer comparison there), so compare runs on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lib.generate import generate, left_pad  # noqa: E402
from lib.models import gpt2, qwen2, t5  # noqa: E402

VOCAB = 5000
# name -> (HF model class, HF config class, its config, our loader: dir -> (model, cfg)).
MODELS = {
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, dict(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ), qwen2.load_pretrained),
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config, dict(
        vocab_size=VOCAB,
        n_embd=512,
        n_inner=2048,
        n_layer=8,
        n_head=8,
        n_positions=1024,
        tie_word_embeddings=True,
        bos_token_id=None,  # HF's default 50256 is outside this vocab
        eos_token_id=None,
    ), gpt2.load_pretrained),
    "t5": (transformers.T5ForConditionalGeneration, transformers.T5Config, dict(
        vocab_size=VOCAB,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_heads=8,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ), t5.load_pretrained),
}
CASES = ("greedy", "sample20", "beam3", "t5-beam3")
# LoopCoT's evaluation sampling (configs/loopcot.py).
SAMPLING = dict(top_k=50, top_p=0.8, temperature=0.8)
SAMPLES = 20
BEAMS = 3


class Result(NamedTuple):
    """One case: median seconds per call of each side, first-call seconds (compile included),
    returned tokens per call, and the share of identical tokens (None: sampled)."""

    case: str
    ours: float
    torch: float
    ours_first: float
    torch_first: float
    tokens: int
    identical: float | None


def _timed(fn: Callable) -> tuple[float, object]:
    """Wall time of one call of ``fn`` and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _alternating(ours: Callable, theirs: Callable, repeats: int):
    """``(median s of ours, its result, median s of theirs, its result)`` of ``repeats``
    calls each, the two sides taking turns, so that a change in the machine's load hits both."""
    times: tuple[list, list] = ([], [])
    outs: list = [None, None]
    for _ in range(repeats):
        for side, fn in enumerate((ours, theirs)):
            seconds, outs[side] = _timed(fn)
            times[side].append(seconds)
    return float(np.median(times[0])), outs[0], float(np.median(times[1])), outs[1]


def _build(name: str):
    """(HF model, our port) of ``MODELS[name]`` with the same random weights."""
    hf_class, config_class, config, load = MODELS[name]
    torch.manual_seed(0)
    hf_model = hf_class(config_class(**config)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model, _ = load(tmp)
    return hf_model, model


def _prompts(batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` left-padded random prompts, the longest ``length`` tokens, 8 fewer each."""
    rs = np.random.RandomState(0)
    lengths = [max(length - 8 * i, 1) for i in range(batch)]
    return left_pad([list(rs.randint(2, VOCAB, n)) for n in lengths], 0)


def _run(case: str, hf_model, model, ids, mask, new: int, repeats: int, **settings) -> Result:
    """Time ``generate`` of both sides with the same ``settings``; ``num_return_sequences``
    and ``num_beams`` as HF spells them."""
    seq2seq = hf_model.config.is_encoder_decoder
    sampled = settings.get("do_sample", False)
    key = jax.random.key(0)
    ours_fn = lambda: generate(  # noqa: E731
        model, ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0,
        rng=key if sampled else None, **settings,
    )
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def torch_fn():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = hf_model.generate(ids_t, attention_mask=mask_t, max_new_tokens=new,
                                    pad_token_id=0, eos_token_id=None, **settings)
        out = out[:, 1 if seq2seq else ids.shape[1]:].numpy()
        return np.pad(out, ((0, 0), (0, new - out.shape[1])))

    first_ours, _ = _timed(ours_fn)
    first_torch, _ = _timed(torch_fn)
    t_ours, tokens_ours, t_torch, tokens_torch = _alternating(ours_fn, torch_fn, repeats)
    same = None if sampled else float(np.mean(tokens_ours == tokens_torch))
    return Result(case, t_ours, t_torch, first_ours, first_torch, tokens_ours.size, same)


def _print(r: Result) -> None:
    same = "sampled" if r.identical is None else f"{r.identical * 100:.1f}% identical tokens"
    print(f"{r.case}: ours {r.ours:.3f} s ({r.tokens / r.ours:.1f} tokens/s; first call "
          f"{r.ours_first:.2f} s), HF {r.torch:.3f} s ({r.tokens / r.torch:.1f} tokens/s; "
          f"warm-up {r.torch_first:.2f} s), ratio {r.torch / r.ours:.2f}x, {same}", flush=True)


def main() -> None:
    """Build the models, then for each case warm up both implementations and time them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("qwen2", "gpt2"), default="qwen2")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sample-prompts", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {CASES}")

    torch.set_num_threads(args.torch_threads)
    print(
        f"{args.model} {MODELS[args.model][2]}; batch {args.batch}, prompts of up to "
        f"{args.prompt} tokens, {args.new} new tokens; {os.cpu_count()} cores, jax "
        f"{jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({args.torch_threads} threads); load average {os.getloadavg()[0]:.1f}", flush=True)
    ids, mask = _prompts(args.batch, args.prompt)
    run = lambda case, pair, ids, mask, **kw: _run(  # noqa: E731
        case, *pair, ids, mask, args.new, args.repeats, **kw)
    results = []
    decoder = _build(args.model) if set(cases) - {"t5-beam3"} else None
    if "greedy" in cases:
        results.append(run("greedy", decoder, ids, mask, do_sample=False))
        _print(results[-1])
    if "sample20" in cases:
        few = _prompts(args.sample_prompts, args.prompt)
        results.append(run(f"sample{SAMPLES}", decoder, *few, do_sample=True,
                           num_return_sequences=SAMPLES, **SAMPLING))
        _print(results[-1])
    if "beam3" in cases:
        results.append(run(f"beam{BEAMS}", decoder, ids, mask, num_beams=BEAMS,
                           do_sample=False))
        _print(results[-1])
    if "t5-beam3" in cases:
        # Encoder inputs are padded on the right.
        right = np.stack([np.roll(row, int(np.sum(m))) for row, m in zip(ids, mask)])
        right_mask = np.stack([np.roll(m, int(np.sum(m))) for m in mask])
        results.append(run(f"t5-beam{BEAMS}", _build("t5"), right, right_mask,
                           num_beams=BEAMS, do_sample=False))
        _print(results[-1])

    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("| case | rows x new tokens | ours s | HF s | ratio | identical tokens |")
    print("|---|---|---|---|---|---|")
    for r in results:
        same = "sampled" if r.identical is None else f"{r.identical * 100:.1f}%"
        print(f"| {r.case} | {r.tokens // args.new} x {args.new} | {r.ours:.3f} | "
              f"{r.torch:.3f} | **{r.torch / r.ours:.2f}x** | {same} |")


if __name__ == "__main__":
    main()
