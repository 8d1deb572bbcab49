"""PPO for a causal LM: the policy with a value head, rollouts, and the trainer loop.

One PPO step (``train`` calls it ``epoch``, as the original prints ``epoch k mean-reward``):

1. **Rollout.** ``ppo.batch_size`` prompts (drawn from the task's list) are left-padded and the
   policy samples ``ppo.max_new_tokens`` tokens for each with ``lib.generate`` (pure sampling:
   temperature 1, no top-k / top-p, so the sampled tokens' log-probabilities are those of the
   policy). A response ends at its first EOS (kept); later tokens are padding.
2. **Score.** The task's reward function scores each prompt + response text (a classifier's
   probability of the rewarded label, a reward model's score, or a person's rating).
3. **Experience** (``lib.rl``): the log-probabilities of the response tokens under the policy
   and the frozen reference (the policy as it started), the value head's values, per-token
   rewards ``-beta * (logp - logp_ref)`` plus the score at the last token, GAE advantages
   (whitened over the batch unless ``ppo.whiten_advantages`` is off) and returns.
4. **Update.** ``ppo.epochs`` passes over the batch in shuffled minibatches of
   ``ppo.minibatch_size``, each one optimizer step on the clipped policy loss plus
   ``ppo.value_weight`` times the clipped value loss.
5. **KL controller.** beta moves towards ``ppo.kl_target`` (adaptive; a fixed beta when the
   target is 0), from the batch's KL to the reference.

No dropout anywhere in PPO: a dropout mask would make the ratio of new to old probabilities
noise even before the first update. Every random draw (prompts, sampling, minibatch order) is
a function of ``train.seed`` and the step, so a resumed run repeats an uninterrupted one.

Checkpoints (Orbax, ``<workdir>/checkpoints``) hold the trained parameters (the policy's, or its
LoRA adapters, and the value head), the optimizer state, beta and the step. Statistics go to
the console, TensorBoard and ``plots/curves.png`` (one panel each); samples of every step to
``eval/step_N.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lib import generate as generate_lib
from lib import lm_data, rl, sharding
from lib import train as train_lib
from lib.errors import Preempted, UserError
from lib.models.layers import dense
from lib.monitor import Monitor

# Statistics of a step, in the order they are plotted.
STATS = ("mean_reward", "kl", "beta", "policy_loss", "value_loss", "entropy", "clip_fraction",
         "value_clip_fraction", "approx_kl", "response_length", "loss")

# A reward function: (prompts, responses) texts -> one score per pair.
RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class PolicyWithValue(nnx.Module):
    """A causal LM (``lib.models.decoder.CausalLM``) and a value head, ``Linear(hidden, 1)`` on
    its final hidden states (the states its LM head reads)."""

    def __init__(self, lm: nnx.Module, *, rngs: nnx.Rngs):
        self.lm = lm
        self.value_head = dense(lm.config.hidden_size, 1, ("embed", None), rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, start: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(logp, values, logits)`` of the tokens after position ``start`` of ``input_ids``
        ``[b, t]``: ``logp [b, t - start]`` of each token under the policy, the values
        ``[b, t - start]`` of the states before it, and its logits."""
        hidden, _ = self.lm.hidden_states(input_ids, attention_mask)
        hidden = hidden[:, start - 1:-1]
        logits = self.lm.logits(hidden)
        values = self.value_head(hidden)[..., 0].astype(jnp.float32)
        return token_logprobs(logits, input_ids[:, start:]), values, logits


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log softmax(logits)[token]`` per position: ``[b, t]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The PPO fields of a config (``config.ppo``)."""

    batch_size: int
    minibatch_size: int
    epochs: int
    max_new_tokens: int
    clip_range: float
    value_clip: float
    value_weight: float
    gamma: float
    lam: float
    init_kl_coef: float
    kl_target: float
    kl_horizon: float
    whiten_advantages: bool

    @classmethod
    def of(cls, ppo_cfg) -> Settings:
        """The settings of ``config.ppo``."""
        cast = {"int": int, "float": float, "bool": bool}
        return cls(**{f.name: cast[f.type](ppo_cfg[f.name]) for f in dataclasses.fields(cls)})

    def controller(self, value) -> rl.AdaptiveKLController | rl.FixedKLController:
        """The KL controller at coefficient ``value``: adaptive towards ``kl_target``, or fixed
        when it is 0."""
        if self.kl_target > 0:
            return rl.AdaptiveKLController(value, self.kl_target, self.kl_horizon)
        return rl.FixedKLController(value)


# ----------------------------------------------------------------------------- pure steps


def make_experience(graphdef, s: Settings, start: int) -> Callable:
    """``(params, ref_params, frozen, batch, beta) -> (experience, stats)``: step 3 above."""

    def experience(params, ref_params, frozen, batch, beta):
        ids, mask, scores = batch["input_ids"], batch["attention_mask"], batch["scores"]
        response_mask = mask[:, start:].astype(jnp.float32)
        logp, values, logits = nnx.merge(graphdef, params, frozen)(ids, mask, start)
        logp_ref, _, _ = nnx.merge(graphdef, ref_params, frozen)(ids, mask, start)
        rewards = rl.kl_penalized_rewards(logp, logp_ref, scores, response_mask, beta)
        advantages, returns = rl.gae(rewards, values, response_mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = rl.whiten(advantages, response_mask)
        out = dict(input_ids=ids, attention_mask=mask, logp=logp, values=values,
                   advantages=advantages, returns=returns)
        stats = dict(mean_reward=jnp.mean(scores),
                     kl=rl.sequence_kl(logp, logp_ref, response_mask),
                     entropy=rl.masked_entropy(logits, response_mask),
                     response_length=jnp.mean(jnp.sum(response_mask, axis=-1)))
        return out, stats

    return experience


def make_update(graphdef, tx: optax.GradientTransformation, s: Settings, start: int
                ) -> Callable:
    """``(state, frozen, minibatch) -> (state, stats)``: one optimizer step of PPO's loss."""

    def loss_fn(params, frozen, mb):
        logp, values, _ = nnx.merge(graphdef, params, frozen)(
            mb["input_ids"], mb["attention_mask"], start)
        mask = mb["attention_mask"][:, start:].astype(jnp.float32)
        pg, clipped = rl.policy_loss(logp, mb["logp"], mb["advantages"], mask, s.clip_range)
        vf, v_clipped = rl.value_loss(values, mb["values"], mb["returns"], mask, s.value_clip)
        loss = pg + s.value_weight * vf
        approx_kl = 0.5 * rl.masked_mean((logp - mb["logp"]) ** 2, mask)
        return loss, dict(loss=loss, policy_loss=pg, value_loss=vf, clip_fraction=clipped,
                          value_clip_fraction=v_clipped, approx_kl=approx_kl)

    def update(state, frozen, mb):
        grads, stats = jax.grad(loss_fn, has_aux=True)(state["params"], frozen, mb)
        updates, opt_state = tx.update(grads, state["train"]["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "train": {**state["train"], "opt_state": opt_state}}, stats

    return update


def minibatch_order(rng: np.random.Generator, s: Settings) -> list[np.ndarray]:
    """Row indices of every minibatch of the ``s.epochs`` passes over one batch."""
    order = []
    for _ in range(s.epochs):
        perm = rng.permutation(s.batch_size)
        order += [perm[i:i + s.minibatch_size]
                  for i in range(0, s.batch_size, s.minibatch_size)]
    return order


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """A policy (``PolicyWithValue``), its frozen reference, the optimizer and the KL
    controller, placed on the mesh of ``config.mesh``; ``rollout`` + ``step`` is one PPO step.
    Also what the human-feedback loop drives one rated sample at a time. ``trainable`` is the
    NNX filter of the trained parameters (the value head's among them)."""

    def __init__(self, config, model: PolicyWithValue, tokenizer, trainable):
        self.config = config
        self.s = Settings.of(config.ppo)
        self.tokenizer = tokenizer
        self.prompt_length = int(config.ppo.prompt_length)
        # One rollout per update (the human-feedback loop) cannot be split across devices.
        devices = jax.devices()[:1] if self.s.minibatch_size == 1 else None
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                       devices)
        sharding.check_batch_size(self.s.minibatch_size, self.mesh, "ppo.minibatch_size")
        rules = tuple(tuple(r) for r in config.mesh.rules) or sharding.DEFAULT_RULES
        tcfg = config.train
        self.tx = train_lib.make_optimizer(tcfg, optax.constant_schedule(float(tcfg.lr)))
        (self.graphdef, self.state, self.state_sh, self.frozen,
         self.frozen_sh) = train_lib.init_state(model, self.tx, self.mesh, rules, trainable)
        self.state_sh["train"]["kl_coef"] = sharding.replicated(self.mesh)
        self._set_train(kl_coef=self.s.init_kl_coef)
        # The reference policy: the trained parameters as they start (copied: the update
        # donates the state's buffers).
        self.ref_params = jax.tree.map(jnp.copy, self.state["params"])
        self._experience = jax.jit(make_experience(self.graphdef, self.s, self.prompt_length))
        self._update = jax.jit(
            make_update(self.graphdef, self.tx, self.s, self.prompt_length),
            in_shardings=(self.state_sh, self.frozen_sh, sharding.batch_sharding(self.mesh)),
            out_shardings=(self.state_sh, sharding.replicated(self.mesh)),
            donate_argnums=(0,),
        )

    @property
    def step_no(self) -> int:
        """PPO steps done."""
        return int(self.state["train"]["step"])

    def policy(self, reference: bool = False) -> nnx.Module:
        """The current policy LM (or the frozen reference: the policy as it started)."""
        params = self.ref_params if reference else self.state["params"]
        return nnx.merge(self.graphdef, params, self.frozen).lm

    def rollout(self, prompts: Sequence[str], key: jax.Array) -> dict[str, Any]:
        """``rollout`` of the current policy."""
        return rollout(self.policy(), self.tokenizer, prompts, key, self.prompt_length,
                       self.s.max_new_tokens)

    def step(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, float]:
        """One PPO update of the rollouts in ``batch`` (ids, mask, ``scores``)."""
        arrays = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "scores")}
        arrays["scores"] = arrays["scores"].astype(jnp.float32)
        # Read now: the update donates the state's buffers.
        beta = float(self.state["train"]["kl_coef"])
        experience, stats = self._experience(self.state["params"], self.ref_params,
                                             self.frozen, arrays, jnp.float32(beta))
        update_stats = []
        for rows in minibatch_order(rng, self.s):
            mb = {k: v[rows] for k, v in experience.items()}
            self.state, mb_stats = self._update(self.state, self.frozen,
                                                sharding.shard_batch(mb, self.mesh))
            update_stats.append(mb_stats)
        host = jax.device_get(update_stats)
        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
        for k in host[0]:
            stats[k] = float(np.mean([m[k] for m in host]))
        stats["beta"] = beta
        n = len(batch["scores"])
        new_beta = self.s.controller(beta).update(stats["kl"], n).value
        self._set_train(kl_coef=new_beta, step=self.step_no + 1)
        return stats

    def _set_train(self, **values) -> None:
        """Set scalars of the train state, placed as the update step places them (so that it
        compiles once)."""
        train = dict(self.state["train"])
        train.update({k: jnp.asarray(v, train.get(k, jnp.zeros((), jnp.float32)).dtype)
                      for k, v in values.items()})
        self.state["train"] = jax.device_put(train, self.state_sh["train"])

    def items(self) -> dict[str, Any]:
        """What a checkpoint holds."""
        return {"params": self.state["params"], "train": self.state["train"]}

    def restore(self, ckpt, step: int) -> None:
        """Continue from checkpoint ``step`` of ``ckpt`` (a ``lib.checkpoint.Checkpoints``)."""
        self.state = ckpt.restore(step, self.items())


def rollout(lm: nnx.Module, tokenizer, prompts: Sequence[str], key: jax.Array,
            prompt_length: int, max_new_tokens: int) -> dict[str, Any]:
    """Sample one response per prompt (its last ``prompt_length`` tokens, left-padded):
    ``input_ids``/``attention_mask`` of prompt + response ``[b, prompt_length +
    max_new_tokens]`` (a response ends at its first EOS, kept) and the response texts."""
    encoded = [lm_data.encode_prompt(tokenizer, p)[-prompt_length:] for p in prompts]
    pad, eos = lm_data.pad_id(tokenizer), lm_data.eos_id(tokenizer)
    ids, mask = generate_lib.left_pad(encoded, pad, length=prompt_length)
    out = generate_lib.generate(lm, ids, mask, max_new_tokens=max_new_tokens, rng=key,
                                do_sample=True, eos_token_id=eos, pad_token_id=pad)
    ended = np.cumsum(out == eos, axis=1)
    response_mask = (ended == 0) | ((ended == 1) & (out == eos))
    return dict(input_ids=np.concatenate([ids, out], axis=1),
                attention_mask=np.concatenate([mask, response_mask.astype(mask.dtype)], 1),
                responses=[lm_data.decode_answer(tokenizer, row) for row in out])


def step_rng(seed: int, step: int) -> tuple[np.random.Generator, jax.Array]:
    """The random streams of PPO step ``step``: numpy (prompts, minibatches) and jax
    (sampling)."""
    return np.random.default_rng([seed, step]), jax.random.fold_in(jax.random.key(seed), step)


def train(config, workdir: str | Path, trainer: Trainer, prompts: Sequence[str],
          reward: RewardFn) -> dict[str, float]:
    """Run ``config.train.steps`` PPO steps, resuming from ``workdir``'s checkpoints; returns
    the last step's statistics."""
    workdir = Path(workdir)
    train_lib.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    total = int(config.train.steps)
    seed = int(config.train.seed)
    ckpt = train_lib.checkpoints(config, workdir)
    start = ckpt.latest_step()
    if start is not None:
        trainer.restore(ckpt, start)
        print(f"resumed from {ckpt.directory}/{start}", flush=True)
    start = trainer.step_no
    every = int(config.checkpoint.every) or total
    s = trainer.s
    print(f"PPO: {total} epochs of {s.batch_size} rollouts ({s.max_new_tokens} new tokens), "
          f"{s.epochs} passes in minibatches of {s.minibatch_size}"
          + (" (done)" if start >= total else ""), flush=True)
    monitor = Monitor(str(workdir), total, 1, 1, plots=STATS)
    monitor.truncate_after(start)
    stats: dict[str, float] = {}
    try:
        with train_lib.Preemption() as preempt:
            for step in range(start, total):
                rng, key = step_rng(seed, step)
                chosen = [prompts[i] for i in rng.integers(0, len(prompts), s.batch_size)]
                t0 = time.perf_counter()
                batch = trainer.rollout(chosen, key)
                batch["scores"] = np.asarray(reward(chosen, batch["responses"]), np.float32)
                stats = trainer.step(batch, rng)
                if not all(math.isfinite(v) for v in stats.values()):
                    raise UserError(f"PPO step {step + 1}: a statistic is not finite "
                                    f"({stats}); lower --config.train.lr")
                done = step + 1
                stats["seconds"] = time.perf_counter() - t0
                monitor.log_train(done, stats)
                print(f"epoch {done} mean-reward: {stats['mean_reward']:.4f}  kl: "
                      f"{stats['kl']:.3f}  beta: {stats['beta']:.4f}", flush=True)
                shown = rng.choice(s.batch_size, size=min(5, s.batch_size), replace=False)
                samples = [{"prompt": chosen[i], "response": batch["responses"][i],
                            "score": float(batch["scores"][i])} for i in shown]
                for sample in samples:
                    print("  " + json.dumps(sample, ensure_ascii=False), flush=True)
                train_lib.write_eval(workdir, done, stats, samples)
                if done % every == 0 or done == total or preempt.requested:
                    ckpt.save(done, trainer.items())
                if preempt.requested:
                    raise Preempted(f"stopped at epoch {done} of {total}: run the same "
                                    "command again to resume")
    finally:
        ckpt.close()
        monitor.close()
    return stats
