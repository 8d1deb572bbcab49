r"""Text classification with a BERT-family encoder.

Variants (``--config=configs/classification.py:VARIANT``):
  demo                 a small BERT trained from scratch with a character vocabulary on the
                       shipped review-sentiment data (the default)
  bert-base-chinese    fine-tune ``bert-base-chinese``
  roberta-wwm-ext      fine-tune ``hfl/chinese-roberta-wwm-ext``
  macbert-base         fine-tune ``hfl/chinese-macbert-base``
  ernie-3.0-base       fine-tune ``nghuyong/ernie-3.0-base-zh``
  ppo-reward           the demo model, trained briefly on texts of at most 64 tokens: the
                       sentiment reward of the PPO demo (configs/ppo.py)
  loss-sweep           the demo model trained twice, with cross-entropy and with focal loss
                       (gamma 2), each best checkpoint evaluated and the two compared

Pretrained variants need the HF checkpoint on disk: ``--config.model.path=DIR``.

Run the demo:

  python main.py --config=configs/classification.py --workdir=workdirs/cls

It prints lines like ``global step 100, epoch: 1, loss: 0.52, speed: 2.5 step/s`` and, at each
evaluation, ``eval at step 900: accuracy=0.8210, weighted_f1=0.8207, ...``; the metrics land in
``workdirs/cls/eval/step_N.json``. After training the best checkpoint (by dev weighted F1) is
evaluated on ``data.test``: ``test on data/reviews/test.tsv (step 900): accuracy=0.8380, ...``
(``eval/test_step_900.json``). About 8.5 minutes on 2 CPU cores. For comparison, a character
1-3-gram TF-IDF + logistic regression (``benchmarks/baseline_tfidf.py``) scores 0.841 / 0.865.

The loss sweep (``--config=configs/classification.py:loss-sweep --workdir=workdirs/cls-loss``)
trains ``ce/`` and ``focal/`` under the workdir (600 steps each), then prints a table of
accuracy and weighted / macro F1 (mean ± std over the repeats; classification is
deterministic, so std 0) with the untrained model as a first row, and writes
``summary.json`` and ``plots/all_result.png``.
"""

import ml_collections

from lib import config as config_lib

PRETRAINED = {
    "bert-base-chinese": "bert-base-chinese",
    "roberta-wwm-ext": "hfl/chinese-roberta-wwm-ext",
    "macbert-base": "hfl/chinese-macbert-base",
    "ernie-3.0-base": "nghuyong/ernie-3.0-base-zh",
}
SCRATCH = ("demo", "loss-sweep", "ppo-reward")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant not in SCRATCH and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: {', '.join(SCRATCH + tuple(PRETRAINED))}")
    c = config_lib.base("classification", variant)
    c.model.hub_id = PRETRAINED.get(variant, "")
    c.model.family = "bert"
    # LoRA (--config.model.lora.rank > 0) adapts BERT's attention query/value layers.
    c.model.lora.targets = ("query", "value")
    # Classifier input: "cls" (the [CLS] state, as HF; needed for --mode=export) or "mean"
    # (mean of the last layer over real tokens).
    c.model.pooling = "cls" if variant in PRETRAINED else "mean"
    c.model.dropout = 0.1
    c.model.min_char_freq = 2

    # Training file: label_id<TAB>text per line.
    c.data.train = "data/reviews/train.tsv"
    c.data.eval = "data/reviews/dev.tsv"
    # Test file: after training the best checkpoint is evaluated on it (eval/test_step_N.json);
    # empty: skip.
    c.data.test = "data/reviews/test.tsv"
    # Label names, one per line, line i = label id i.
    c.data.labels = "data/reviews/labels.txt"
    # Tokens per example, [CLS] and [SEP] included (longer texts are truncated).
    c.data.max_length = 192
    # Which part of a longer text is kept: "head" (the beginning) or "head_tail" (the first
    # quarter and the last three quarters of the budget).
    c.data.truncation = "head_tail"

    c.loss = ml_collections.ConfigDict()
    # Focal loss exponent; 0 is plain cross-entropy.
    c.loss.focal_gamma = 0.0
    # Per-class loss weights in label-id order; empty: all 1.
    c.loss.class_weights = ()

    c.train.steps = 1200
    c.train.batch_size = 32
    # The originals warmed up over 6% of the steps.
    c.train.warmup_ratio = 0.06
    c.checkpoint.every = 300
    c.eval.every = 300
    c.eval.best_metric = "weighted_f1"
    c.eval.best_mode = "max"
    c.eval.batch_size = 64
    c.log.every = 50

    if variant in PRETRAINED:
        c.train.lr = 3e-5
        c.train.batch_size = 16
        c.train.epochs = 3
        c.data.max_length = 256
        c.log.every = 10
        c.eval.every = 200
        c.checkpoint.every = 200
    if variant == "ppo-reward":
        # The sentiment reward of the PPO demo: short texts (a prompt and 16 tokens).
        c.data.max_length = 64
        # HF's BertForSequenceClassification pools [CLS]: the reward is loaded from the export.
        c.model.pooling = "cls"
        c.data.test = ""
        c.train.steps = 300
        c.eval.every = c.checkpoint.every = 150
    if variant == "loss-sweep":
        c.train.steps = 600
        c.eval.every = c.checkpoint.every = 200
        c.sweep.runs = {
            "ce": config_lib.nest({"loss.focal_gamma": 0.0}),
            "focal": config_lib.nest({"loss.focal_gamma": 2.0}),
        }
        c.sweep.repeats = 2
        c.sweep.metrics = ("accuracy", "weighted_f1", "macro_f1")
        c.sweep.untrained_repeats = 1
    return c
