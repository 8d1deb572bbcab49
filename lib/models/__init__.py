"""The model registry: HF ``model_type`` -> port, and ``build`` / ``export`` for every task.

A port is a module of ``lib.models`` with a ``PORT`` (a ``Port``): how to read its HF config
and weights, create it from scratch, export it, load its tokenizer, and name its modules the
HF way (for LoRA targets and PEFT adapters). Tasks never name a family: they call
``build(config.model, head=...)`` and get the model, its tokenizer and what to train, with LoRA
(``model.lora.rank > 0``) or a p-tuning v2 prefix (``model.prefix.length > 0``) applied through
the port. Adding a port is one module and one line in ``PORTS`` (see docs/add-a-port.md).

The interfaces the trainer, ``lib.generate`` and the tasks rely on are the protocols below.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
from flax import nnx

from lib.errors import UserError

# HF config.json model_type -> the module of lib.models that ports it.
PORTS = {
    "bert": "bert",
    "ernie": "bert",
    "qwen2": "qwen2",
    "llama": "llama",
    "glm": "glm",
    "chatglm": "glm",
    "gpt2": "gpt2",
    "t5": "t5",
    "mt5": "t5",
    "pegasus": "pegasus",
}
HEADS = ("causal_lm", "sequence_classification", "masked_lm", "encoder", "reward", "uie",
         "seq2seq_lm")


class DecoderLM(Protocol):
    """A causal LM (every decoder port; ``lib.models.decoder.CausalLM``)."""

    config: Any

    def init_cache(self, batch: int, slots: int, dtype=None) -> Any:
        """An empty KV cache (``lib.models.layers.KVCache``) of ``slots`` positions."""

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None, cache: Any = None, *, prefix: Any = None,
        rngs: nnx.Rngs | None = None, logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """``(logits [b, t | k, vocab] fp32, cache)``: causal and padding-masked without a
        cache; with one the tokens are appended after its filled slots."""


class Seq2SeqLM(Protocol):
    """An encoder-decoder LM (T5/mT5, Pegasus): the encoder runs once per input, the decoder
    step takes its output, a self-attention cache and cross-attention keys/values."""

    config: Any

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Encoder states ``[b, s, hidden]``."""

    def init_cache(self, encoded: jax.Array, attention_mask: jax.Array, slots: int, *,
                   copies: int = 1) -> Any:
        """A decoder cache of ``slots`` positions for ``copies`` rows per input (its beams or
        samples) holding the cross-attention keys/values, once per input."""

    def decode(self, decoder_input_ids: jax.Array, cache: Any, *,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Any]:
        """``(logits [b, t, vocab] fp32, cache)`` of the next decoder tokens."""


@dataclasses.dataclass(frozen=True)
class Port:
    """What the registry needs of a model family. ``load(model_dir, head, *, dtype, remat,
    num_labels, pooling) -> (model, cfg)``; ``create(cfg, head, rngs) -> model``;
    ``scratch_config(model_cfg, tokenizer, *, num_labels, max_length) -> cfg`` (sizes from
    ``config.model``); ``export(model, cfg, out_dir, tokenizer)``; ``tokenizer(model_dir)``.
    ``names`` converts our module paths to the HF ones where they differ (``NameMap``);
    ``peft_config`` adds ``adapter_config.json`` entries; ``peft_adapter`` writes an adapter
    in another naming than the model's (ChatGLM's fused ``query_key_value``);
    ``peft_head(head, cfg, base_config) -> lora.PeftHead`` says what a LoRA model of a head is
    in PEFT (task type, HF module paths, the head layers trained whole beside the adapters)."""

    name: str
    heads: tuple[str, ...]
    load: Callable[..., tuple[nnx.Module, Any]]
    create: Callable[..., nnx.Module]
    scratch_config: Callable[..., Any]
    export: Callable[..., Path]
    tokenizer: Callable[[str], Any]
    names: Any = None
    peft_config: dict = dataclasses.field(default_factory=dict)
    peft_adapter: Callable | None = None
    peft_head: Callable[..., Any] | None = None

    def hf_name(self, path: str) -> str:
        """The HF module path of one of our module paths."""
        return (self.names.convert(path, "theirs") if self.names else None) or path


def port(model_type: str) -> Port:
    """The port of an HF ``model_type`` (``config.json``) or of a scratch ``model.family``."""
    if model_type not in PORTS:
        raise UserError(f"model type {model_type!r} has no port; known: {', '.join(PORTS)}")
    module = importlib.import_module(f"lib.models.{PORTS[model_type]}")
    return module.PORT


def port_of_dir(model_dir: str | os.PathLike) -> Port:
    """The port of an HF checkpoint directory, from its ``config.json``'s ``model_type``."""
    from lib import hf

    model_type = hf.read_config(model_dir).get("model_type")
    if model_type not in PORTS:
        raise UserError(f"{model_dir}/config.json has model_type {model_type!r}; the ports "
                        f"read {', '.join(PORTS)} (check config.model.path)")
    return port(model_type)


class Built(NamedTuple):
    """What ``build`` returns: the model, its tokenizer, the NNX filter of what the optimizer
    trains (``nnx.Param``, ``LoRAParam`` or ``PrefixParam``), the port's model config, the
    port itself and the head it was built with."""

    model: nnx.Module
    tokenizer: Any
    trainable: Any
    config: Any
    port: Port
    head: str = ""


def build(
    model_cfg, *, head: str, tokenizer: Any = None, seed: int = 0,
    num_labels: int | None = None, max_length: int | None = None,
) -> Built:
    """The model a task trains, from ``config.model``.

    ``model.path`` set: the HF checkpoint there (the port from its ``config.json``; its own
    tokenizer). Empty: a scratch model of ``model.family`` with the sizes of ``config.model``
    (HF names: ``hidden_size``, ``num_hidden_layers``, ...) and the given ``tokenizer`` (a
    vocabulary the task built). ``head`` is ``causal_lm``, ``sequence_classification``
    (``num_labels``), ``masked_lm``, ``encoder`` (the bare encoder: sentence vectors),
    ``reward`` (one score per text), ``uie`` (start/end pointers per token) or
    ``seq2seq_lm`` (an encoder-decoder: T5, mT5, Pegasus).
    Then LoRA adapters (``model.lora.rank > 0``, targets by our or HF module names) or a
    learned prefix (``model.prefix.length > 0``) are added.
    """
    if head not in HEADS:
        raise UserError(f"model head {head!r}: choose one of {HEADS}")
    options = dict(num_labels=num_labels, pooling=model_cfg.get("pooling", "cls"))
    if not model_cfg.path and tokenizer is None:
        raise UserError("a scratch model needs the task's vocabulary (config.model.path is "
                        "empty)")
    the_port = port_of_dir(model_cfg.path) if model_cfg.path else port(
        model_cfg.get("family", "qwen2"))
    if head not in the_port.heads:
        raise UserError(f"a {head} head needs a model with one; {the_port.name} models have "
                        f"{the_port.heads} (check config.model.path / config.model.family)")
    if model_cfg.path:
        model, cfg = the_port.load(model_cfg.path, head, dtype=model_cfg.dtype,
                                   remat=bool(model_cfg.remat), **options)
        tokenizer = the_port.tokenizer(model_cfg.path)
    else:
        cfg = the_port.scratch_config(model_cfg, tokenizer, max_length=max_length, **options)
        model = the_port.create(cfg, head, nnx.Rngs(seed))
    trainable = trainable_of(model_cfg)
    if trainable is not nnx.Param:
        from lib.models import lora, prefix

        if trainable is lora.LoRAParam:
            lc = model_cfg.lora
            how = lora_export(lc)  # a misspelt choice fails now, not after training
            spec = _peft_head(the_port, head, cfg, model_cfg)
            if spec is not None and how == "adapter" and spec.unsupported:
                raise UserError(spec.unsupported)
            lora.apply_lora(model, tuple(lc.targets), int(lc.rank), float(lc.alpha),
                            float(lc.dropout), nnx.Rngs(seed + 1), names=the_port.names)
            if spec is not None:
                lora.train_whole(model, spec.trained)  # the task head learns beside them
        else:
            if head != "causal_lm":
                raise UserError("p-tuning v2 (config.model.prefix) needs a causal_lm head, "
                                f"not {head}")
            pc = model_cfg.prefix
            model = prefix.PrefixLM.create(
                model, int(pc.length), rngs=nnx.Rngs(seed + 2),
                prefix_projection=bool(pc.projection), hidden_size=int(pc.hidden_size) or None,
                dropout=float(pc.dropout),
            )
    return Built(model, tokenizer, trainable, cfg, the_port, head)


def _peft_head(the_port: Port, head: str, cfg, model_cfg):
    """The port's ``lora.PeftHead`` of ``head`` (None: the port has none; its adapters are
    the decoders' kind, described by ``peft_config``)."""
    if the_port.peft_head is None:
        return None
    from lib import hf

    base = hf.read_config(model_cfg.path) if model_cfg.path else None
    return the_port.peft_head(head, cfg, base)


def trainable_of(model_cfg) -> Any:
    """The NNX filter of what a run of ``config.model`` trains: the LoRA adapters
    (``model.lora.rank > 0``), the p-tuning v2 prefix (``model.prefix.length > 0``) or every
    parameter."""
    lora_cfg, prefix_cfg = model_cfg.get("lora"), model_cfg.get("prefix")
    use_lora = lora_cfg is not None and int(lora_cfg.rank) > 0
    use_prefix = prefix_cfg is not None and int(prefix_cfg.length) > 0
    if use_lora and use_prefix:
        raise UserError("config.model.prefix.length > 0 and config.model.lora.rank > 0: "
                        "choose p-tuning v2 or LoRA")
    if use_lora:
        from lib.models import lora

        return lora.LoRAParam
    if use_prefix:
        from lib.models import prefix

        return prefix.PrefixParam
    return nnx.Param


def lora_export(lora_cfg) -> str:
    """``model.lora.export``: "adapter" (the default) or "merged"."""
    how = lora_cfg.get("export", "adapter")
    if how not in ("adapter", "merged"):
        raise UserError(f"config.model.lora.export must be 'adapter' or 'merged', got {how!r}")
    return how


def export(built: Built, model: nnx.Module, out_dir: str | os.PathLike, model_cfg) -> Path:
    """Write a trained ``model`` (built by ``build``) as an HF directory.

    A LoRA run writes, as ``model.lora.export`` says, a PEFT adapter for the base
    (``model.hub_id``, else ``model.path``; in the base's HF module names) or the base with the
    adapters merged in. A p-tuning run writes the base model plus its learned prefix encoder
    (``prefix_encoder.safetensors``, ChatGLM's ``transformer.prefix_encoder.*`` names).
    """
    from lib import hf
    from lib.models import lora, prefix

    out = Path(out_dir)
    if built.trainable is lora.LoRAParam:
        if lora_export(model_cfg.lora) == "adapter":
            base = hf.read_config(model_cfg.path) if model_cfg.path else None
            return lora.export_peft(model, out, model_cfg.get("hub_id") or model_cfg.path,
                                    targets=tuple(model_cfg.lora.targets), base_config=base,
                                    port=built.port,
                                    head=_peft_head(built.port, built.head, built.config,
                                                    model_cfg))
        model = lora.merge_lora(model)
    if built.trainable is prefix.PrefixParam:
        state = hf.state_of(model.prefix_encoder)
        out.mkdir(parents=True, exist_ok=True)
        hf.write_safetensors({f"transformer.prefix_encoder.{k}": v for k, v in state.items()},
                             out / "prefix_encoder.safetensors")
        model = model.base
    return built.port.export(model, built.config, out, built.tokenizer)


# ----------------------------------------------------------------------------- decoder ports


def causal_lm_port(
    name: str, model_cls, *, load: Callable | None = None, export: Callable | None = None,
    tokenizer: Callable | None = None, scratch: Callable | None = None, **extra: Any,
) -> Port:
    """The ``Port`` of a decoder family (``model_cls``, a ``decoder.CausalLM``): loading by
    ``load(model_dir, dtype=..., remat=...)``, scratch configs from ``config.model`` (plus the
    fields ``scratch(config.model)`` returns)."""
    from lib.models import decoder
    from lib.tokenizer import load_lm_tokenizer

    def load_head(model_dir, head, *, dtype, remat, num_labels=None, pooling=None):
        return (load or _generic_load(model_cls))(model_dir, dtype=dtype, remat=remat)

    def scratch_config(model_cfg, tok, *, max_length=None, num_labels=None, pooling=None):
        fields = scratch(model_cfg) if scratch else {}
        return decoder.scratch(model_cls.config_class, model_cfg, tok, max_length=max_length,
                               **fields)

    return Port(
        name=name, heads=("causal_lm",), load=load_head,
        create=lambda cfg, head, rngs: model_cls(cfg, rngs=rngs),
        scratch_config=scratch_config, export=export or decoder.export_pretrained,
        tokenizer=tokenizer or load_lm_tokenizer, **extra,
    )


def _generic_load(model_cls):
    from lib.models import decoder

    return lambda model_dir, **kw: decoder.load_pretrained(model_cls, model_dir, **kw)
