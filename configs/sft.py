r"""Supervised fine-tuning of a decoder LM on alpaca / prompt-answer records.

Variants (``--config=configs/sft.py:VARIANT``):
  demo                   a tiny Qwen2 trained from scratch with a character vocabulary on the
                         shipped alpaca demo set ``data/sft`` (the default)
  qwen2.5-0.5b-masked    Qwen2.5-0.5B, full fine-tune, loss on the output only
  qwen2.5-0.5b-unmasked  Qwen2.5-0.5B, full fine-tune, loss on the whole sequence
  qwen2.5-1.5b-lora      Qwen2.5-1.5B with LoRA (r 8, alpha 32, dropout 0.1, q_proj/v_proj)
  reviews-lm             a small GPT-2 pretrained from scratch on the review texts of
                         ``data/reviews`` (the policy that the PPO demo starts from)

Pretrained variants need the HF checkpoint on disk (``--config.model.path=DIR``) and your data
(``--config.data.train=... --config.data.eval=...``: a JSON array or ``.jsonl`` of
``{"instruction", "input", "output"}`` or ``{"prompt", "answer"}`` records).

Run the demo:

  python main.py --config=configs/sft.py --workdir=workdirs/sft

It prints ``global step 20, epoch: 2, loss: 6.28..., speed: 0.96 step/s`` and, at each
evaluation, ``eval at step 104: loss=6.36..., perplexity=581..., tokens=440.0000`` (the 440
answer tokens of ``data/sft/eval.json``; the train loss ends near 5.0: a tiny model on 200
records mostly learns the answers' shape); greedy generations of the first eval prompts are
in ``workdirs/sft/eval/step_N.json``. 104 steps, about 2.5 minutes on 2 busy CPU cores.
"""

import ml_collections

from lib import config as config_lib

SCRATCH = ("demo", "reviews-lm")
PRETRAINED = {
    "qwen2.5-0.5b-masked": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-unmasked": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b-lora": "Qwen/Qwen2.5-1.5B",
}


def lm_config(task: str, variant: str) -> ml_collections.ConfigDict:
    """``lib.config.base`` with the fields of a causal-LM task (``tasks.sft`` and the tasks
    built on it): grouped-query heads, LoRA, example lengths and decoding."""
    c = config_lib.base(task, variant)
    # Scratch model: grouped-query attention, 2 key/value heads for 4 query heads.
    c.model.num_key_value_heads = 2

    # "masked": loss on the answer and EOS; "unmasked": on the whole sequence.
    c.data.loss_mode = "masked"
    # Tokens per example: prompt + answer + EOS (longer answers are cut, without EOS).
    c.data.max_length = 256
    # Longest prompt; longer ones lose their middle (training and inference alike).
    c.data.max_prompt_length = 192
    # Last prompt tokens always kept when a prompt is cut (the answer cue).
    c.data.prompt_tail = 8

    # Eval records decoded and written as samples.
    c.eval.num_samples = 4
    # Longest generated answer, in tokens.
    c.eval.max_new_tokens = 64
    # Sample (True) or decode greedily (False) where a task samples.
    c.eval.do_sample = False
    # Sampling temperature.
    c.eval.temperature = 0.9
    # Nucleus sampling mass.
    c.eval.top_p = 0.9
    # Top-k cut before top-p; 0: none.
    c.eval.top_k = 0
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant not in SCRATCH and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: {', '.join(SCRATCH + tuple(PRETRAINED))}")
    c = lm_config("sft", variant)
    c.model.hub_id = PRETRAINED.get(variant, "")
    # Scratch model: SwiGLU feed-forward width.
    c.model.intermediate_size = 384
    # Training records: JSON array or .jsonl of alpaca or {prompt, answer} records.
    c.data.train = "data/sft/train.json"
    # Held-out records: answer perplexity and sample generations (greedy).
    c.data.eval = "data/sft/eval.json"
    # Alpaca prompt template with {instruction} and {input}; empty: tasks.sft.ALPACA_TEMPLATE.
    c.data.template = ""
    c.train.epochs = 8
    c.train.lr = 3e-3
    c.train.warmup_ratio = 0.05
    c.checkpoint.every = 50
    c.eval.every = 50
    c.eval.batch_size = 8

    if variant == "reviews-lm":
        # A small GPT-2 pretrained on the review texts: the policy of the PPO demo.
        c.model.family = "gpt2"
        c.model.num_key_value_heads = 4
        c.model.intermediate_size = 512
        c.model.min_char_freq = 2
        c.data.train = "data/reviews/train.tsv"
        c.data.eval = "data/reviews/dev.tsv"
        c.data.loss_mode = "unmasked"
        c.data.max_length = 48
        c.data.max_prompt_length = 8
        c.train.epochs = 0
        c.train.steps = 500
        c.train.batch_size = 32
        c.checkpoint.every = c.eval.every = 250
        c.eval.batch_size = 64
        c.eval.max_new_tokens = 24
        c.log.every = 50
    if variant in PRETRAINED:
        # The recorded setup: bf16, AdamW lr 5e-5 with linear decay, batch 4, 3 epochs.
        c.model.dtype = "bfloat16"
        c.data.max_length = 512
        c.data.max_prompt_length = 384
        c.train.lr = 5e-5
        c.train.batch_size = 4
        c.train.epochs = 3
        c.train.warmup_ratio = 0.0
        c.train.weight_decay = 0.0
        c.eval.every = 500
        c.checkpoint.every = 500
        c.eval.max_new_tokens = 256
    if variant == "qwen2.5-0.5b-unmasked":
        c.data.loss_mode = "unmasked"
    if variant == "qwen2.5-1.5b-lora":
        # LoRA r 8, alpha 32, dropout 0.1 on q_proj/v_proj (the defaults); bs 3, 1 epoch.
        c.model.lora.rank = 8
        c.train.batch_size = 3
        c.train.epochs = 1
        c.train.lr = 1e-4
    return c
