"""lib.rl against plain numpy loops written from the formulas, on fixed random inputs with
padded responses; the adaptive KL controller over several updates; the ranking loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib import rl

B, T, V = 4, 7, 5
LENGTHS = [7, 5, 1, 3]  # real generated tokens per row; the rest is padding


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    mask = np.array([[1.0] * n + [0.0] * (T - n) for n in LENGTHS])
    f = lambda *shape: rng.normal(size=shape)
    return dict(mask=mask, logp=f(B, T) - 2, logp_ref=f(B, T) - 2, scores=f(B),
                values=f(B, T), rewards=f(B, T), adv=f(B, T), logp_old=f(B, T) * 0.1,
                logits=f(B, T, V) * 2)


def close(ours, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(ours, np.float64), want, rtol=tol, atol=tol)


def test_kl_penalized_rewards(inputs):
    d = inputs
    beta = 0.3
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(LENGTHS[b]):
            want[b, t] = -beta * (d["logp"][b, t] - d["logp_ref"][b, t])
        want[b, LENGTHS[b] - 1] += d["scores"][b]
    ours = jax.jit(rl.kl_penalized_rewards)(d["logp"], d["logp_ref"], d["scores"], d["mask"],
                                            beta)
    close(ours, want)
    kl = np.mean([sum(d["logp"][b, :n] - d["logp_ref"][b, :n]) for b, n in enumerate(LENGTHS)])
    close(rl.sequence_kl(d["logp"], d["logp_ref"], d["mask"]), kl)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae(inputs, gamma, lam):
    r, v = inputs["rewards"], inputs["values"]
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b, n in enumerate(LENGTHS):
        last = 0.0
        for t in reversed(range(n)):
            next_v = v[b, t + 1] if t + 1 < n else 0.0
            delta = r[b, t] + gamma * next_v - v[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + v[b, t]
    ours_adv, ours_ret = jax.jit(rl.gae)(r, v, inputs["mask"], gamma, lam)
    close(ours_adv, adv)
    close(ours_ret, ret)


def test_whiten(inputs):
    x, mask = inputs["adv"], inputs["mask"]
    real = [x[b, t] for b in range(B) for t in range(LENGTHS[b])]
    mean = sum(real) / len(real)
    var = sum((v - mean) ** 2 for v in real) / len(real)
    want = np.zeros((B, T))
    kept = np.zeros((B, T))
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            want[b, t] = (x[b, t] - mean) / math.sqrt(var + 1e-8)
            kept[b, t] = want[b, t] + mean
    close(rl.whiten(x, mask), want)
    close(rl.whiten(x, mask, shift_mean=False), kept)


def masked_tokens(fn):
    """Mean over the real tokens of fn(b, t), numpy loops."""
    values = [fn(b, t) for b, n in enumerate(LENGTHS) for t in range(n)]
    return sum(values) / len(values)


def check_loss_and_fraction(fn, args, per_token):
    """``fn(*args) -> (loss, clip fraction)`` against the numpy per-token values
    ``[loss term, clipped or not]``; some but not all tokens are clipped."""
    loss, frac = jax.jit(fn)(*args)
    want = masked_tokens(per_token)
    close(loss, want[0])
    close(frac, want[1])
    assert 0 < float(frac) < 1


def test_policy_loss(inputs):
    d = inputs
    new, old, adv = d["logp"] * 0.1, d["logp_old"], d["adv"]  # ratios around 1, some clipped

    def per_token(b, t):
        ratio = math.exp(new[b, t] - old[b, t])
        a = -adv[b, t] * ratio
        c = -adv[b, t] * min(max(ratio, 0.8), 1.2)
        return np.array([max(a, c), float(c > a)])

    check_loss_and_fraction(rl.policy_loss, (new, old, adv, d["mask"], 0.2), per_token)


def test_value_loss(inputs):
    d = inputs
    new, old, ret = d["values"], d["values"] + d["logp_old"] * 3, d["rewards"]

    def per_token(b, t):
        clipped_v = old[b, t] + min(max(new[b, t] - old[b, t], -0.2), 0.2)
        a, c = (new[b, t] - ret[b, t]) ** 2, (clipped_v - ret[b, t]) ** 2
        return np.array([0.5 * max(a, c), float(c > a)])

    check_loss_and_fraction(rl.value_loss, (new, old, ret, d["mask"], 0.2), per_token)


def test_masked_entropy(inputs):
    logits = inputs["logits"]

    def per_token(b, t):
        z = np.exp(logits[b, t] - logits[b, t].max())
        p = z / z.sum()
        return -sum(pi * math.log(pi) for pi in p)

    close(rl.masked_entropy(logits, inputs["mask"]), masked_tokens(per_token))


def test_adaptive_kl_controller_over_updates():
    history = [(10.0, 256), (3.0, 256), (6.6, 512), (0.5, 128), (6.0, 64)]
    ctl = rl.AdaptiveKLController()
    assert float(ctl.value) == 0.2 and (ctl.target, ctl.horizon) == (6.0, 10000.0)
    beta = 0.2
    update = jax.jit(lambda c, kl, n: c.update(kl, n))
    for kl, n in history:
        error = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
        beta *= 1 + error * n / 10000.0
        ctl = update(ctl, kl, n)
        close(ctl.value, beta, tol=1e-6)
    assert beta != 0.2
    fixed = rl.FixedKLController(0.1)
    for kl, n in history:
        fixed = fixed.update(kl, n)
    assert float(fixed.value) == 0.1


def test_rank_loss_and_pairwise_accuracy():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(5, 4))
    r[0] = [3.0, 2.0, 1.0, 0.0]  # right order
    r[1] = [1.0, 1.0, 0.0, -1.0]  # a tie
    terms, right = [], []
    for row in r:
        for i in range(4):
            for j in range(i + 1, 4):
                terms.append(-math.log(1 / (1 + math.exp(-(row[i] - row[j])))))
                right.append(row[i] > row[j])
    close(jax.jit(rl.rank_loss)(jnp.asarray(r)), sum(terms) / len(terms))
    close(rl.pairwise_accuracy(jnp.asarray(r)), sum(right) / len(right))
    # The gradient pushes the better text up and the worse one down.
    g = jax.grad(lambda x: rl.rank_loss(x))(jnp.zeros((1, 4)))
    assert float(g[0, 0]) < 0 < float(g[0, 3])
