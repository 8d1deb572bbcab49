"""RLHF with PPO: a causal LM learns to write what a reward model scores high.

The policy is any decoder port (``model.path``: an HF directory, GPT-2 in the original) with a
value head; the reward is a text classifier (``reward.path``, an HF sequence-classification
directory: the probability of ``reward.label``, or the score of a one-label reward model).
Prompts are drawn from ``ppo.prompts``; ``lib.ppo`` has the algorithm and the loop.

Where a model path is empty the run makes it first, resumably, in its own sub-directory, from a
recipe ``"<config module>:<variant>"`` of another task: ``reward.recipe`` is trained in
``<workdir>/reward`` and exported (the demo: ``classification:ppo-reward``), ``model.recipe`` in
``<workdir>/policy`` (the demo: ``sft:reviews-lm``, a small GPT-2 pretrained on the reviews).

Modes: ``train`` (PPO), ``predict`` (a sampled continuation of each input prompt, with its
reward), ``export`` (the policy as an HF directory), and the human-feedback tools ``rate`` and
``rank`` (``lib.feedback``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from lib import cli, feedback, hf, models, ppo
from lib import config as config_lib
from lib import train as train_lib
from lib.errors import UserError
from tasks import base


def recipe_config(recipe: str, key: str) -> ml_collections.ConfigDict:
    """The config of ``"<module>:<variant>"`` (``configs/<module>.py``)."""
    module, _, variant = recipe.partition(":")
    try:
        get_config = importlib.import_module(f"configs.{module}").get_config
    except ModuleNotFoundError:
        raise UserError(f"config.{key}={recipe!r}: no configs/{module}.py") from None
    try:
        return get_config(variant or None)
    except ValueError as e:
        raise UserError(f"config.{key}={recipe!r}: {e}") from None


def prepare(recipe: str, key: str, workdir: Path) -> str:
    """The HF export of the model that ``recipe`` trains in ``workdir`` (trained and exported
    now unless an earlier run finished it)."""
    import tasks

    out = workdir / "export"
    if not (out / "config.json").is_file():
        cfg = recipe_config(recipe, key)
        cfg.workdir = str(workdir)
        print(f"--- {key}: training {recipe} in {workdir}", flush=True)
        task = tasks.create(cfg)
        task.run(workdir)
        model, tokenizer, step = train_lib.restore_model(task, workdir)
        cli.export(task, model, tokenizer, workdir)
        print(f"--- {key}: exported step {step} to {out}", flush=True)
    return str(out)


class ClassifierReward:
    """``(prompts, responses) -> scores``: a sequence classifier's probability of one label
    (or the raw score of a one-label reward model) for each prompt + response text."""

    def __init__(self, path: str, label: str, max_length: int, batch_size: int = 64):
        cfg = ml_collections.ConfigDict(dict(path=path, dtype="float32", remat=False,
                                             pooling="cls"))
        built = models.build(cfg, head="sequence_classification")
        self.model, self.tokenizer = built.model, built.tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        id2label = hf.read_config(path).get("id2label") or {}
        names = [str(v) for _, v in sorted((int(k), v) for k, v in id2label.items())]
        num_labels = int(built.config.num_labels)
        if num_labels == 1:
            self.label = None
        elif label in names:
            self.label = names.index(label)
        elif label.isdigit() and int(label) < num_labels:
            self.label = int(label)
        else:
            raise UserError(f"config.reward.label={label!r}: {path} has labels {names} "
                            f"(a name or an index below {num_labels})")
        self._logits = nnx.jit(lambda m, ids, mask: m(ids, mask))

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        texts = [p + r for p, r in zip(prompts, responses)]
        scores = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], max_length=self.max_length,
                                 truncation=True, padding="max_length", return_tensors="np")
            logits = np.asarray(self._logits(self.model, enc["input_ids"],
                                             enc["attention_mask"]))
            scores.append(logits[:, 0] if self.label is None
                          else np.asarray(jax.nn.softmax(logits, axis=-1))[:, self.label])
        return np.concatenate(scores).astype(np.float32)


class Task(base.Task):
    """PPO of a causal-LM policy against a classifier reward."""

    # No data files: prompts are in the config, rewards come from the reward model.
    RULES = {
        **{k: v for k, v in base.Task.RULES.items() if not k.startswith("data.")},
        "reward.path": config_lib.directory(),
        "ppo.batch_size": config_lib.at_least(1),
        "ppo.minibatch_size": config_lib.at_least(1),
        "ppo.epochs": config_lib.at_least(1),
        "ppo.max_new_tokens": config_lib.at_least(1),
        "ppo.prompt_length": config_lib.at_least(2),
        "ppo.clip_range": config_lib.above(0),
        "ppo.value_clip": config_lib.above(0),
        "ppo.value_weight": config_lib.at_least(0),
        "ppo.gamma": config_lib.interval(0, 1, high_open=False),
        "ppo.lam": config_lib.interval(0, 1, high_open=False),
        "ppo.init_kl_coef": config_lib.at_least(0),
        "ppo.kl_target": config_lib.at_least(0),
        "ppo.kl_horizon": config_lib.above(0),
        "reward.max_length": config_lib.at_least(2),
        "feedback.samples_per_prompt": config_lib.at_least(2),
    }

    def __init__(self, config):
        super().__init__(config)
        p = config.ppo
        if int(p.batch_size) % int(p.minibatch_size):
            raise UserError(f"config.ppo.batch_size={p.batch_size} must be a multiple of "
                            f"config.ppo.minibatch_size={p.minibatch_size}")
        if not list(p.prompts):
            raise UserError("config.ppo.prompts is empty: give the prompts to continue")

    def workdir(self) -> Path:
        """The run directory (recipes train in sub-directories of it)."""
        return Path(self.config.workdir or "workdirs/ppo")

    def model_path(self) -> str:
        """The policy's HF directory: ``model.path``, else the export of ``model.recipe``."""
        m = self.config.model
        if m.path:
            return m.path
        if not m.recipe:
            raise UserError("config.model.path is empty and so is config.model.recipe: give "
                            "the policy's HF directory")
        return prepare(m.recipe, "model.recipe", self.workdir() / "policy")

    def reward(self) -> ClassifierReward:
        """The reward: ``reward.path``, else the export of ``reward.recipe``."""
        r = self.config.reward
        path = r.path or (r.recipe and prepare(r.recipe, "reward.recipe",
                                               self.workdir() / "reward"))
        if not path:
            raise UserError("config.reward.path and config.reward.recipe are empty: give a "
                            "classifier's HF directory")
        return ClassifierReward(path, str(r.label), int(r.max_length))

    def build(self):
        """``(PolicyWithValue, tokenizer)`` of the policy (LoRA when ``model.lora.rank``)."""
        model_cfg = self.config.model.copy_and_resolve_references()
        model_cfg.path = self.model_path()
        self.built = models.build(model_cfg, head="causal_lm", seed=int(self.config.train.seed))
        model = ppo.PolicyWithValue(self.built.model, rngs=nnx.Rngs(int(self.config.train.seed)))
        return model, self.built.tokenizer

    def trainable(self):
        """The policy's trained parameters (``model`` decides: all, or the LoRA adapters) and
        the value head, always."""
        return nnx.Any(super().trainable(), nnx.PathContains("value_head"))

    def run(self, workdir):
        """PPO (``lib.ppo.train``); returns the last step's statistics."""
        reward = self.reward()
        model, tokenizer = self.build()
        trainer = ppo.Trainer(self.config, model, tokenizer, self.trainable())
        prompts = list(self.config.ppo.prompts)
        stats = ppo.train(self.config, workdir, trainer, prompts, reward)
        print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in stats.items()), flush=True)
        # The same prompts and sampling key before (the reference) and after PPO: the mean
        # reward of 256 samples, and the first 8.
        p = self.config.ppo
        key = jax.random.key(int(self.config.train.seed) + 1)
        asked = (prompts * 256)[:256]
        for name, lm in (("before", trainer.policy(reference=True)),
                         ("after", trainer.policy())):
            texts = ppo.rollout(lm, trainer.tokenizer, asked, key, int(p.prompt_length),
                                int(p.max_new_tokens))["responses"]
            scores = reward(asked, texts)
            stats[f"reward_{name}"] = float(np.mean(scores))
            print(f"samples {name} PPO (mean reward of {len(asked)}: {np.mean(scores):.4f}):",
                  flush=True)
            for prompt, text, score in list(zip(asked, texts, scores))[:8]:
                print(f"  {score:.3f}  {prompt}|{text}", flush=True)
        return stats

    # --- human feedback (lib.feedback) -----------------------------------------------------

    def tools(self):
        """``--mode=rate`` and ``--mode=rank``."""
        return {"rate": self.rate, "rank": self.rank}

    def resumed_trainer(self, workdir: Path) -> tuple[ppo.Trainer, Any]:
        """The trainer at the run's latest checkpoint (or the start), and the checkpoints."""
        model, tokenizer = self.build()
        trainer = ppo.Trainer(self.config, model, tokenizer, self.trainable())
        ckpt = train_lib.checkpoints(self.config, workdir)
        step = ckpt.latest_step()
        if step is not None:
            trainer.restore(ckpt, step)
            print(f"policy of {ckpt.directory}/{step}", flush=True)
        return trainer, ckpt

    def rate(self, workdir: Path) -> None:
        """The rating loop: a person's reward for each sample, one PPO step per rating."""
        p = self.config.ppo
        if int(p.batch_size) != 1 or int(p.minibatch_size) != 1:
            raise UserError("--mode=rate makes one PPO step per rated sample: set "
                            "config.ppo.batch_size=1 and ppo.minibatch_size=1 "
                            "(configs/ppo.py:human does)")
        trainer, ckpt = self.resumed_trainer(workdir)
        try:
            feedback.rate(trainer, list(p.prompts), workdir / self.config.feedback.ratings_file,
                          lambda: ckpt.save(trainer.step_no, trainer.items()),
                          int(self.config.train.seed))
        finally:
            ckpt.close()

    def rank(self, workdir: Path) -> None:
        """The ranking tool: order samples of each prompt; the lists feed the reward model."""
        trainer, ckpt = self.resumed_trainer(workdir)
        ckpt.close()
        p, f = self.config.ppo, self.config.feedback
        lm, tok = trainer.policy(), trainer.tokenizer

        def sample(prompts, key):
            return ppo.rollout(lm, tok, prompts, key, int(p.prompt_length),
                               int(p.max_new_tokens))["responses"]

        feedback.rank(sample, list(p.prompts), Path(f.rank_file), int(f.samples_per_prompt),
                      int(self.config.train.seed))

    def predict(self, model, tokenizer, inputs: list[str]) -> list[dict]:
        """A sampled continuation of each prompt by the trained policy, and its reward."""
        p = self.config.ppo
        out = ppo.rollout(model.lm, tokenizer, inputs, jax.random.key(int(self.config.train.seed)),
                          int(p.prompt_length), int(p.max_new_tokens))
        scores = self.reward()(inputs, out["responses"])
        return [{"prompt": t, "response": r, "reward": round(float(s), 4)}
                for t, r, s in zip(inputs, out["responses"], scores)]

    def export(self, model, tokenizer, out_dir: str) -> None:
        """The trained policy as an HF directory (a PEFT adapter for a LoRA run)."""
        models.export(self.built, model.lm, out_dir, self.config.model)
