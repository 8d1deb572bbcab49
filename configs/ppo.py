r"""RLHF with PPO: a GPT-2 policy learns to write positive reviews (``tasks/ppo.py``).

Variants (``--config=configs/ppo.py:VARIANT``):
  demo           the whole pipeline on 2 CPU cores: a sentiment classifier trained on the
                 shipped reviews (``classification:ppo-reward``), a small GPT-2 pretrained on
                 the review texts (``sft:reviews-lm``), then PPO of that GPT-2 towards the
                 classifier's "正面" probability (the default)
  gpt2-chinese   the original: ``uer/gpt2-chinese-cluecorpussmall`` as the policy and
                 ``uer/roberta-base-finetuned-jd-binary-chinese`` as the reward (both need
                 ``--config.model.path`` / ``--config.reward.path``); batch 128, 4 PPO epochs,
                 Adam lr 1.41e-5, adaptive KL (0.2, target 6, horizon 10000)
  human          the rating loop of ``--mode=rate``: one PPO step per sample a person rates
                 in [-2, 2] (batch 1); give ``--config.model.path``

Run the demo:

  python main.py --config=configs/ppo.py --workdir=workdirs/ppo

It trains the reward classifier (``workdirs/ppo/reward``: dev accuracy 0.764 after 300 steps)
and the policy LM (``workdirs/ppo/policy``: dev perplexity 131 after 500 steps), then prints per
PPO step ``epoch 12 mean-reward: 0.7001  kl: 2.561  beta: 0.1944`` and 5 random samples;
statistics go to TensorBoard and ``plots/curves.png``. Measured on 2 AMD EPYC cores: the
step's mean reward rises from 0.59 (epoch 1) to 0.78 (epoch 60, 0.79 on average over the last
10) with the KL to the reference at 3.5 and beta down from 0.200 to 0.172; on the same 256
prompts and sampling key the reference policy scores 0.555 and the trained one 0.798 (it learned
short positive continuations: 这部电影很|好, 说实话，真的很|不错的; mean response 4.3 tokens
against 14 at the start). The three stages take 4m24s of wall time from a fresh compilation
cache (4m36s of CPU); a rerun prints the same numbers.

The human-feedback tools work on a run's latest policy: ``--mode=rate`` (type a reward for
each sample, ``q`` or Ctrl-C saves and quits) and ``--mode=rank`` (order 4 samples per prompt;
the lists are appended to ``feedback.rank_file``, the reward-model format).
"""

import ml_collections

from lib import config as config_lib

# The original's prompts.
PROMPTS = ("刚收到货，感觉", "这部电影很", "说实话，真的很", "这次购物总的来说体验很")
VARIANTS = ("demo", "gpt2-chinese", "human")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one variant (see the module docstring)."""
    variant = arg or "demo"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")
    c = config_lib.base("ppo", variant)
    c.model.family = "gpt2"
    # Where model.path is empty: "<config module>:<variant>" of a task whose export is the
    # policy, trained first in <workdir>/policy.
    c.model.recipe = "sft:reviews-lm"

    c.reward = ml_collections.ConfigDict()
    # HF sequence-classification directory scoring prompt + response.
    c.reward.path = ""
    # Where reward.path is empty: "<config module>:<variant>" trained first in
    # <workdir>/reward and exported.
    c.reward.recipe = "classification:ppo-reward"
    # The rewarded label (name from id2label, or index): its probability is the score; a
    # one-label reward model's logit is the score whatever this says.
    c.reward.label = "正面"
    # Tokens of prompt + response the classifier reads.
    c.reward.max_length = 64

    c.ppo = ml_collections.ConfigDict()
    # Prompts the rollouts continue (drawn uniformly).
    c.ppo.prompts = PROMPTS
    # Prompt tokens kept (the last ones), left-padded to this length.
    c.ppo.prompt_length = 16
    # Rollouts per PPO step.
    c.ppo.batch_size = 128
    # Rollouts per optimizer step within a PPO step.
    c.ppo.minibatch_size = 16
    # Passes over each batch of rollouts.
    c.ppo.epochs = 4
    # Sampled tokens per response (pure sampling: temperature 1, no top-k / top-p).
    c.ppo.max_new_tokens = 16
    # Policy ratio clip.
    c.ppo.clip_range = 0.2
    # Value clip around the rollout's values.
    c.ppo.value_clip = 0.2
    # Weight of the value loss in PPO's loss.
    c.ppo.value_weight = 0.1
    # GAE discount.
    c.ppo.gamma = 1.0
    # GAE lambda.
    c.ppo.lam = 0.95
    # Initial KL coefficient beta.
    c.ppo.init_kl_coef = 0.2
    # KL (summed over a response) that beta adapts towards; 0: beta stays fixed.
    c.ppo.kl_target = 6.0
    # Responses over which beta adapts (the controller's horizon).
    c.ppo.kl_horizon = 10000.0
    # Whiten the advantages over each batch (off for one rollout per step: whitening a single
    # response would remove the sign of its reward).
    c.ppo.whiten_advantages = True

    c.feedback = ml_collections.ConfigDict()
    # --mode=rank: samples per prompt a person orders.
    c.feedback.samples_per_prompt = 4
    # --mode=rank: the reward-model TSV the ranked lists are appended to (best first).
    c.feedback.rank_file = "workdirs/feedback/ranked.tsv"
    # --mode=rate: where every rating is appended as a JSON line (relative to the workdir).
    c.feedback.ratings_file = "ratings.jsonl"

    # PPO steps (each: a batch of rollouts, then ppo.epochs passes over it).
    c.train.steps = 60
    # Adam, as the original (no weight decay), constant learning rate.
    c.train.lr = 5e-4
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.checkpoint.every = 10
    c.log.every = 1

    if variant == "gpt2-chinese":
        c.model.recipe = ""
        c.model.hub_id = "uer/gpt2-chinese-cluecorpussmall"
        c.reward.recipe = ""
        c.reward.label = "positive (stars 4 and 5)"
        c.reward.max_length = 128
        c.train.lr = 1.41e-5
        c.train.steps = 200
        c.train.grad_clip = 0.0
    if variant == "human":
        c.model.recipe = ""
        c.reward.recipe = ""
        c.ppo.batch_size = 1
        c.ppo.minibatch_size = 1
        c.ppo.epochs = 1
        c.ppo.whiten_advantages = False
        c.train.lr = 1.41e-5
    return c
