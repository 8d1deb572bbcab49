r"""UIE (universal information extraction): entities and relations from People's Daily sentences.

Variants (``--config=configs/uie.py:VARIANT``):
  demo          a small BERT with UIE pointer heads trained from scratch with a character
                vocabulary on the shipped data/uie records (the default)
  uie-base-zh   fine-tune ``Pky/uie-base-zh`` (PaddleNLP's uie-base converted to PyTorch: an
                ERNIE 3.0 ``encoder.*`` plus ``linear_start`` / ``linear_end``); needs
                ``--config.model.path=DIR``

Run the demo:

  python main.py --config=configs/uie.py --workdir=workdirs/uie

It prints ``global step 100, epoch: 1, loss: 0.05046, speed: 3.35 step/s``, at each evaluation
``eval at step 3000: precision=0.7578, recall=0.5005, f1=0.6029, f1/人物=0.5049, ...`` and
``best F1 performance updated: 0.5921 --> 0.6029``; after training the best checkpoint is
scored on ``data/uie/test.jsonl``. Predict (``--mode=predict``, one text per line) prints
the originals' ``[+] NER Results: {'人物': [...], ...}`` and ``[+] Information-Extraction
Results: {subject: {predicate: [...]}}`` on stderr and one JSON object per text on stdout.

Measured on a 2-core AMD EPYC machine, load about 2 (span exact-match micro F1 of the best
checkpoint by dev F1; all prompts, then entity prompts per type; wall time of the whole run,
with its user + system CPU seconds):

                   dev F1 (step)   test F1   test 人物/地点/机构/时间/relation   wall (CPU)
  demo, 3000 steps 0.603 (3000)    0.610     0.540/0.652/0.779/0.605/0.329       3m36s (373 s)
  1500 steps       0.467 (1200)    0.480     0.466/0.516/0.638/0.449/0.200       1m46s (180 s)
  gazetteer        0.758           0.734     0.422/0.873/0.952/0.816/0.667       2.6s

(``--config.train.steps=1500`` for the second row; the demo gave the same scores as a run
under load before; the baseline is ``benchmarks/baseline_uie.py``, the train split's answer strings
matched in the texts; see docs/tasks/uie.md.)
"""

import ml_collections

from lib import config as config_lib

PRETRAINED = {"uie-base-zh": "Pky/uie-base-zh"}
SCRATCH = ("demo",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant not in SCRATCH and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: {', '.join([*SCRATCH, *PRETRAINED])}")
    c = config_lib.base("uie", variant)
    c.model.hub_id = PRETRAINED.get(variant, "")
    c.model.family = "bert"
    # LoRA (--config.model.lora.rank > 0) adapts BERT's attention query/value layers.
    c.model.lora.targets = ("query", "value")
    c.model.dropout = 0.1
    c.model.min_char_freq = 2

    # Records {"content", "result_list": [{"text", "start", "end"}], "prompt"}, one per line.
    c.data.train = "data/uie/train.jsonl"
    c.data.eval = "data/uie/dev.jsonl"
    # Scored with the best checkpoint after training; empty: skip.
    c.data.test = "data/uie/test.jsonl"
    # Tokens per window, [CLS] prompt [SEP] content [SEP]; longer contents are cut in windows.
    c.data.max_length = 64
    # Tokens that consecutive windows of a long content share (a span this long that one
    # window cuts lies whole in the next).
    c.data.stride = 16

    c.schema = ml_collections.ConfigDict()
    # Entity types: the prompts --mode=predict asks of every text (and the per-type F1).
    c.schema.entities = ("人物", "地点", "机构", "时间")
    # Relations: subject type -> predicates; each subject found is asked "{subject}的{predicate}".
    c.schema.relations = {"地点": ("总统", "总理", "外长", "首相", "大使"),
                          "机构": ("记者", "部长", "总理", "发言人", "主席", "秘书长")}

    # The demo's scores still rise at the last step (dev F1 0.47 at 1200, 0.60 at 3000).
    c.train.steps = 3000
    c.train.batch_size = 32
    c.train.lr = 2e-3
    # The originals warmed up over 6% of the steps, then decayed linearly.
    c.train.warmup_ratio = 0.06
    c.checkpoint.every = 300
    c.eval.every = 300
    c.eval.best_metric = "f1"
    c.eval.best_mode = "max"
    c.eval.batch_size = 64
    # A position starts / ends a span when its probability exceeds this.
    c.eval.threshold = 0.5
    c.log.every = 50

    if variant in PRETRAINED:
        c.train.lr = 1e-5
        c.train.batch_size = 16
        c.train.epochs = 3
        c.log.every = 10
        c.eval.every = c.checkpoint.every = 200
    return c
