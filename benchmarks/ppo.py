"""One PPO epoch: our ``lib.ppo.Trainer`` vs a minimal PyTorch loop of the same sizes.

An epoch is one PPO step of the demo (``configs/ppo.py``) without its reward model (each
rollout gets a fixed random score, the same on both sides, so only the PPO work is timed):

1. rollouts: ``--batch`` prompts (the demo's, left-padded to 16 tokens), 16 new tokens of pure
   sampling each (temperature 1, no top-k / top-p), EOS allowed (a response ends at its first
   EOS, kept);
2. experience: the response tokens' log-probabilities under the policy and the frozen
   reference, the value head's values, KL-penalized per-token rewards (the score at the last
   token), GAE, advantage whitening;
3. update: 4 passes over the batch in shuffled minibatches of 16 (8 per pass at batch 128),
   each one Adam step (global-norm clip 1.0, lr 5e-4) on the clipped policy loss plus 0.1 x
   the clipped value loss.

The policy is a GPT-2 of the ``sft:reviews-lm`` size (hidden 128, 2 layers, 4 heads, MLP 512,
tied head) with a character vocabulary of 4000 and a ``Linear(hidden, 1)`` value head, no
dropout.

- **Ours**: ``lib.ppo.PolicyWithValue`` around the scratch GPT-2 built by ``lib.models.build``,
  in ``lib.ppo.Trainer``; an epoch is ``trainer.rollout(prompts, key)`` + ``trainer.step``.
- **PyTorch**: ``transformers.GPT2LMHeadModel`` loaded from our export of the same initial
  weights (``lib.models.export``), a ``torch.nn.Linear`` value head holding ours' weights, a
  frozen deep copy as the reference; rollouts by HF ``generate(do_sample=True, top_k=0)``; the
  experience and losses written here in a few lines of torch from the formulas of ``lib/rl.py``
  (not by calling it); ``torch.optim.Adam`` with ``clip_grad_norm_``. Eval mode, fp32, one
  thread per core (``--torch-threads`` sets another number), no ``torch.compile``. It reads
  the same prompts, the same minibatch order (``lib.ppo.minibatch_order`` of the same seed)
  and the same scores as ours.

Before timing, two warm-up epochs run on each side (ours: compilation). In the first both
update on our rollouts: with equal weights both compute the same thing, and the script prints
how far their log-probabilities and values are apart and both sides' statistics of that epoch.
Then the two alternate, one epoch each, ``--epochs`` times; the table gives the median rollout,
update and whole-epoch wall times, the CPU time (user + sys of the process) per epoch, and the
ratio PyTorch / ours (above 1: ours is faster). The load average while timing is printed: on a
shared machine the ratio under load is only indicative.

    .venv/bin/python benchmarks/ppo.py [--epochs 5] [--batch 128] [--torch-threads N]
    .venv/bin/python benchmarks/ppo.py --dry    # tiny sizes, the same code (~30 s of CPU)

It prints, per timed epoch, ``timed epoch 1/5: ours 4.35 s, torch 6.52 s``, then (the demo
sizes on a busy 2-core machine, load average 14, one PyTorch thread)::

    per epoch (median)     rollout s  update s  total s   CPU s
    -----------------------------------------------------------
    ours (lib.ppo)             0.834     3.678    4.352    1.71
    PyTorch + HF generate      1.016     5.508    6.524    2.08
    ratio torch / ours          1.22      1.50     1.50    1.22

and one JSON line of every figure (``benchmarks/README.md`` has the runs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from configs import ppo as ppo_config  # noqa: E402
from lib import lm_data, models, ppo  # noqa: E402
from lib.generate import left_pad  # noqa: E402
from lib.tokenizer import DEFAULT_SPECIALS, CharVocab  # noqa: E402

# The demo's policy (sft:reviews-lm: GPT-2, lib.config's base sizes, MLP 512) and PPO sizes.
DEMO = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
            vocab=4000, batch=128, minibatch=16, passes=4, prompt_length=16, new_tokens=16)
# --dry: the same code at a toy size.
DRY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
           vocab=300, batch=8, minibatch=4, passes=2, prompt_length=8, new_tokens=4)
SEED = 0
# Statistics both sides report for an epoch (lib.ppo.STATS without beta, which is an input).
STATS = ("mean_reward", "kl", "entropy", "response_length", "loss", "policy_loss", "value_loss",
         "clip_fraction", "value_clip_fraction", "approx_kl")


def char_vocab(size: int) -> CharVocab:
    """``size`` tokens: the special tokens, the demo prompts' characters, then CJK characters
    in code-point order."""
    chars = list(dict.fromkeys("".join(ppo_config.PROMPTS)))
    fill = (chr(c) for c in range(0x4E00, 0xA000) if chr(c) not in chars)
    chars += [next(fill) for _ in range(size - len(DEFAULT_SPECIALS) - len(chars))]
    return CharVocab(list(DEFAULT_SPECIALS) + chars)


def make_config(sizes: dict) -> ml_collections.ConfigDict:
    """The PPO demo config at ``sizes`` (a scratch GPT-2 policy)."""
    c = ppo_config.get_config("demo")
    c.model.recipe = c.reward.recipe = ""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        c.model[key] = sizes[key]
    c.model.num_key_value_heads = sizes["num_attention_heads"]
    c.ppo.update(batch_size=sizes["batch"], minibatch_size=sizes["minibatch"],
                 epochs=sizes["passes"], prompt_length=sizes["prompt_length"],
                 max_new_tokens=sizes["new_tokens"])
    c.train.seed = SEED
    return c


def scores_of(epoch: int, n: int) -> np.ndarray:
    """The fixed random score of each of the ``n`` rollouts of ``epoch`` (both sides)."""
    return np.random.default_rng([SEED, 1000 + epoch]).normal(size=n).astype(np.float32)


def prompts_of(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` demo prompts drawn as ``lib.ppo.train`` draws them."""
    prompts = ppo_config.PROMPTS
    return [prompts[i] for i in rng.integers(0, len(prompts), n)]


# ----------------------------------------------------------------------------- PyTorch


@dataclasses.dataclass
class TorchPPO:
    """The PyTorch reference: policy, value head, frozen reference, Adam; ``rollout`` +
    ``step`` is one epoch."""

    lm: transformers.GPT2LMHeadModel
    value_head: torch.nn.Linear
    tokenizer: CharVocab
    s: ppo.Settings
    prompt_length: int
    lr: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float
    beta: float

    def __post_init__(self):
        self.lm.eval()  # no dropout, as ours
        self.ref = copy.deepcopy(self.lm).requires_grad_(False)
        self.params = [*self.lm.parameters(), *self.value_head.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=self.lr, betas=self.betas, eps=self.eps)
        self.eos, self.pad = lm_data.eos_id(self.tokenizer), lm_data.pad_id(self.tokenizer)

    def rollout(self, prompts: Sequence[str], seed: int) -> dict[str, np.ndarray]:
        """HF ``generate`` with pure sampling; ids / mask of prompt + response and the response
        texts, as ours."""
        encoded = [lm_data.encode_prompt(self.tokenizer, p)[-self.prompt_length:]
                   for p in prompts]
        ids, mask = left_pad(encoded, self.pad, length=self.prompt_length)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.lm.generate(torch.from_numpy(ids).long(),
                                   attention_mask=torch.from_numpy(mask).long(),
                                   do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                   max_new_tokens=self.s.max_new_tokens,
                                   eos_token_id=self.eos, pad_token_id=self.pad)
        out = out[:, ids.shape[1]:].numpy()
        # HF stops once every row has ended: pad the rest.
        out = np.pad(out, ((0, 0), (0, self.s.max_new_tokens - out.shape[1])),
                     constant_values=self.pad)
        ended = np.cumsum(out == self.eos, axis=1)
        response_mask = (ended == 0) | ((ended == 1) & (out == self.eos))
        return dict(input_ids=np.concatenate([ids, out], axis=1),
                    attention_mask=np.concatenate([mask, response_mask.astype(mask.dtype)], 1),
                    responses=[lm_data.decode_answer(self.tokenizer, row) for row in out])

    def forward(self, lm, ids: torch.Tensor, mask: torch.Tensor):
        """``(logp, values, logits)`` of the response tokens (the LM head and the value head
        read the states before each response token only, as ours)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = lm.transformer(input_ids=ids, attention_mask=mask,
                                position_ids=positions).last_hidden_state
        hidden = hidden[:, self.prompt_length - 1:-1]
        logits = lm.lm_head(hidden)
        logp = torch.log_softmax(logits, -1).gather(
            -1, ids[:, self.prompt_length:, None])[..., 0]
        return logp, self.value_head(hidden)[..., 0], logits

    def experience(self, batch: dict[str, np.ndarray]):
        """Log-probs, values, KL-penalized rewards, GAE, whitened advantages, returns."""
        s = self.s
        ids = torch.from_numpy(batch["input_ids"]).long()
        mask = torch.from_numpy(batch["attention_mask"]).long()
        scores = torch.from_numpy(batch["scores"]).float()
        m = mask[:, self.prompt_length:].float()
        with torch.no_grad():
            logp, values, logits = self.forward(self.lm, ids, mask)
            logp_ref, _, _ = self.forward(self.ref, ids, mask)
            t = m.shape[1]
            last = (m * torch.arange(t)).argmax(-1)
            rewards = -self.beta * (logp - logp_ref) * m
            rewards[torch.arange(len(last)), last] += scores
            adv = torch.zeros_like(values)
            carry = torch.zeros(len(values))
            for i in reversed(range(t)):
                m_next = m[:, i + 1] if i + 1 < t else torch.zeros_like(carry)
                v_next = values[:, i + 1] if i + 1 < t else torch.zeros_like(carry)
                delta = rewards[:, i] + s.gamma * m_next * v_next - values[:, i]
                carry = m[:, i] * (delta + s.gamma * s.lam * m_next * carry)
                adv[:, i] = carry
            returns = (adv + values) * m
            mean = (adv * m).sum() / m.sum()
            var = (((adv - mean) ** 2) * m).sum() / m.sum()
            adv = (adv - mean) * torch.rsqrt(var + 1e-8) * m
            p = torch.log_softmax(logits, -1)
            entropy = -(p.exp() * p).sum(-1)
            stats = dict(mean_reward=scores.mean(), kl=((logp - logp_ref) * m).sum(-1).mean(),
                         entropy=(entropy * m).sum() / m.sum(), response_length=m.sum(-1).mean())
        return dict(ids=ids, mask=mask, logp=logp, values=values, adv=adv,
                    returns=returns), stats

    def loss(self, mb: dict[str, torch.Tensor]):
        """PPO's clipped policy loss + value_weight x clipped value loss, and statistics."""
        s = self.s
        logp, values, _ = self.forward(self.lm, mb["ids"], mb["mask"])
        m = mb["mask"][:, self.prompt_length:].float()
        mean = lambda x: (x * m).sum() / m.sum()
        ratio = torch.exp(logp - mb["logp"])
        pg1 = -mb["adv"] * ratio
        pg2 = -mb["adv"] * ratio.clamp(1 - s.clip_range, 1 + s.clip_range)
        v_clipped = mb["values"] + (values - mb["values"]).clamp(-s.value_clip, s.value_clip)
        vf1 = (values - mb["returns"]) ** 2
        vf2 = (v_clipped - mb["returns"]) ** 2
        pg, vf = mean(torch.maximum(pg1, pg2)), 0.5 * mean(torch.maximum(vf1, vf2))
        loss = pg + s.value_weight * vf
        return loss, dict(loss=loss.detach(), policy_loss=pg.detach(), value_loss=vf.detach(),
                          clip_fraction=mean((pg2 > pg1).float()),
                          value_clip_fraction=mean((vf2 > vf1).float()),
                          approx_kl=0.5 * mean((logp - mb["logp"]) ** 2).detach())

    def step(self, batch: dict[str, np.ndarray], order: list[np.ndarray]) -> dict[str, float]:
        """Experience, then one Adam step per minibatch of ``order``; the epoch's statistics
        (update statistics averaged over the minibatches)."""
        exp, stats = self.experience(batch)
        per_mb = []
        for rows in order:
            index = torch.from_numpy(rows).long()
            loss, mb_stats = self.loss({k: v[index] for k, v in exp.items()})
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            per_mb.append({k: v.item() for k, v in mb_stats.items()})
        out = {k: float(v) for k, v in stats.items()}
        out.update({k: float(np.mean([m[k] for m in per_mb])) for k in per_mb[0]})
        return out


# ----------------------------------------------------------------------------- the run


def build(sizes: dict) -> tuple[ppo.Trainer, TorchPPO]:
    """Ours (a ``lib.ppo.Trainer``) and the PyTorch reference from the same initial weights."""
    config = make_config(sizes)
    vocab = char_vocab(sizes["vocab"])
    built = models.build(config.model, head="causal_lm", tokenizer=vocab, seed=SEED,
                         max_length=sizes["prompt_length"] + sizes["new_tokens"])
    policy = ppo.PolicyWithValue(built.model, rngs=nnx.Rngs(SEED))
    with tempfile.TemporaryDirectory() as tmp:
        models.export(built, built.model, tmp, config.model)
        hf_lm = transformers.GPT2LMHeadModel.from_pretrained(tmp)
    value_head = torch.nn.Linear(sizes["hidden_size"], 1)
    with torch.no_grad():
        value_head.weight.copy_(torch.from_numpy(np.array(policy.value_head.kernel[...]).T))
        value_head.bias.copy_(torch.from_numpy(np.array(policy.value_head.bias[...])))
    trainer = ppo.Trainer(config, policy, vocab, nnx.Param)
    t = config.train
    reference = TorchPPO(hf_lm, value_head, vocab, trainer.s, trainer.prompt_length,
                         float(t.lr), (float(t.b1), float(t.b2)), float(t.eps),
                         float(t.grad_clip), float(config.ppo.init_kl_coef))
    return trainer, reference


def ours_initial(trainer: ppo.Trainer, batch: dict[str, np.ndarray]):
    """``(logp, values)`` of ``batch``'s responses under our initial parameters (the
    reference's copy, value head included)."""
    model = nnx.merge(trainer.graphdef, trainer.ref_params, trainer.frozen)
    logp, values, _ = model(batch["input_ids"], batch["attention_mask"], trainer.prompt_length)
    return np.asarray(logp), np.asarray(values)


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """``(wall s, CPU s, result)`` of ``fn()``: CPU is user + sys of the whole process."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def ours_epoch(trainer: ppo.Trainer, epoch: int, batch_size: int):
    """One epoch of ours: ``(times, stats, batch)``; ``times`` has rollout / update / total
    wall and CPU seconds."""
    rng, key = ppo.step_rng(SEED, epoch)
    prompts = prompts_of(rng, batch_size)
    w1, c1, batch = timed(lambda: trainer.rollout(prompts, key))
    batch["scores"] = scores_of(epoch, batch_size)
    w2, c2, stats = timed(lambda: trainer.step(batch, rng))
    return dict(rollout=w1, update=w2, total=w1 + w2, cpu=c1 + c2), stats, batch


def torch_epoch(ref: TorchPPO, epoch: int, batch_size: int, batch=None):
    """One epoch of the reference; with ``batch`` (rollouts of ours) the update uses it instead
    of the reference's own rollouts."""
    rng, _ = ppo.step_rng(SEED, epoch)
    prompts = prompts_of(rng, batch_size)
    w1, c1, own = timed(lambda: ref.rollout(prompts, SEED * 100003 + epoch))
    batch = dict(batch or own)
    batch["scores"] = scores_of(epoch, batch_size)
    order = ppo.minibatch_order(rng, ref.s)
    w2, c2, stats = timed(lambda: ref.step(batch, order))
    return dict(rollout=w1, update=w2, total=w1 + w2, cpu=c1 + c2), stats


def main() -> None:
    """Build both sides, check they agree on a warm-up epoch, time alternating epochs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="timed epochs per side (default 5; 1 with --dry)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"rollouts per epoch (default {DEMO['batch']}; {DRY['batch']} with "
                        f"--dry), a multiple of the minibatch")
    parser.add_argument("--dry", action="store_true", help="tiny sizes (the test runs it)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch's threads (default: one per core)")
    args = parser.parse_args()
    sizes = dict(DRY if args.dry else DEMO)
    if args.batch:
        if args.batch % sizes["minibatch"]:
            parser.error(f"--batch {args.batch} is not a multiple of the minibatch "
                         f"{sizes['minibatch']}")
        sizes["batch"] = args.batch
    epochs = args.epochs or (1 if args.dry else 5)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.torch_threads or cores)
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}, {jax.device_count()} device), torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    print(f"GPT-2 policy: hidden {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, "
          f"{sizes['num_attention_heads']} heads, MLP {sizes['intermediate_size']}, vocab "
          f"{sizes['vocab']}; {sizes['batch']} rollouts of {sizes['prompt_length']} + "
          f"{sizes['new_tokens']} tokens, {sizes['passes']} passes in minibatches of "
          f"{sizes['minibatch']}", flush=True)
    transformers.utils.logging.disable_progress_bar()
    trainer, ref = build(sizes)
    n = sizes["batch"]

    # Warm-up: both update on our first rollouts (the same weights: the same computation).
    first_ours, stats_ours, batch = ours_epoch(trainer, 0, n)
    with torch.no_grad():  # before the reference's first update
        torch_logp, torch_values, _ = ref.forward(
            ref.lm, torch.from_numpy(batch["input_ids"]).long(),
            torch.from_numpy(batch["attention_mask"]).long())
    first_torch, stats_torch = torch_epoch(ref, 0, n, batch)
    logp, values = ours_initial(trainer, batch)
    real = batch["attention_mask"][:, trainer.prompt_length:].astype(bool)
    logp_diff = float(np.max(np.abs(logp - torch_logp.numpy())[real]))
    value_diff = float(np.max(np.abs(values - torch_values.numpy())[real]))
    stat_diff = max(abs(stats_ours[k] - stats_torch[k]) for k in STATS)
    print(f"first epoch on the same rollouts: logp differ by {logp_diff:.1e}, values by "
          f"{value_diff:.1e}; epoch statistics ours / torch:", flush=True)
    for k in STATS:
        print(f"  {k:<20} {stats_ours[k]:10.5f} {stats_torch[k]:10.5f}", flush=True)
    # A second warm-up epoch each (ours may compile again for its second step's inputs).
    second_ours = ours_epoch(trainer, 1, n)[0]
    second_torch = torch_epoch(ref, 1, n)[0]
    print(f"warm-up epochs 1 and 2: ours {first_ours['total']:.1f} s and "
          f"{second_ours['total']:.1f} s (compilation), torch {first_torch['total']:.1f} s and "
          f"{second_torch['total']:.1f} s", flush=True)

    times: dict[str, list[dict]] = {"ours": [], "torch": []}
    loads = [os.getloadavg()[0]]
    for epoch in range(1, epochs + 1):
        times["ours"].append(ours_epoch(trainer, epoch + 1, n)[0])
        times["torch"].append(torch_epoch(ref, epoch + 1, n)[0])
        loads.append(os.getloadavg()[0])
        print(f"timed epoch {epoch}/{epochs}: ours {times['ours'][-1]['total']:.2f} s, torch "
              f"{times['torch'][-1]['total']:.2f} s", flush=True)

    med = {side: {k: statistics.median(t[k] for t in ts) for k in ts[0]}
           for side, ts in times.items()}
    load = statistics.mean(loads)
    print()
    head = (f"{'per epoch (median)':<22} {'rollout s':>9} {'update s':>9} {'total s':>8} "
            f"{'CPU s':>7}")
    print(head)
    print("-" * len(head))
    for side, name in (("ours", "ours (lib.ppo)"), ("torch", "PyTorch + HF generate")):
        r = med[side]
        print(f"{name:<22} {r['rollout']:>9.3f} {r['update']:>9.3f} {r['total']:>8.3f} "
              f"{r['cpu']:>7.2f}")
    ratio = {k: med["torch"][k] / med["ours"][k] for k in med["ours"]}
    print(f"{'ratio torch / ours':<22} {ratio['rollout']:>9.2f} {ratio['update']:>9.2f} "
          f"{ratio['total']:>8.2f} {ratio['cpu']:>7.2f}")
    print(f"warm-up epochs (ours: compilation) {first_ours['total']:.1f} + "
          f"{second_ours['total']:.1f} s, torch {first_torch['total']:.1f} + "
          f"{second_torch['total']:.1f} s; {epochs} timed epochs per side; load average "
          f"{load:.1f} on {cores} cores while timing", flush=True)
    figures = {"mode": "dry" if args.dry else "demo", **sizes, "epochs": epochs,
               "cores": cores, "torch_threads": torch.get_num_threads(), "load": load,
               "logp_diff": logp_diff, "value_diff": value_diff,
               "stat_diff": stat_diff, "first_ours_s": first_ours["total"],
               "first_torch_s": first_torch["total"], "second_ours_s": second_ours["total"],
               "second_torch_s": second_torch["total"]}
    for side in med:
        figures.update({f"{k}_{side}_s": v for k, v in med[side].items()})
    figures.update({f"{k}_ratio": v for k, v in ratio.items()})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
