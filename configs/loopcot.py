r"""LoopCoT: poem generation and its inverse, appreciation, in one model.

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

It is a sweep (``lib.sweep``) over the training data mixes of ``config.sweep.runs``, each
trained in ``<workdir>/<run>/`` (in name order). It prints the untrained model's evaluations,
then per run ``== run 1/3: mix``, the trainer's lines (``training: 237 steps (79 per epoch) of
16 examples, evaluation every 60``, ``global step 60, epoch: 1, loss: 6.2..., speed: ...
step/s``, ``eval at step 60: appreciation/rouge-1=...``), the repeats of each part's best
checkpoint (``mix generation: checkpoint 180 (best generation/rouge-1 of 4 kept
checkpoints)``, ``    generation: 20 answers to each of 20 prompts (3s)``: each prompt is
prefilled once and sampled 20 times, ``mix: repeat 3/20, generation/rouge-1 16.1, ...``), then
the table of mean ± std over 20 sampled decodings (``untrained`` = the model before training,
5 decodings):

  run                     part           ROUGE-1       ROUGE-2       ROUGE-L        BLEU-4
  untrained               generation     0.20 ± 0.05   0.00 ± 0.00   0.17 ± 0.04   0.20 ± 0.05
  untrained               appreciation   0.11 ± 0.06   0.00 ± 0.00   0.09 ± 0.05   0.22 ± 0.03
  mix                     generation    16.96 ± 1.00   0.09 ± 0.16  22.40 ± 0.90   0.99 ± 0.20
  mix                     appreciation  14.22 ± 1.00   0.19 ± 0.15  16.43 ± 1.00   0.58 ± 0.11
  single_appreciation     appreciation  18.36 ± 0.51   0.74 ± 0.20  20.84 ± 0.30   1.11 ± 0.08
  single_generation       generation    16.24 ± 0.46   0.14 ± 0.16  21.93 ± 0.50   1.22 ± 0.14

and where the plots (``plots/generation_result.png``, ``plots/appreciation_result.png``) and
``summary.json`` are. 3m05s of wall time on 2 AMD EPYC cores (load about 2), compilation
included; more on a busy machine. Floating-point differences between CPUs (Intel and AMD)
change the sampled decodings, more so the longer a run trains: expect the trained rows to
differ by about their std on another machine. A scratch character model learns the verse
shape (5/7-character lines and their punctuation) and common characters, which is what these
ROUGE-1 scores reward; it does not learn to write or appreciate poems.
"""

import ml_collections

from configs import sft as sft_config
from lib import config as config_lib

PRETRAINED = {
    "chatglm2-6b-lora": "THUDM/chatglm2-6b",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b-lora": "Qwen/Qwen2.5-1.5B",
}
# The scores of a test part (tasks.loopcot names them "<part>/<metric>").
METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def mixes(*names: str) -> dict:
    """Sweep runs, one per training data mix (``data.mix``), named after it."""
    return {name: config_lib.nest({"data.mix": name}) for name in names}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant != "demo" and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: demo, {', '.join(PRETRAINED)}")
    c = sft_config.lm_config("loopcot", variant)
    c.model.hub_id = PRETRAINED.get(variant, "")
    c.model.hidden_size = 192
    c.model.num_hidden_layers = 3
    # Scratch model: SwiGLU feed-forward width.
    c.model.intermediate_size = 512
    # ChatGLM2's fused query_key_value is q/k/v_proj here.
    c.model.lora.targets = ("q_proj", "k_proj", "v_proj")
    c.model.lora.alpha = 16.0
    c.model.lora.dropout = 0.05

    # Poem/appreciation pairs {title, author, poem, appreciation, form, keywords} to train on.
    c.data.train = "data/poetry/pairs_train.json"
    # Test pairs: every test part is built from them; evaluated at every checkpoint.
    c.data.eval = "data/poetry/pairs_test.json"
    # Training data mix: single_generation, single_appreciation, mix (both directions) or
    # mix_summarize_keywords (also generation from summary themes); it sets the test parts.
    c.data.mix = "mix"
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
    c.data.max_length = 128
    c.data.max_prompt_length = 64
    # The original's bug: wrap inference prompts in ChatGLM's "[Round 1]\n\n问：…\n\n答："
    # template although training used bare prompts. False: the same prompts in both.
    c.data.chat_template_at_inference = False

    # Whole passes over a run's training data (the same for every run, as the original).
    c.train.epochs = 3
    c.train.lr = 3e-3
    c.train.warmup_ratio = 0.05
    # Keep every checkpoint, so that each test part's best survives.
    c.checkpoint.keep = 10
    c.eval.count = 4
    # The trainer's best checkpoint: mean ROUGE-1 over the run's test parts (the sweep picks
    # each part's checkpoint by that part's ROUGE-1).
    c.eval.best_metric = "rouge-1"
    c.eval.best_mode = "max"
    # Prompts decoded per batch (a fixed shape: one compilation).
    c.eval.batch_size = 20
    c.eval.do_sample = True
    c.eval.temperature = 0.8
    c.eval.top_p = 0.8
    # 50 is HF generate's default, which the original's sampling (ChatGLM2 chat with
    # top_p/temperature only) inherited; it also spares a full vocabulary sort per token.
    c.eval.top_k = 50
    # Seed of the sampling keys: an evaluation during training samples part p with
    # fold_in(fold_in(key(seed), 0), p); the sweep's N evaluations of a checkpoint sample N
    # answers per prompt from one prefill with fold_in(fold_in(key(seed), N), p).
    c.eval.seed = 0
    # Decoded outputs per part written with each evaluation.
    c.eval.num_samples = 3
    del c.eval["max_new_tokens"]
    c.eval.max_new_tokens = ml_collections.ConfigDict()
    # Longest generated poem, in tokens.
    c.eval.max_new_tokens.generation = 72
    # Longest generated appreciation, in tokens.
    c.eval.max_new_tokens.appreciation = 64
    c.log.every = 20

    c.sweep.runs = mixes("single_generation", "single_appreciation", "mix")
    # Sampled evaluations of each part's best checkpoint (as the original).
    c.sweep.repeats = 20
    c.sweep.metrics = METRICS
    c.sweep.untrained_repeats = 5
    # The untrained model is scored on the parts of the "mix" runs: generation, appreciation.
    c.sweep.untrained = config_lib.nest({"data.mix": "mix"})

    if variant != "demo":
        c.eval.count = 0
        c.eval.every = 100
        c.checkpoint.every = 100
        c.sweep.untrained_repeats = 1
        c.eval.batch_size = 32
        c.eval.max_new_tokens.generation = 128
        c.eval.max_new_tokens.appreciation = 256
        c.data.max_length = 256
        c.data.max_prompt_length = 128
        c.model.dtype = "bfloat16"
        c.log.every = 10
    if variant == "chatglm2-6b-lora":
        # LoRA r 16, alpha 16, dropout 0.05 on q/k/v (the defaults above).
        c.model.lora.rank = 16
        c.train.batch_size = 6
        c.train.grad_accum = 6
        c.train.lr = 2e-5
        c.train.warmup_ratio = 0.0
        c.train.warmup_steps = 50
        c.train.epochs = 30
        c.train.weight_decay = 0.0
        c.checkpoint.keep = 100
        c.sweep.runs = mixes("single_generation", "single_appreciation", "mix",
                             "mix_summarize_keywords")
        c.sweep.untrained = config_lib.nest({"data.mix": "mix_summarize_keywords"})
    elif variant == "qwen2.5-0.5b":
        c.train.batch_size = 8
        c.train.grad_accum = 4
        c.train.lr = 2e-5
        c.train.warmup_ratio = 0.0
        c.train.warmup_steps = 50
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
        c.checkpoint.keep = 100
    return c
