r"""Supervised fine-tuning of a decoder LM on alpaca / prompt-answer records (SEEDS.md §4).

Variants (``--config=configs/sft.py:VARIANT``):
  demo                   a tiny Qwen2 trained from scratch with a character vocabulary on the
                         shipped alpaca demo set ``data/sft`` (the default)
  qwen2.5-0.5b-masked    Qwen2.5-0.5B, full fine-tune, loss on the output only
  qwen2.5-0.5b-unmasked  Qwen2.5-0.5B, full fine-tune, loss on the whole sequence
  qwen2.5-1.5b-lora      Qwen2.5-1.5B with LoRA (r 8, alpha 32, dropout 0.1, q_proj/v_proj)

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

PRETRAINED = {
    "qwen2.5-0.5b-masked": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-unmasked": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b-lora": "Qwen/Qwen2.5-1.5B",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant != "demo" and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: demo, {', '.join(PRETRAINED)}")
    c = ml_collections.ConfigDict()
    # Task module in tasks/.
    c.task = "sft"
    # Which named variant built this config.
    c.variant = variant
    # Filled in by main.py from --workdir (where the run keeps its vocabulary, checkpoints, logs).
    c.workdir = ""
    # Train params only from another run's workdir (its best, else latest checkpoint).
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    # HF checkpoint directory (Qwen2 or GLM/ChatGLM2); empty: a tiny Qwen2 from scratch (demo).
    c.model.path = ""
    # HF hub id this variant stands for (download it on a connected machine).
    c.model.hub_id = PRETRAINED.get(variant, "")
    # Compute dtype (params stay fp32): float32, or bfloat16 on accelerators.
    c.model.dtype = "float32"
    # Recompute each layer's activations in the backward pass to save memory.
    c.model.remat = False
    # Scratch model: hidden size.
    c.model.hidden_size = 128
    # Scratch model: decoder layers.
    c.model.num_layers = 2
    # Scratch model: attention heads.
    c.model.num_heads = 4
    # Scratch model: key/value heads (grouped-query attention).
    c.model.num_kv_heads = 2
    # Scratch model: SwiGLU feed-forward width.
    c.model.intermediate_size = 384
    # Scratch model: attention dropout.
    c.model.dropout = 0.0
    # Scratch model: characters seen fewer times than this map to [UNK].
    c.model.min_char_freq = 1
    c.model.lora = ml_collections.ConfigDict()
    # LoRA rank; 0 trains every parameter.
    c.model.lora.rank = 0
    # LoRA scale numerator: the update is (alpha / rank) * B A.
    c.model.lora.alpha = 32.0
    # Dropout on the LoRA input.
    c.model.lora.dropout = 0.1
    # Module names that get adapters.
    c.model.lora.targets = ("q_proj", "v_proj")
    # What --mode=export writes for a LoRA run: "adapter" (a PEFT adapter directory; for a
    # ChatGLM2/3 base in THUDM's module names) or "merged" (the base with the adapters folded in).
    c.model.lora.export = "adapter"

    c.data = ml_collections.ConfigDict()
    # Training records: JSON array or .jsonl of alpaca or {prompt, answer} records.
    c.data.train = "data/sft/train.json"
    # Held-out records: answer perplexity and sample generations.
    c.data.eval = "data/sft/eval.json"
    # Alpaca prompt template with {instruction} and {input}; empty: tasks.sft.ALPACA_TEMPLATE.
    c.data.template = ""
    # "masked": loss on the output and EOS; "unmasked": on the whole sequence.
    c.data.loss_mode = "masked"
    # Tokens per example: prompt + answer + EOS (longer answers are cut, without EOS).
    c.data.max_length = 256
    # Longest prompt; longer ones lose their middle (training and inference alike).
    c.data.max_prompt_length = 192
    # Last prompt tokens always kept when a prompt is cut (the "Output: " cue).
    c.data.prompt_tail = 8

    c.train = ml_collections.ConfigDict()
    # Optimizer steps (ignored when epochs > 0).
    c.train.steps = 1000
    # Whole passes over the training data; 0: use `steps`.
    c.train.epochs = 8
    # Examples per micro-batch (global, across devices).
    c.train.batch_size = 16
    # Micro-batches accumulated per optimizer step (token-weighted).
    c.train.grad_accum = 1
    # Peak learning rate.
    c.train.lr = 3e-3
    # Learning-rate schedule after warmup: linear, cosine or constant.
    c.train.schedule = "linear"
    # Warmup steps (warmup_ratio > 0 overrides it).
    c.train.warmup_steps = 0
    # Warmup as a fraction of all steps.
    c.train.warmup_ratio = 0.05
    # AdamW weight decay (never on biases and norm scales).
    c.train.weight_decay = 0.01
    # Clip gradients to this global norm; 0 disables.
    c.train.grad_clip = 1.0
    # Seed of initialization, data order and dropout.
    c.train.seed = 42

    c.mesh = ml_collections.ConfigDict()
    # Data-parallel axis size; -1 takes the devices left over.
    c.mesh.data = -1
    # Fully-sharded data-parallel axis size (shards params and batch).
    c.mesh.fsdp = 1
    # Tensor-parallel axis size (shards heads, MLP, vocab).
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    # Save every this many steps (evaluations also save).
    c.checkpoint.every = 50
    # Latest checkpoints kept (the best by eval.best_metric is kept as well).
    c.checkpoint.keep = 2

    c.eval = ml_collections.ConfigDict()
    # Evaluate every this many steps (and at the end).
    c.eval.every = 50
    # Metric that picks the best checkpoint.
    c.eval.best_metric = "loss"
    # Whether a larger (max) or smaller (min) best_metric is better.
    c.eval.best_mode = "min"
    # Eval batch size (perplexity and generation).
    c.eval.batch_size = 8
    # Eval records decoded (greedy) and written as samples.
    c.eval.num_samples = 4
    # Longest generated answer, in tokens.
    c.eval.max_new_tokens = 64
    # Sampling settings for generations that sample (eval samples and predict are greedy).
    c.eval.do_sample = False
    # Sampling temperature.
    c.eval.temperature = 0.9
    # Nucleus sampling mass.
    c.eval.top_p = 0.9
    # Top-k cut before top-p; 0: none.
    c.eval.top_k = 0

    c.log = ml_collections.ConfigDict()
    # Print and log training metrics every this many steps.
    c.log.every = 10

    c.predict = ml_collections.ConfigDict()
    # --mode=predict reads one instruction (or JSON record) per line ('-' = stdin).
    c.predict.input = "-"

    if variant != "demo":
        # SEEDS.md §4: bf16, AdamW lr 5e-5 with linear decay, batch 4, 3 epochs.
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
        c.log.every = 10
    if variant == "qwen2.5-0.5b-unmasked":
        c.data.loss_mode = "unmasked"
    if variant == "qwen2.5-1.5b-lora":
        # LoRA: bs 3, 1 epoch.
        c.model.lora.rank = 8
        c.model.lora.alpha = 32.0
        c.model.lora.dropout = 0.1
        c.model.lora.targets = ("q_proj", "v_proj")
        c.train.batch_size = 3
        c.train.epochs = 1
        c.train.lr = 1e-4
    return c
