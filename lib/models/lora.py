"""LoRA: low-rank adapters on the Linear layers of any port, trained while the base is frozen.

``apply_lora`` swaps matching ``nnx.Linear`` submodules for ``LoRALinear``, which keeps the
original layer as ``base`` (plain ``nnx.Param``) and adds ``lora_a [in, r]`` and
``lora_b [r, out]`` as ``LoRAParam``:

    y = base(x) + dropout(x) @ lora_a @ lora_b * alpha / r

``LoRAParam`` is its own Variable type, so ``trainable=LoRAParam`` as an NNX filter hands only
the adapters to the optimizer (``lib.train.init_state``); everything else travels as frozen.
A task head the base lacks (a classifier, UIE's pointers) is trained whole beside them:
``train_whole`` makes its parameters ``HeadParam``, a ``LoRAParam`` subclass, and PEFT export
writes them as ``modules_to_save`` (which layers, and the PEFT ``task_type``, come from the
port's ``peft_head``: a ``PeftHead``).

Two ways out: ``merge_lora`` folds the adapters into the base kernels and puts the plain
Linear back (parameter paths and HF names are those of the original model again, so the
family's ``export_pretrained`` works unchanged); ``export_peft`` writes an adapter directory
that ``peft.PeftModel.from_pretrained`` loads onto the HF PyTorch model, named after the HF
module tree of the model's port (``lib.models``: GPT-2's ``c_attn``, ChatGLM2/3's fused
``query_key_value``).

Dropout on the adapter input follows the project's rule: an ``nnx.Rngs`` passed at call time
(``LoRALinear(x, rngs=rngs)``), None meaning deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import hf
from lib.errors import UserError
from lib.models import layers

GraphPath = tuple  # an NNX graph path such as ('model', 'layers', 0, 'self_attn', 'q_proj')

# Target names of other checkpoints' module trees that our ports split or rename.
_TARGET_HINTS = {
    "query_key_value": "ChatGLM's fused query_key_value is split into q_proj, k_proj, v_proj "
    "by lib.models.glm: target those (export_peft fuses them back for a ChatGLM base)",
}


class LoRAParam(nnx.Param):
    """What a LoRA run trains: an adapter matrix, or (``HeadParam``) a head trained whole."""


class HeadParam(LoRAParam):
    """A parameter of a layer that a LoRA run trains whole beside the adapters: a task head
    the base checkpoint lacks (a classifier, UIE's pointers, a two-tower head). PEFT calls
    such layers ``modules_to_save`` and stores their full weights with the adapter."""


@dataclasses.dataclass(frozen=True)
class PeftHead:
    """What a model of one head is as a PEFT model (a port's ``peft_head``)."""

    # PEFT's task_type, which picks the PeftModel class that loads the adapter (SEQ_CLS,
    # TOKEN_CLS, FEATURE_EXTRACTION, ...); None: the plain PeftModel.
    task_type: str | None
    # Our module paths of the head layers trained whole (HeadParam; PEFT's modules_to_save).
    trained: tuple[str, ...] = ()
    # Our module path -> its path in the HF class PEFT loads onto (ERNIE's "ernie." prefix).
    hf_path: Callable[[str], str] = str
    # The saved layers' tensors named in that HF class (``classifier.weight [out, in]``), from
    # the model; None: each trained Linear's own weight and bias under ``hf_path``.
    saved: Callable[[nnx.Module], dict[str, np.ndarray]] | None = None
    # Why no PEFT adapter can stand for this model (empty: one can); build fails with it when
    # config.model.lora.export is "adapter".
    unsupported: str = ""


class LoRALinear(nnx.Module):
    """An ``nnx.Linear`` (kept as ``base``) plus a low-rank update ``lora_a @ lora_b``.

    ``lora_a`` starts random (``init="kaiming"``: uniform(±1/sqrt(in)), PEFT's default;
    ``"gaussian"``: normal(0, 1/r)) and ``lora_b`` at zero, so the wrapped layer computes
    exactly what the base did until training moves ``lora_b``. The adapters carry the base
    kernel's logical axes (``lora_a`` its input axis, ``lora_b`` its output axis; the rank
    axis is replicated).
    """

    def __init__(
        self,
        base: nnx.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        rngs: nnx.Rngs,
        init: str = "kaiming",
    ):
        in_axis, out_axis = base.kernel.get_metadata().get("out_sharding") or (None, None)
        n_in, n_out = base.in_features, base.out_features
        if init == "kaiming":
            bound = 1.0 / np.sqrt(n_in)
            a = jax.random.uniform(rngs.params(), (n_in, rank), jnp.float32, -bound, bound)
        elif init == "gaussian":
            a = jax.random.normal(rngs.params(), (n_in, rank), jnp.float32) / rank
        else:
            raise UserError(f"LoRA init {init!r}: choose 'kaiming' or 'gaussian'")
        self.base = base
        self.lora_a = LoRAParam(a, out_sharding=(in_axis, None))
        b = jnp.zeros((rank, n_out), jnp.float32)
        self.lora_b = LoRAParam(b, out_sharding=(None, out_axis))
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout_rate = float(dropout)
        self.scale = self.alpha / rank

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``base(x)`` plus the scaled adapter path; dropout (on the adapter input only, as
        in PEFT) when ``rngs`` is given."""
        y = self.base(x)
        dtype = self.base.dtype or y.dtype
        h = layers.dropout(x, self.dropout_rate, rngs).astype(dtype)
        delta = (h @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return y + (delta * self.scale).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """``base.kernel + lora_a @ lora_b * scale`` in fp32 at full matmul precision."""
        delta = jnp.matmul(
            self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST
        )
        return self.base.kernel[...] + delta * self.scale


# ----------------------------------------------------------------------------- tree surgery


def _dotted(path: GraphPath) -> str:
    return ".".join(map(str, path))


def _child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _graph_path(dotted: str) -> GraphPath:
    return tuple(int(k) if k.isdigit() else k for k in dotted.split("."))


def _resolve(root: nnx.Module, path: GraphPath):
    node = root
    for key in path:
        node = _child(node, key)
    return node


def _set_child(root: nnx.Module, path: GraphPath, value: nnx.Module) -> None:
    parent = root
    for key in path[:-1]:
        parent = _child(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value  # an nnx.List entry
    else:
        setattr(parent, path[-1], value)


def _linears(model: nnx.Module) -> tuple[list[GraphPath], list[GraphPath]]:
    """``(plain Linear paths, LoRALinear paths)`` in tree order (layer 2 before layer 10); the
    ``base`` inside a LoRALinear is not a plain Linear of the model."""
    nodes = dict(nnx.iter_graph(model))
    plain, adapted = [], []
    for path, node in nodes.items():
        if isinstance(node, LoRALinear):
            adapted.append(path)
        elif isinstance(node, nnx.Linear) and not isinstance(nodes.get(path[:-1]), LoRALinear):
            plain.append(path)
    # Siblings' keys are all ints (an nnx.List) or all strings, so the tuples compare.
    return sorted(plain), sorted(adapted)


def _matches(pattern: str, dotted: str, names=None) -> bool:
    """A target is a module-name suffix (``q_proj``, ``self_attn.q_proj``), as in PEFT's
    ``target_modules`` list, or a regex that must match the whole dotted path; with a port's
    ``names`` (``lib.hf.NameMap``) it may also name the HF module (GPT-2's ``c_attn``)."""
    paths = [dotted]
    if names is not None and (theirs := names.convert(dotted, "theirs")):
        paths.append(theirs)
    for path in paths:
        if path == pattern or path.endswith("." + pattern):
            return True
        try:
            if re.fullmatch(pattern, path) is not None:
                return True
        except re.error:
            pass
    return False


def _no_match_error(
    pattern: str, plain: list[GraphPath], adapted: list[GraphPath], hf_names=None
) -> UserError:
    names = sorted({str(p[-1]) for p in plain})
    if hf_names is not None:
        names += sorted({(hf_names.convert(_dotted(p), "theirs") or "").rsplit(".", 1)[-1]
                         for p in plain} - {""})
    in_layers = [p for p in plain if any(isinstance(k, int) for k in p)] or plain
    example = f" (e.g. {_dotted(in_layers[0])})" if plain else ""
    msg = (
        f"LoRA target {pattern!r} matches no Linear layer of the model; its Linear layers are "
        f"named {names}{example}. A target is a module-name suffix ('q_proj') or a regex over "
        "the full dotted path"
    )
    if any(_matches(pattern, _dotted(p), hf_names) for p in adapted):
        msg += f"; {pattern!r} names layers that already have LoRA adapters"
    if pattern in _TARGET_HINTS:
        msg += f"; {_TARGET_HINTS[pattern]}"
    return UserError(msg + " (config.model.lora.targets)")


# ----------------------------------------------------------------------------- public API


def apply_lora(
    model: nnx.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float,
    rngs: nnx.Rngs,
    *,
    init: str = "kaiming",
    names=None,
) -> list[str]:
    """Replace every ``nnx.Linear`` whose path matches one of ``targets`` by a ``LoRALinear``,
    in place; return the replaced paths (dotted, in tree order).

    A target is a suffix of the dotted module path (``"q_proj"`` matches
    ``model.layers.3.self_attn.q_proj``) or a regex matched against the whole path, of our
    module names or, given the port's ``names``, of the HF ones. A target that matches nothing
    is a ``UserError`` naming it and the model's Linear names.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise UserError("LoRA needs at least one target module (config.model.lora.targets)")
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r} "
                        "(config.model.lora.rank)")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be > 0, got {alpha!r} (config.model.lora.alpha)")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r} "
                        "(config.model.lora.dropout)")
    plain, adapted = _linears(model)
    chosen: set[GraphPath] = set()
    for pattern in targets:
        hits = [p for p in plain if _matches(pattern, _dotted(p), names)]
        if not hits:
            raise _no_match_error(pattern, plain, adapted, names)
        chosen.update(hits)
    for path in sorted(chosen):
        wrapped = LoRALinear(_resolve(model, path), rank, alpha, dropout, rngs=rngs, init=init)
        _set_child(model, path, wrapped)
    return [_dotted(p) for p in sorted(chosen)]


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """The model's ``LoRALinear`` layers by dotted path, in tree order."""
    _, adapted = _linears(model)
    return {_dotted(p): _resolve(model, p) for p in adapted}


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel (``kernel += a @ b * alpha / r``) and put the
    plain Linear back, in place; returns ``model``.

    Afterwards the parameter paths are the original model's, so ``lib.hf.state_of`` and the
    family's ``export_pretrained`` work unchanged. Clone first (``nnx.clone``) to keep the
    adapter model.
    """
    _, adapted = _linears(model)
    for path in adapted:
        module: LoRALinear = _resolve(model, path)
        module.base.kernel.set_value(module.merged_kernel())
        _set_child(model, path, module.base)
    return model


def train_whole(model: nnx.Module, paths: Sequence[str]) -> None:
    """Make every parameter of the layers at dotted ``paths`` a ``HeadParam``, in place, so
    that a LoRA run (``trainable=LoRAParam``) trains them whole beside the adapters. A path
    that already holds adapters is a ``UserError``: a head is trained whole or adapted, and
    PEFT saves it whole."""
    adapted = {_dotted(p) for p in _linears(model)[1]}
    for dotted in paths:
        if dotted in adapted:
            raise UserError(
                f"LoRA target {dotted.rsplit('.', 1)[-1]!r} is the task head, which a LoRA run "
                "trains whole beside the adapters (PEFT's modules_to_save): target the "
                "encoder's layers instead (config.model.lora.targets)")
        module = _resolve(model, _graph_path(dotted))
        for sub, node in list(nnx.iter_graph(module)):
            if isinstance(node, nnx.Param) and not isinstance(node, LoRAParam):
                _set_child(module, sub, HeadParam(node.get_value(), **node.get_metadata()))


def _one(values: set, what: str):
    if len(values) != 1:
        raise UserError(
            f"PEFT export needs one LoRA {what} for every adapted layer, found {sorted(values)}"
        )
    return values.pop()


def _check_same(given, actual, what: str):
    if given is not None and given != actual:
        raise UserError(
            f"export_peft {what}={given!r} but the model's adapters were built with "
            f"{what}={actual!r}: pass the values given to apply_lora (or None)"
        )
    return actual


def _hf_adapter(
    model: nnx.Module, adapters: dict[str, LoRALinear], targets: Sequence[str] | None, port,
    head: PeftHead | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT tensors named after the HF module paths (the head's ``hf_path``, else the port's
    ``hf_name``; ours where they are the same) and the ``target_modules`` list."""
    if head is not None:
        hf_name = head.hf_path
    else:
        hf_name = port.hf_name if port is not None else (lambda path: path)
    names = port.names if port is not None else None
    target_modules = [hf_name(p) for p in adapters]
    if targets is not None:
        targets = [targets] if isinstance(targets, str) else list(targets)
        plain, adapted = _linears(model)
        every = [_dotted(p) for p in plain + adapted]
        selected = sorted(d for d in every if any(_matches(t, d, names) for t in targets))
        hf_leaves = {hf_name(p).rsplit(".", 1)[-1] for p in adapters}
        # PEFT matches plain names by the same suffix rule; anything else is listed exactly.
        if all(re.fullmatch(r"[\w.]+", t) for t in targets) and selected == sorted(adapters):
            plain_hf = all(t.rsplit(".", 1)[-1] in hf_leaves for t in targets)
            target_modules = sorted(set(targets)) if plain_hf else sorted(hf_leaves)
    tensors = {}
    for path, module in adapters.items():
        prefix = f"base_model.model.{hf_name(path)}"
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(module.lora_a[...], np.float32).T
        tensors[f"{prefix}.lora_B.weight"] = np.asarray(module.lora_b[...], np.float32).T
    return tensors, target_modules


def _saved_tensors(model: nnx.Module, head: PeftHead) -> dict[str, np.ndarray]:
    """The ``modules_to_save`` tensors of ``head``, in the HF class's names."""
    if head.saved is not None:
        return head.saved(model)
    out = {}
    for dotted in head.trained:
        layer = _resolve(model, _graph_path(dotted))
        out[f"{head.hf_path(dotted)}.weight"] = np.asarray(layer.kernel[...], np.float32).T
        out[f"{head.hf_path(dotted)}.bias"] = np.asarray(layer.bias[...], np.float32)
    return out


def export_peft(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str,
    targets: Sequence[str] | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    task_type: str = "CAUSAL_LM",
    *,
    base_config: dict | None = None,
    port=None,
    head: PeftHead | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for PEFT.

    ``PeftModel.from_pretrained(hf_model, out_dir)`` then computes what ``model`` computes.
    Tensors are named ``base_model.model.<HF module path>.lora_A.weight [r, in]`` and
    ``...lora_B.weight [out, r]``: the port's HF names (``port``, else the registry's port of
    ``base_config``; ours where no port renames). ``rank``/``alpha``/``dropout`` default to
    the adapters' own and must agree with them when given. ``targets`` (the patterns given to
    ``apply_lora``) become ``target_modules`` when they are plain names that select exactly the
    adapted layers; otherwise the adapted module paths are listed one by one, which PEFT
    matches exactly.

    ``base_config`` is the base checkpoint's ``config.json``. A port's ``peft_adapter`` may
    write another module tree than the model's: for a ChatGLM2/3 base, THUDM's fused
    ``query_key_value`` (``lib.models.chatglm.peft_adapter``); ``r`` and ``lora_alpha`` then
    grow by the same factor (3 for q/k/v), so ``lora_alpha / r`` is unchanged, and ``targets``
    is not used.

    ``head`` (the port's ``peft_head`` of the model's head) sets ``task_type``, the HF module
    paths and the layers trained whole: their weights are written as PEFT writes
    ``modules_to_save`` (``base_model.model.classifier.weight``), listed in
    ``modules_to_save``.
    """
    if head is not None and head.unsupported:
        raise UserError(head.unsupported)
    adapters = lora_modules(model)
    if not adapters:
        raise UserError("export_peft: the model has no LoRA adapters (apply_lora was not run)")
    rank = _check_same(rank, _one({m.rank for m in adapters.values()}, "rank"), "rank")
    alpha = _check_same(
        None if alpha is None else float(alpha),
        _one({m.alpha for m in adapters.values()}, "alpha"),
        "alpha",
    )
    dropout = _check_same(
        None if dropout is None else float(dropout),
        _one({m.dropout_rate for m in adapters.values()}, "dropout"),
        "dropout",
    )
    if port is None and base_config is not None:
        from lib import models

        if base_config.get("model_type") in models.PORTS:
            port = models.port(base_config["model_type"])
    fused = None
    if port is not None and port.peft_adapter is not None and base_config is not None:
        plain, adapted = _linears(model)
        linears = {_dotted(p): _resolve(model, p) for p in plain}
        linears.update({_dotted(p): _resolve(model, p).base for p in adapted})
        fused = port.peft_adapter(model, adapters, dict(sorted(linears.items())), base_config)
    if fused is not None:
        tensors, target_modules, width = fused
        rank, alpha = width, alpha * width / rank
    else:
        tensors, target_modules = _hf_adapter(model, adapters, targets, port, head)
    modules_to_save = None
    if head is not None:
        task_type = head.task_type
        saved = _saved_tensors(model, head)
        tensors.update({f"base_model.model.{k}": v for k, v in saved.items()})
        modules_to_save = sorted({k.rsplit(".", 1)[0] for k in saved}) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": modules_to_save,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        **(port.peft_config if port is not None else {}),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    hf.write_safetensors(tensors, out / "adapter_model.safetensors")
    return out
