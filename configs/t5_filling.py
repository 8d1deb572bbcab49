r"""Mask filling (a sentence with one ``[MASK]`` span -> the removed text) with an
encoder-decoder.

Variants (``--config=configs/t5_filling.py:VARIANT``):
  demo             a small mT5-style model trained from scratch with a character vocabulary
                   on ``data/t5_filling`` (the default)
  uer-t5-small     ``uer/t5-small-chinese-cluecorpussmall`` (T5 v1.0, BERT vocabulary), the
                   original's model family; needs ``--config.model.path=DIR``

Run the demo:

  python main.py --config=configs/t5_filling.py --workdir=workdirs/t5_filling

It prints the truncation counts, ``global step 100, ... loss: ...``, at each evaluation
``eval at step N: loss=..., exact_match=..., rouge-1=..., rouge-2=..., rouge-l=...`` (of the
filled spans) and the test scores of the best checkpoint. Predict: ``echo '今天[MASK]很好。' |
python main.py --config=configs/t5_filling.py --workdir=workdirs/t5_filling --mode=predict``
prints ``{"masked": "今天[MASK]很好。", "filling": "...", "text": "今天...很好。"}``.

Measured (dev exact match, ROUGE-1/2/L, x100; docs/tasks/t5_filling.md):

  model                                         dev
  the most frequent training span (``着。``)      0.00, 1.93 / 0.00 / 1.91
  untrained demo model                          0.00, 0.00 / 0.00 / 0.00
  demo, 600 steps                               0.00, 10.60 / 0.00 / 10.21

The scratch demo writes ``，`` for every sentence (the most likely first token, then EOS):
filling needs a pretrained model. 263 CPU seconds (29 minutes of wall time on 2 cores shared
with other trainings, load 10-18; 2-4.5 minutes on 2 idle cores).
"""

import ml_collections

from configs.summarization import seq2seq_config, uer_t5_settings

SCRATCH = ("demo",)
PRETRAINED = {"uer-t5-small": "uer/t5-small-chinese-cluecorpussmall"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant not in SCRATCH and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: {', '.join(SCRATCH + tuple(PRETRAINED))}")
    c = seq2seq_config("t5_filling", variant)
    c.model.hub_id = PRETRAINED.get(variant, "")
    # Training records: JSONL {"id", "text", "masked", "target"}.
    c.data.train = "data/t5_filling/train.jsonl"
    c.data.eval = "data/t5_filling/dev.jsonl"
    c.data.test = "data/t5_filling/test.jsonl"
    c.data.max_source_length = 160
    c.data.max_target_length = 80
    c.eval.max_new_tokens = 80
    c.eval.best_metric = "rouge-l"
    if variant in PRETRAINED:
        uer_t5_settings(c)
    return c
