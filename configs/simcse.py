r"""Unsupervised SimCSE / ESimCSE sentence vectors with a BERT encoder.

Variants (``--config=configs/simcse.py:VARIANT``):
  demo                 SimCSE: a small BERT trained from scratch with a character vocabulary
                       on the People's Daily sentences of data/simcse/train.txt (the default)
  esimcse-demo         the demo with ESimCSE's word repetition (loss.word_repetition=0.32)
  bert-base-chinese    SimCSE from ``bert-base-chinese``
  roberta-wwm-ext      SimCSE from ``hfl/chinese-roberta-wwm-ext``
  ernie-3.0-base       SimCSE from ``nghuyong/ernie-3.0-base-zh``

Pretrained variants need the HF checkpoint on disk: ``--config.model.path=DIR``; any variant
takes ``--config.loss.word_repetition=0.32`` for ESimCSE.

Run the demo:

  python main.py --config=configs/simcse.py --workdir=workdirs/simcse

It prints ``global step 100, epoch: 1, loss: 1.23, speed: 3.1 step/s``, at each evaluation
``eval at step 300: accuracy=..., precision=..., recall=..., f1=..., spearman=...`` and
``best F1 performance updated: A --> B``; after training the best checkpoint is scored
on ``data/matching/test.tsv``. Predict (``--mode=predict``) reads ``text1<TAB>text2`` lines
(their cosine) or single texts (``predict.candidates`` ranked by cosine, ``Used Xs.`` on
stderr).

Measured on the matching demo's pairs (macro F1 at cosine > 0.5 of the best checkpoint by dev
F1, and the Spearman correlation of cosine and label; 600 steps of 64 sentences):

  model                          dev F1 (step)   dev rho   test F1   test rho
  demo (SimCSE)                  0.481 (450)     0.595     0.481     0.636
  esimcse-demo                   0.490 (300)     0.636     0.487     0.655
  untrained demo model           0.333           0.221     0.333     0.228
  TF-IDF cosine (dev-tuned thr.) 0.873           0.691     0.888     0.728

On a 2-core AMD EPYC machine (load about 2) the demo took 2m30s of wall time (269 s of CPU),
ESimCSE 2m25s (261 s); run under load 4-7 before, both gave the same numbers. Training nearly
triples the Spearman of the untrained model and moves F1 off "everything matches"; the fixed
0.5 threshold still calls most random pairs a match (every matching pair and all but 45 of
the 300 random ones at the best checkpoint), and the TF-IDF baseline, which reads shared
characters with a tuned threshold, stays ahead. The baseline is ``benchmarks/baseline_matching.py``.
"""

import ml_collections

from lib import config as config_lib

PRETRAINED = {
    "bert-base-chinese": "bert-base-chinese",
    "roberta-wwm-ext": "hfl/chinese-roberta-wwm-ext",
    "ernie-3.0-base": "nghuyong/ernie-3.0-base-zh",
}
SCRATCH = ("demo", "esimcse-demo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant not in SCRATCH and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: {', '.join([*SCRATCH, *PRETRAINED])}")
    c = config_lib.base("simcse", variant)
    c.model.hub_id = PRETRAINED.get(variant, "")
    c.model.family = "bert"
    # LoRA (--config.model.lora.rank > 0) adapts BERT's attention query/value layers.
    c.model.lora.targets = ("query", "value")
    # The sentence vector before the projection: "pooler" (tanh(dense([CLS])), the
    # original's), "cls" (the [CLS] state), "mean" (masked mean of the last layer) or ""
    # (the original's). The scratch demos take "mean": averaged fresh character vectors
    # already tell overlapping texts apart, where the pooler starts from nothing.
    c.model.sentence_pooling = "" if variant in PRETRAINED else "mean"
    # Width of the Linear after the pooler (the original's 256); 0: no projection head.
    c.model.projection = 256
    # Dropout on the projection's output, before the L2 normalisation.
    c.model.projection_dropout = 0.1
    c.model.dropout = 0.1
    c.model.min_char_freq = 2

    # Training sentences, one per line (no labels).
    c.data.train = "data/simcse/train.txt"
    # Pairs s1<TAB>s2<TAB>label (1 = they match): the matching demo's dev and test pairs.
    c.data.eval = "data/matching/dev.tsv"
    # Scored with the best checkpoint after training; empty: skip.
    c.data.test = "data/matching/test.tsv"
    # Tokens per sentence, [CLS]/[SEP] included (a view lengthened by word repetition is cut
    # to this too).
    c.data.max_length = 64

    c.loss = ml_collections.ConfigDict()
    # The contrastive logits are this times the cosine (the original's 20).
    c.loss.scale = 20.0
    # ESimCSE: each view duplicates k random inner tokens, k uniform in 0..floor(rate x
    # length); 0: plain SimCSE (the views differ by dropout only).
    c.loss.word_repetition = 0.32 if variant == "esimcse-demo" else 0.0

    # From scratch the contrastive loss is near 0 after ~100 steps (a bag of fresh character
    # vectors tells 64 sentences apart); dev F1 peaked at step 300 in the demos.
    c.train.steps = 600
    c.train.batch_size = 64
    c.train.lr = 1e-3
    # The originals warmed up over 6% of the steps, then decayed linearly.
    c.train.warmup_ratio = 0.06
    c.checkpoint.every = 150
    c.eval.every = 150
    c.eval.best_metric = "f1"
    c.eval.best_mode = "max"
    c.eval.batch_size = 64
    # A pair is a match when the cosine of its sentence vectors exceeds this.
    c.eval.threshold = 0.5
    c.log.every = 50
    # The texts a single-text --mode=predict input is ranked against.
    c.predict.candidates = ("江泽民会见美国客人", "北京举行新年音乐会", "明天气象预报",
                            "乒乓球擂台赛孔令辉获胜", "西藏雪灾救灾工作")

    if variant in PRETRAINED:
        c.train.lr = 5e-5
        c.train.epochs = 1
        c.log.every = 10
        c.eval.every = c.checkpoint.every = 100
    return c
