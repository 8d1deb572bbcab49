r"""Summarization (article -> headline) with an encoder-decoder.

Variants (``--config=configs/summarization.py:VARIANT``):
  demo                   a small mT5-style model (gated GELU, separate head) trained from
                         scratch with a character vocabulary on ``data/summarization`` (default)
  t5-pegasus             ``imxly/t5-pegasus`` (mT5, 275M, jieba + BERT vocabulary)
  t5-pegasus-small       ``imxly/t5-pegasus-small`` (95M)
  randeng-pegasus-238m   ``IDEA-CCNL/Randeng-Pegasus-238M-Summary-Chinese``
  randeng-pegasus-523m   ``IDEA-CCNL/Randeng-Pegasus-523M-Summary-Chinese``

The pretrained variants keep the originals' settings: batch 1, Adam lr 2e-4 (constant), sources
of 256 tokens, 20 epochs, beam search with 3 beams at evaluation, spaces removed from the
output, best checkpoint by ROUGE-L. They need the checkpoint on disk
(``--config.model.path=DIR``; its ``vocab.txt`` gives the tokenizer). Reported by the
originals on their data: t5-pegasus ROUGE-1/2/L 37.07 / 20.19 / 31.37, Randeng-Pegasus
34.67 / 18.31 / 29.63.

Run the demo:

  python main.py --config=configs/summarization.py --workdir=workdirs/summarization

It prints how many texts were cut to 256 tokens, ``global step 100, epoch: 0.7, loss: ...``,
at each evaluation ``eval at step N: loss=..., rouge-1=..., rouge-2=..., rouge-l=...`` and
``best ROUGE-L performance updated: A --> B``; the best checkpoint is scored on
``data/summarization/test.jsonl`` at the end. Samples (text, reference, output) are in
``workdirs/summarization/eval/step_N.json``.

Measured (ROUGE-1/2/L F x100, ``lib.metrics.rouge_zh``; docs/tasks/summarization.md):

  model                              dev                    test
  lead-13 (first 13 characters)      10.89 / 4.08 / 10.62   10.55 / 3.74 / 10.23
  untrained demo model               0.00 / 0.00 / 0.00
  demo, 600 steps                    0.54 / 0.30 / 0.26     0.88 / 0.31 / 0.34

The scratch demo does not beat lead-13: it writes one generic headline for every article
(headlines are mostly not extractive; 2145 articles are too few to learn Chinese from
nothing). It takes 406 CPU seconds (38 minutes of wall time on 2 cores shared with other
trainings, load 10-18; 3.5-7 minutes on 2 idle cores).
"""

import ml_collections

from lib import config as config_lib

SCRATCH = ("demo",)
PRETRAINED = {
    "t5-pegasus": "imxly/t5-pegasus",
    "t5-pegasus-small": "imxly/t5-pegasus-small",
    "randeng-pegasus-238m": "IDEA-CCNL/Randeng-Pegasus-238M-Summary-Chinese",
    "randeng-pegasus-523m": "IDEA-CCNL/Randeng-Pegasus-523M-Summary-Chinese",
}


def seq2seq_config(task: str, variant: str) -> ml_collections.ConfigDict:
    """``lib.config.base`` with the fields of an encoder-decoder task (``tasks.seq2seq``):
    lengths, decoding and a small scratch mT5-style model."""
    c = config_lib.base(task, variant)
    # Scratch model: "t5" (v1.0: ReLU, tied head), "mt5" (gated GELU, separate head as
    # t5-pegasus) or "pegasus".
    c.model.family = "mt5"
    c.model.hidden_size = 128
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 4
    c.model.intermediate_size = 256
    # LoRA on the attention's query and value projections (HF T5's q / v, Pegasus's q_proj /
    # v_proj); exported as a PEFT SEQ_2_SEQ_LM adapter.
    c.model.lora.targets = ("q_proj", "v_proj")

    # Source tokens, the tokenizer's frame included (longer sources keep their head).
    c.data.max_source_length = 256
    # Target tokens, EOS included (longer targets keep their head and the EOS).
    c.data.max_target_length = 64
    # Test file scored on the best checkpoint after training; empty: none.
    c.data.test = ""

    # Eval records whose outputs are written as samples.
    c.eval.num_samples = 8
    # Longest decoded output, in tokens.
    c.eval.max_new_tokens = 64
    # Beams of the beam search at evaluation and prediction; 1: greedy.
    c.eval.num_beams = 1
    # Beam search: hypotheses scored sum(log p) / length ** length_penalty.
    c.eval.length_penalty = 1.0
    # > 0: no n-gram of this size repeats in an output (0: off, as the originals).
    c.eval.no_repeat_ngram_size = 0
    # Remove every space of a decoded output (the originals' .replace(" ", "")).
    c.eval.remove_spaces = True
    c.eval.batch_size = 32
    # Every metric of these tasks (ROUGE, BLEU, exact match) is better when larger.
    c.eval.best_mode = "max"
    c.eval.count = 3
    c.log.every = 50

    # The scratch demos: 600 steps of 16 records (pretrained variants override these).
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.lr = 2e-3
    c.train.warmup_ratio = 0.05
    c.model.min_char_freq = 2
    return c


def uer_t5_settings(c: ml_collections.ConfigDict) -> None:
    """Fine-tuning ``uer/t5-small-chinese-cluecorpussmall`` as the T5 QA original did: sources
    of 256 tokens, lr 5e-5, 20 epochs."""
    c.data.max_source_length = 256
    c.train.lr = 5e-5
    c.train.steps = 0
    c.train.epochs = 20
    c.train.warmup_ratio = 0.0
    c.eval.count = 20
    c.eval.batch_size = 16


def pretrained_settings(c: ml_collections.ConfigDict) -> None:
    """The originals' fine-tuning settings: batch 1, lr 2e-4, 20 epochs, beam 3."""
    c.train.batch_size = 1
    c.train.lr = 2e-4
    c.train.schedule = "constant"
    c.train.weight_decay = 0.0
    c.train.grad_clip = 0.0
    c.train.epochs = 20
    c.eval.count = 20
    c.eval.num_beams = 3
    c.eval.batch_size = 8


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant not in SCRATCH and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: {', '.join(SCRATCH + tuple(PRETRAINED))}")
    c = seq2seq_config("summarization", variant)
    c.model.hub_id = PRETRAINED.get(variant, "")
    # Training records: JSONL {"text", "summary"}.
    c.data.train = "data/summarization/train.jsonl"
    c.data.eval = "data/summarization/dev.jsonl"
    c.data.test = "data/summarization/test.jsonl"
    # Headlines are at most 30 characters.
    c.data.max_target_length = 40
    c.eval.max_new_tokens = 40
    c.eval.best_metric = "rouge-l"
    c.eval.num_beams = 3
    if variant in PRETRAINED:
        pretrained_settings(c)
    return c
