r"""Text classification with a BERT-family encoder (SEEDS.md §3.8).

Variants (``--config=configs/classification.py:VARIANT``):
  demo                 a small BERT trained from scratch with a character vocabulary on the
                       shipped review-sentiment data (the default)
  bert-base-chinese    fine-tune ``bert-base-chinese``
  roberta-wwm-ext      fine-tune ``hfl/chinese-roberta-wwm-ext``
  macbert-base         fine-tune ``hfl/chinese-macbert-base``
  ernie-3.0-base       fine-tune ``nghuyong/ernie-3.0-base-zh``

Pretrained variants need the HF checkpoint on disk: ``--config.model.path=DIR``.

Run the demo:

  python main.py --config=configs/classification.py --workdir=workdirs/cls

It prints lines like ``global step 100, epoch: 1, loss: 0.52, speed: 2.5 step/s`` and, at each
evaluation, ``eval at step 900: accuracy=0.8210, weighted_f1=0.8207, ...``; the metrics land in
``workdirs/cls/eval/step_N.json``. After training the best checkpoint (by dev weighted F1) is
evaluated on ``data.test``: ``test on data/reviews/test.tsv (step 900): accuracy=0.8380, ...``
(``eval/test_step_900.json``). About 8.5 minutes on 2 CPU cores. For comparison, a character
1-3-gram TF-IDF + logistic regression (``benchmarks/baseline_tfidf.py``) scores 0.841 / 0.865.
"""

import ml_collections

PRETRAINED = {
    "bert-base-chinese": "bert-base-chinese",
    "roberta-wwm-ext": "hfl/chinese-roberta-wwm-ext",
    "macbert-base": "hfl/chinese-macbert-base",
    "ernie-3.0-base": "nghuyong/ernie-3.0-base-zh",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant != "demo" and variant not in PRETRAINED:
        raise ValueError(f"unknown variant {variant!r}: demo, {', '.join(PRETRAINED)}")
    c = ml_collections.ConfigDict()
    # Task module in tasks/.
    c.task = "classification"
    # Which named variant built this config.
    c.variant = variant
    # Filled in by main.py from --workdir (where the run keeps its tokenizer, checkpoints, logs).
    c.workdir = ""
    # Train params only from another run's workdir (its best, else latest checkpoint).
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    # HF checkpoint directory; empty: build a small BERT from scratch (demo).
    c.model.path = ""
    # HF hub id this variant stands for (download it on a connected machine).
    c.model.hub_id = PRETRAINED.get(variant, "")
    # Compute dtype (params stay fp32): float32, or bfloat16 on accelerators.
    c.model.dtype = "float32"
    # Recompute each layer's activations in the backward pass to save memory.
    c.model.remat = False
    # Classifier input: "cls" (the [CLS] state, as HF; needed for --mode=export) or "mean"
    # (mean of the last layer over real tokens).
    c.model.pooling = "mean" if variant == "demo" else "cls"
    # Scratch model: hidden size.
    c.model.hidden_size = 128
    # Scratch model: number of transformer layers.
    c.model.num_layers = 2
    # Scratch model: attention heads.
    c.model.num_heads = 4
    # Scratch model: feed-forward width.
    c.model.intermediate_size = 256
    # Scratch model: dropout on hidden states and attention probabilities.
    c.model.dropout = 0.1
    # Scratch model: characters seen fewer times than this map to [UNK].
    c.model.min_char_freq = 2

    c.data = ml_collections.ConfigDict()
    # Training file: label_id<TAB>text per line.
    c.data.train = "data/reviews/train.tsv"
    # Held-out file evaluated during training (model selection).
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

    c.train = ml_collections.ConfigDict()
    # Optimizer steps (ignored when epochs > 0).
    c.train.steps = 1200
    # Whole passes over the training data; 0: use `steps`.
    c.train.epochs = 0
    # Examples per micro-batch (global, across devices).
    c.train.batch_size = 32
    # Micro-batches accumulated per optimizer step.
    c.train.grad_accum = 1
    # Peak learning rate.
    c.train.lr = 1e-3
    # Learning-rate schedule after warmup: linear, cosine or constant.
    c.train.schedule = "linear"
    # Warmup steps (warmup_ratio > 0 overrides it).
    c.train.warmup_steps = 0
    # Warmup as a fraction of all steps (the originals used 6%).
    c.train.warmup_ratio = 0.06
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
    c.checkpoint.every = 300
    # Latest checkpoints kept (the best by eval.best_metric is kept as well).
    c.checkpoint.keep = 2

    c.eval = ml_collections.ConfigDict()
    # Evaluate every this many steps (and at the end).
    c.eval.every = 300
    # Metric that picks the best checkpoint.
    c.eval.best_metric = "weighted_f1"
    # Whether a larger (max) or smaller (min) best_metric is better.
    c.eval.best_mode = "max"
    # Eval batch size.
    c.eval.batch_size = 64

    c.log = ml_collections.ConfigDict()
    # Print and log training metrics every this many steps.
    c.log.every = 50

    c.predict = ml_collections.ConfigDict()
    # --mode=predict reads one text per line from this file ('-' = stdin).
    c.predict.input = "-"

    if variant != "demo":
        c.train.lr = 3e-5
        c.train.batch_size = 16
        c.train.epochs = 3
        c.data.max_length = 256
        c.log.every = 10
        c.eval.every = 200
        c.checkpoint.every = 200
    return c
