r"""Generative question answering (question + context -> answer) with an encoder-decoder.

Variants (``--config=configs/t5_qa.py:VARIANT``):
  demo             a small mT5-style model trained from scratch with a character vocabulary
                   on ``data/t5_qa`` (the default)
  uer-t5-small     ``uer/t5-small-chinese-cluecorpussmall`` (T5 v1.0, BERT vocabulary; eos
                   ``[SEP]``, decoder start ``[CLS]``), the original's model family; needs
                   ``--config.model.path=DIR``

Run the demo:

  python main.py --config=configs/t5_qa.py --workdir=workdirs/t5_qa

It prints the truncation counts, ``global step 100, ... loss: ...``, at each evaluation
``eval at step N: loss=..., bleu-1=..., bleu-2=..., bleu-3=..., bleu-4=..., exact_match=...``
(corpus BLEU on the answers' characters, x100) and the test scores of the best checkpoint.
Predict: ``printf '文中提到的人物是谁？\t记者采访了谢世杰。\n' | python main.py
--config=configs/t5_qa.py --workdir=workdirs/t5_qa --mode=predict`` prints
``{"Q": "文中提到的人物是谁？", "C": "记者采访了谢世杰。", "A": "..."}``.

Measured (dev BLEU-1/2/3/4, exact match, x100; docs/tasks/t5_qa.md):

  model                                          dev
  empty answer                                   0 / 0 / 0 / 0, 0
  the question's most frequent training answer   24.30 / 19.96 / 15.78 / 11.83, 9.50
  untrained demo model                           0 / 0 / 0 / 0, 0
  demo, 600 steps                                23.65 / 19.52 / 14.54 / 10.75, 8.00

The scratch demo answers from the question alone (``中国`` for places, ``1997年`` for times):
it has not learned to copy from the context in 600 steps. 250 CPU seconds (29 minutes of wall
time on 2 cores shared with other trainings, load 10-18; 2-4 minutes on 2 idle cores).
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
    c = seq2seq_config("t5_qa", variant)
    c.model.hub_id = PRETRAINED.get(variant, "")
    # Training records: JSONL {"context", "answer", "question", "id"}.
    c.data.train = "data/t5_qa/train.jsonl"
    c.data.eval = "data/t5_qa/dev.jsonl"
    c.data.test = "data/t5_qa/test.jsonl"
    c.data.max_source_length = 192
    c.data.max_target_length = 32
    c.eval.max_new_tokens = 32
    c.eval.best_metric = "bleu-4"
    if variant in PRETRAINED:
        uer_t5_settings(c)
    return c
