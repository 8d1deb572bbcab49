"""Greedy decoding speed: our jitted ``lib.generate`` vs Hugging Face PyTorch ``generate``.

Both decode the same random model (built with transformers, saved, loaded by our port) from the
same left-padded prompts; compile/warm-up time is excluded from the timed run and reported
separately. PyTorch uses as many threads as there are cores. ``--model`` picks the architecture
(``MODELS``), of about the same size (8 layers, hidden 512, vocab 5000):

- ``qwen2`` (default): Qwen2 (rotary, RMSNorm, grouped-query attention 8:2, SwiGLU) vs
  ``Qwen2ForCausalLM``;
- ``gpt2``: GPT-2 (learned positions, LayerNorm, fused ``c_attn``, gelu_new MLP 4 x hidden) vs
  ``GPT2LMHeadModel``.

    .venv/bin/python benchmarks/decode.py [--model qwen2|gpt2] [--batch 4 --prompt 64 --new 128
                                          --repeats 1]

A quick check of one model: ``--model gpt2 --batch 2 --prompt 16 --new 8``.

Prints the config, tokens/s of both, the ratio ours / PyTorch, and whether the greedy tokens
are identical. The load average is printed too: on a shared machine PyTorch's threaded BLAS
slows down far more than XLA under contention, so compare runs on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lib.generate import generate, left_pad  # noqa: E402
from lib.models import gpt2, qwen2  # noqa: E402

# name -> (HF model class, HF config class, its config, our loader: dir -> (model, cfg)).
MODELS = {
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, dict(
        vocab_size=5000,
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
        vocab_size=5000,
        n_embd=512,
        n_inner=2048,
        n_layer=8,
        n_head=8,
        n_positions=1024,
        tie_word_embeddings=True,
        bos_token_id=None,  # HF's default 50256 is outside this vocab
        eos_token_id=None,
    ), gpt2.load_pretrained),
}


def _timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls of ``fn`` and its last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    """Build the model, warm up both implementations, time one greedy run of each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    torch.set_num_threads(args.torch_threads)
    hf_class, config_class, config, load = MODELS[args.model]
    torch.manual_seed(0)
    hf_model = hf_class(config_class(**config)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model, _ = load(tmp)

    rs = np.random.RandomState(0)
    # Varying prompt lengths so that left padding is exercised, the longest is --prompt.
    lengths = [args.prompt - 8 * i for i in range(args.batch)]
    ids, mask = left_pad([list(rs.randint(1, config["vocab_size"], n)) for n in lengths], 0)
    # No EOS: both decode exactly --new tokens.
    ours_fn = lambda: generate(
        model, ids, mask, max_new_tokens=args.new, eos_token_id=[], pad_token_id=0
    )
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def torch_fn():
        with torch.inference_mode():
            out = hf_model.generate(
                ids_t,
                attention_mask=mask_t,
                max_new_tokens=args.new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[:, ids.shape[1] :].numpy()

    first_ours, _ = _timed(ours_fn, 1)
    first_torch, _ = _timed(torch_fn, 1)
    t_ours, tokens_ours = _timed(ours_fn, args.repeats)
    t_torch, tokens_torch = _timed(torch_fn, args.repeats)

    n_tokens = args.batch * args.new
    print(f"{args.model} config: {config}")
    print(
        f"batch {args.batch}, prompts {lengths} tokens (left-padded to {ids.shape[1]}), "
        f"{args.new} new tokens, greedy; {cores} cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({args.torch_threads} threads); load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"ours (jax, jitted):   {n_tokens / t_ours:8.1f} tokens/s  "
        f"({t_ours:.3f} s, {t_ours / args.new * 1e3:.1f} ms/step; first call incl. compile "
        f"{first_ours:.2f} s, compile ~{first_ours - t_ours:.2f} s)"
    )
    print(
        f"HF PyTorch generate:  {n_tokens / t_torch:8.1f} tokens/s  "
        f"({t_torch:.3f} s, {t_torch / args.new * 1e3:.1f} ms/step; warm-up {first_torch:.2f} s)"
    )
    print(f"ratio ours / PyTorch: {t_torch / t_ours:.2f}x")
    same = np.mean(tokens_ours == tokens_torch)
    print(f"identical greedy tokens: {same * 100:.1f}%")


if __name__ == "__main__":
    main()
