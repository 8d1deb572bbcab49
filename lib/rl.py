"""The arithmetic of RLHF: PPO on generated tokens, the adaptive KL penalty, and the reward
model's ranking loss. Pure ``jax.numpy`` functions of arrays (jit- and grad-friendly); no model
or trainer in here.

Shapes: ``[b, t]`` arrays run over the ``t`` generated tokens of ``b`` responses; ``mask`` is 1
on real generated tokens and 0 on padding (after the end of a response). Padded positions
contribute nothing to any sum or mean, and the per-token outputs are 0 there.

Defaults are those of the originals (Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", as in TRL's PPO): KL coefficient beta 0.2 adapted towards a KL of 6 over a
horizon of 10000 samples; GAE with gamma 1, lambda 0.95; policy ratio clip 0.2; value clip 0.2,
value loss weight 0.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# The originals' hyperparameters.
INIT_KL_COEF = 0.2
KL_TARGET = 6.0
KL_HORIZON = 10000.0
GAMMA = 1.0
LAM = 0.95
CLIP_RANGE = 0.2
VALUE_CLIP = 0.2
VALUE_WEIGHT = 0.1
WHITEN_EPS = 1e-8


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(x * mask) / sum(mask)`` (0 when the mask is empty)."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def last_token_index(mask: jax.Array) -> jax.Array:
    """``[b]``: the position of the last real token of each row (-1 for an empty row)."""
    positions = jnp.arange(mask.shape[-1])
    return jnp.max(jnp.where(mask > 0, positions, -1), axis=-1)


def kl_penalized_rewards(
    logp: jax.Array, logp_ref: jax.Array, scores: jax.Array, mask: jax.Array, beta
) -> jax.Array:
    """Per-token rewards ``[b, t]`` of PPO.

    ``r_t = -beta * (logp_t - logp_ref_t)`` on every real token (the sampled token's log
    probability under the policy and under the frozen reference model: a one-sample estimate
    of the KL to the reference), plus the reward model's ``score`` ``[b]`` at the last real
    token of each response. 0 on padding.
    """
    mask = mask.astype(logp.dtype)
    rewards = -beta * (logp - logp_ref) * mask
    last = jax.nn.one_hot(last_token_index(mask), logp.shape[-1], dtype=logp.dtype)
    return rewards + scores[:, None].astype(logp.dtype) * last


def sequence_kl(logp: jax.Array, logp_ref: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean over responses of ``sum_t (logp_t - logp_ref_t)`` over real tokens: the KL
    estimate that ``AdaptiveKLController.update`` takes."""
    return jnp.mean(jnp.sum((logp - logp_ref) * mask.astype(logp.dtype), axis=-1))


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma=GAMMA, lam=LAM
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation over the generated tokens: ``(advantages, returns)``.

    With ``m`` the mask and ``V_t``, ``m_t`` taken as 0 past the end:

    ``delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t``
    ``A_t = m_t * (delta_t + gamma * lam * m_{t+1} * A_{t+1})``
    ``returns_t = m_t * (A_t + V_t)``

    so a response ends at its last real token (no value is bootstrapped from padding).
    """
    dtype = rewards.dtype
    mask = mask.astype(dtype)
    values = values.astype(dtype)
    zero = jnp.zeros_like(values[:, :1])
    next_values = jnp.concatenate([values[:, 1:], zero], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], zero], axis=1)
    deltas = rewards + gamma * next_mask * next_values - values

    def step(carry, x):
        delta, m, m_next = x
        adv = m * (delta + gamma * lam * m_next * carry)
        return adv, adv

    xs = (deltas.T, mask.T, next_mask.T)  # time-major, scanned from the end
    _, advantages = jax.lax.scan(step, jnp.zeros_like(values[:, 0]), xs, reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """``(x - mean) / sqrt(var + 1e-8)`` with the mean and (biased) variance over the real
    tokens of the whole batch; ``shift_mean=False`` adds the mean back. 0 on padding."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * mask.astype(x.dtype)


def policy_loss(
    logp_new: jax.Array, logp_old: jax.Array, advantages: jax.Array, mask: jax.Array,
    clip=CLIP_RANGE,
) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate: ``(loss, clip_fraction)``.

    ``ratio_t = exp(logp_new_t - logp_old_t)``;
    ``loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip, 1 + clip))``;
    ``clip_fraction = mean_t [-A_t * clip(ratio_t, ...) > -A_t * ratio_t]`` (the tokens whose
    gradient the clipping removed); means over real tokens.
    """
    ratio = jnp.exp(logp_new - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).astype(ratio.dtype), mask)


def value_loss(
    values_new: jax.Array, values_old: jax.Array, returns: jax.Array, mask: jax.Array,
    clip=VALUE_CLIP,
) -> tuple[jax.Array, jax.Array]:
    """The clipped value loss: ``(loss, clip_fraction)``.

    ``V'_t = V_old_t + clip(V_new_t - V_old_t, -clip, clip)``;
    ``loss = 0.5 * mean_t max((V_new_t - R_t)^2, (V'_t - R_t)^2)``;
    ``clip_fraction = mean_t [(V'_t - R_t)^2 > (V_new_t - R_t)^2]``; means over real tokens.
    PPO's total loss is ``policy_loss + VALUE_WEIGHT * value_loss``.
    """
    clipped_values = values_old + jnp.clip(values_new - values_old, -clip, clip)
    unclipped = (values_new - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).astype(values_new.dtype), mask)


def masked_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real tokens of the policy's entropy ``-sum_v p_v log p_v`` (``logits
    [b, t, vocab]``)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return masked_mean(entropy, mask)


@struct.dataclass
class AdaptiveKLController:
    """The KL coefficient beta, adapted towards a target KL (Ziegler et al. 2019):

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``

    where ``KL`` is the batch's KL to the reference (``sequence_kl``) and ``n_steps`` the
    number of responses it was measured on. An immutable pytree: ``update`` returns a new one.
    """

    value: jax.Array | float = INIT_KL_COEF
    target: float = struct.field(pytree_node=False, default=KL_TARGET)
    horizon: float = struct.field(pytree_node=False, default=KL_HORIZON)

    def update(self, kl, n_steps) -> AdaptiveKLController:
        """The controller after a batch of ``n_steps`` responses with mean KL ``kl``."""
        error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
        return self.replace(value=self.value * (1.0 + error * n_steps / self.horizon))


@struct.dataclass
class FixedKLController:
    """A constant KL coefficient; ``update`` returns it unchanged."""

    value: jax.Array | float = INIT_KL_COEF

    def update(self, kl, n_steps) -> FixedKLController:
        """The same controller (beta does not adapt)."""
        return self


def rank_loss(rewards: jax.Array) -> jax.Array:
    """The reward model's ranking loss of lists ranked best to worst, ``rewards [b, k]``:
    ``-mean over lists and pairs i < j of log sigmoid(r_i - r_j)``."""
    i, j = jnp.triu_indices(rewards.shape[-1], k=1)
    return -jnp.mean(jax.nn.log_sigmoid(rewards[:, i] - rewards[:, j]))


def pairwise_accuracy(rewards: jax.Array) -> jax.Array:
    """The fraction of pairs ``i < j`` (over all lists of ``rewards [b, k]``, ranked best to
    worst) whose rewards are in the right order, ``r_i > r_j``; a tie counts as wrong."""
    i, j = jnp.triu_indices(rewards.shape[-1], k=1)
    return jnp.mean((rewards[:, i] > rewards[:, j]).astype(jnp.float32))
