r"""LoopCoT: poem generation and its inverse, appreciation, in one model (SEEDS.md §1).

Variants (``--config=configs/loopcot.py:VARIANT``):
  demo               a small Qwen2 trained from scratch with a character vocabulary on the
                     shipped poems (the default); the whole experiment runs on 2 CPU cores
  chatglm2-6b-lora   the original setup: ChatGLM2-6B, LoRA r 16 / alpha 16 / dropout 0.05 on
                     the attention q/k/v (the fused query_key_value of ChatGLM2), micro-batch 6
                     x 6 accumulation, lr 2e-5, 50 warmup steps, 30 epochs, length 256
  qwen2.5-0.5b       full fine-tune of Qwen2.5-0.5B
  qwen2.5-1.5b-lora  Qwen2.5-1.5B with LoRA (r 8, alpha 32, dropout 0.1, q_proj/v_proj)

Pretrained variants need the HF checkpoint on disk: ``--config.model.path=DIR``.

Run the demo:

  python main.py --config=configs/loopcot.py --workdir=workdirs/loopcot

It prints ``== run 1/3: single_generation: 1132 examples, 213 steps, ...``, the trainer's lines
(``global step 60, epoch: 1, loss: 6.2..., speed: ... step/s``), an evaluation of every
checkpoint (``eval generation: 20 prompts in 0.8s, rouge-1 ...``), the repeats of each best
checkpoint (``mix appreciation: repeat 3/20, ...``), then the table of mean ± std over 20
sampled decodings (``untrained`` = the model before training, 5 decodings):

  run                     part           ROUGE-1       ROUGE-2       ROUGE-L        BLEU-4
  untrained               generation     0.13 ± 0.06   0.00 ± 0.00   0.11 ± 0.06   0.17 ± 0.04
  untrained               appreciation   0.25 ± 0.21   0.00 ± 0.00   0.20 ± 0.17   0.26 ± 0.04
  single_generation       generation    16.42 ± 0.74   0.10 ± 0.15  22.21 ± 0.68   1.13 ± 0.11
  single_appreciation     appreciation  18.60 ± 0.63   0.69 ± 0.27  20.94 ± 0.31   1.10 ± 0.08
  mix                     generation    16.57 ± 0.74   0.05 ± 0.11  22.08 ± 1.31   0.91 ± 0.15
  mix                     appreciation  15.30 ± 0.49   0.33 ± 0.18  18.97 ± 0.86   0.93 ± 0.08

and where the plots (``plots/generation_result.png``, ``plots/appreciation_result.png``) and
``summary.json`` are. About 5-5.5 minutes on 2 idle CPU cores, compilation included; more on a
busy machine. A scratch character model learns the verse shape (5/7-character lines and
their punctuation) and common characters, which is what these ROUGE-1 scores reward; it
does not learn to write or appreciate poems.
"""

import ml_collections

PRETRAINED = {
    "chatglm2-6b-lora": "THUDM/chatglm2-6b",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b-lora": "Qwen/Qwen2.5-1.5B",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant != "demo" and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: demo, {', '.join(PRETRAINED)}")
    c = ml_collections.ConfigDict()
    # Task module in tasks/.
    c.task = "loopcot"
    # Which named variant built this config.
    c.variant = variant
    # Filled in by main.py from --workdir; each run trains in <workdir>/<run>/.
    c.workdir = ""
    # Train params only from another run's workdir (its best, else latest checkpoint).
    c.init_from = ""

    c.experiment = ml_collections.ConfigDict()
    # Runs to train and compare: single_generation, single_appreciation, mix,
    # mix_summarize_keywords.
    c.experiment.runs = ("single_generation", "single_appreciation", "mix")
    # The run whose data --mode=eval/predict use (with --workdir=<workdir>/<run>); empty: first.
    c.experiment.run = ""
    # Evaluations (= checkpoints) per run, spread evenly; 0: use eval.every / checkpoint.every.
    c.experiment.evals_per_run = 4

    c.model = ml_collections.ConfigDict()
    # HF checkpoint directory (Qwen2 or GLM/ChatGLM2); empty: a small Qwen2 from scratch.
    c.model.path = ""
    # HF hub id this variant stands for (download it on a connected machine).
    c.model.hub_id = PRETRAINED.get(variant, "")
    # Compute dtype (params stay fp32): float32, or bfloat16 on accelerators.
    c.model.dtype = "float32"
    # Recompute each layer's activations in the backward pass to save memory.
    c.model.remat = False
    # Scratch model: hidden size.
    c.model.hidden_size = 192
    # Scratch model: decoder layers.
    c.model.num_layers = 3
    # Scratch model: attention heads.
    c.model.num_heads = 4
    # Scratch model: key/value heads (grouped-query attention).
    c.model.num_kv_heads = 2
    # Scratch model: SwiGLU feed-forward width.
    c.model.intermediate_size = 512
    # Scratch model: attention dropout.
    c.model.dropout = 0.0
    # Scratch model: characters seen fewer times than this map to [UNK].
    c.model.min_char_freq = 1
    c.model.lora = ml_collections.ConfigDict()
    # LoRA rank; 0 trains every parameter.
    c.model.lora.rank = 0
    # LoRA scale numerator: the update is (alpha / rank) * B A.
    c.model.lora.alpha = 16.0
    # Dropout on the LoRA input.
    c.model.lora.dropout = 0.05
    # Module names that get adapters (ChatGLM2's fused query_key_value is q/k/v_proj here).
    c.model.lora.targets = ("q_proj", "k_proj", "v_proj")
    # What --mode=export writes for a LoRA run: "adapter" (a PEFT adapter directory; for a
    # ChatGLM2/3 base in THUDM's module names) or "merged" (the base with the adapters folded in).
    c.model.lora.export = "adapter"

    c.data = ml_collections.ConfigDict()
    # Poem/appreciation pairs {title, author, poem, appreciation, form, keywords} to train on.
    c.data.train = "data/poetry/pairs_train.json"
    # Test pairs: every test part is built from them.
    c.data.test = "data/poetry/pairs_test.json"
    # Extra keyword-themed generation examples {title, poem, form, keywords}; empty: none.
    c.data.extra_generation = "data/poetry/keyword_poems.json"
    # JSON object title -> theme replacing the extractive summary theme; empty: summarize.
    c.data.theme_file = ""
    # Separator joining the keywords into a generation theme.
    c.data.keyword_sep = "，"
    # Longest summary theme, in characters.
    c.data.summary_chars = 13
    # Test records used (the first n); 0: all.
    c.data.test_size = 0
    # Tokens per training example: prompt + answer + EOS (longer answers are cut, no EOS).
    c.data.max_length = 128
    # Longest prompt; longer ones lose their middle (training and inference alike).
    c.data.max_prompt_length = 64
    # Last prompt tokens always kept when a prompt is cut (the "请鉴赏诗歌：\n" cue).
    c.data.prompt_tail = 8
    # Loss on the answer and EOS only ("masked", as the original) or everywhere ("unmasked").
    c.data.loss_mode = "masked"
    # The original's bug: wrap inference prompts in ChatGLM's "[Round 1]\n\n问：…\n\n答："
    # template although training used bare prompts. False: the same prompts in both.
    c.data.chat_template_at_inference = False

    c.train = ml_collections.ConfigDict()
    # Optimizer steps (ignored when epochs > 0).
    c.train.steps = 1000
    # Whole passes over a run's training data (the same for every run, as the original).
    c.train.epochs = 3
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
    # Seed of initialization, data order (and the mixtures' shuffle) and dropout.
    c.train.seed = 42

    c.mesh = ml_collections.ConfigDict()
    # Data-parallel axis size; -1 takes the devices left over.
    c.mesh.data = -1
    # Fully-sharded data-parallel axis size (shards params and batch).
    c.mesh.fsdp = 1
    # Tensor-parallel axis size (shards heads, MLP, vocab).
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    # Save every this many steps (overridden by experiment.evals_per_run > 0).
    c.checkpoint.every = 100
    # Latest checkpoints kept, besides the best; keep them all so each part's best survives.
    c.checkpoint.keep = 10

    c.eval = ml_collections.ConfigDict()
    # Evaluate every this many steps (overridden by experiment.evals_per_run > 0).
    c.eval.every = 100
    # The trainer's best checkpoint: mean ROUGE-1 over the run's test parts.
    c.eval.best_metric = "rouge-1"
    # Whether a larger (max) or smaller (min) best_metric is better.
    c.eval.best_mode = "max"
    # Metric picking each test part's best checkpoint for the repeated evaluation.
    c.eval.select_metric = "rouge-1"
    # Evaluations of each best checkpoint, with different sampling keys (as the original).
    c.eval.repeats = 20
    # Evaluations of the untrained model; 0 skips it.
    c.eval.untrained_repeats = 5
    # Prompts decoded per batch (a fixed shape: one compilation).
    c.eval.batch_size = 20
    # Sample (True) or decode greedily (False).
    c.eval.do_sample = True
    # Sampling temperature.
    c.eval.temperature = 0.8
    # Nucleus sampling mass.
    c.eval.top_p = 0.8
    # Top-k cut before top-p; 0: none. 50 is HF generate's default, which the original's
    # sampling (ChatGLM2 chat with top_p/temperature only) inherited; it also spares a full
    # vocabulary sort per token.
    c.eval.top_k = 50
    # Seed of the sampling keys (repeat r, part p use fold_in(fold_in(key(seed), r), p)).
    c.eval.seed = 0
    # Decoded outputs per part written with each evaluation.
    c.eval.num_samples = 3
    c.eval.max_new_tokens = ml_collections.ConfigDict()
    # Longest generated poem, in tokens.
    c.eval.max_new_tokens.generation = 72
    # Longest generated appreciation, in tokens.
    c.eval.max_new_tokens.appreciation = 64

    c.log = ml_collections.ConfigDict()
    # Print and log training metrics every this many steps.
    c.log.every = 20

    c.predict = ml_collections.ConfigDict()
    # --mode=predict reads lines ({"theme","form"} / {"poem"} JSON, or prompts) ('-' = stdin).
    c.predict.input = "-"

    if variant != "demo":
        c.experiment.evals_per_run = 0
        c.eval.every = 100
        c.checkpoint.every = 100
        c.eval.repeats = 20
        c.eval.untrained_repeats = 1
        c.eval.batch_size = 32
        c.eval.max_new_tokens.generation = 128
        c.eval.max_new_tokens.appreciation = 256
        c.data.max_length = 256
        c.data.max_prompt_length = 128
        c.data.prompt_tail = 8
        c.model.dtype = "bfloat16"
        c.log.every = 10
    if variant == "chatglm2-6b-lora":
        c.model.lora.rank = 16
        c.model.lora.alpha = 16.0
        c.model.lora.dropout = 0.05
        c.model.lora.targets = ("q_proj", "k_proj", "v_proj")
        c.train.batch_size = 6
        c.train.grad_accum = 6
        c.train.lr = 2e-5
        c.train.warmup_ratio = 0.0
        c.train.warmup_steps = 50
        c.train.epochs = 30
        c.train.weight_decay = 0.0
        c.checkpoint.keep = 100
        c.experiment.runs = ("single_generation", "single_appreciation", "mix",
                             "mix_summarize_keywords")
    elif variant == "qwen2.5-0.5b":
        c.train.batch_size = 8
        c.train.grad_accum = 4
        c.train.lr = 2e-5
        c.train.warmup_ratio = 0.0
        c.train.warmup_steps = 50
        c.train.epochs = 3
        # A full checkpoint with AdamW moments is ~6 GB: keep few.
        c.checkpoint.keep = 3
    elif variant == "qwen2.5-1.5b-lora":
        c.model.lora.rank = 8
        c.model.lora.alpha = 32.0
        c.model.lora.dropout = 0.1
        c.model.lora.targets = ("q_proj", "v_proj")
        c.train.batch_size = 6
        c.train.grad_accum = 6
        c.train.lr = 2e-4
        c.train.warmup_ratio = 0.0
        c.train.warmup_steps = 50
        c.train.epochs = 3
        c.checkpoint.keep = 100
    return c
