"""LoRA: low-rank adapters on the Linear layers of any port, trained while the base is frozen.

``apply_lora`` swaps matching ``nnx.Linear`` submodules for ``LoRALinear``, which keeps the
original layer as ``base`` (plain ``nnx.Param``) and adds ``lora_a [in, r]`` and
``lora_b [r, out]`` as ``LoRAParam``:

    y = base(x) + dropout(x) @ lora_a @ lora_b * alpha / r

``LoRAParam`` is its own Variable type, so ``trainable=LoRAParam`` as an NNX filter hands only
the adapters to the optimizer (``lib.train.init_state``); everything else travels as frozen.

Two ways out: ``merge_lora`` folds the adapters into the base kernels and puts the plain
Linear back (parameter paths and HF names are those of the original model again, so the
family's ``export_pretrained`` works unchanged); ``export_peft`` writes an adapter directory
that ``peft.PeftModel.from_pretrained`` loads onto the HF PyTorch model, named after our modules
(the HF names of Qwen2 and HF ``glm``) or, for a ChatGLM2/3 base, after THUDM's module tree with
the q/k/v adapters fused into one ``query_key_value`` adapter.

Dropout on the adapter input follows the project's rule: an ``nnx.Rngs`` passed at call time
(``LoRALinear(x, rngs=rngs)``), None meaning deterministic.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import hf
from lib.errors import UserError
from lib.models import glm, layers

GraphPath = tuple  # an NNX graph path such as ('model', 'layers', 0, 'self_attn', 'q_proj')

# Target names of other checkpoints' module trees that our ports split or rename.
_TARGET_HINTS = {
    "query_key_value": "ChatGLM's fused query_key_value is split into q_proj, k_proj, v_proj "
    "by lib.models.glm: target those (export_peft fuses them back for a ChatGLM base)",
}


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: the only Variable type a LoRA run trains."""


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


def _matches(pattern: str, dotted: str) -> bool:
    """A target is a module-name suffix (``q_proj``, ``self_attn.q_proj``), as in PEFT's
    ``target_modules`` list, or a regex that must match the whole dotted path."""
    if dotted == pattern or dotted.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, dotted) is not None
    except re.error:
        return False


def _no_match_error(pattern: str, plain: list[GraphPath], adapted: list[GraphPath]) -> UserError:
    names = sorted({str(p[-1]) for p in plain})
    in_layers = [p for p in plain if any(isinstance(k, int) for k in p)] or plain
    example = f" (e.g. {_dotted(in_layers[0])})" if plain else ""
    msg = (
        f"LoRA target {pattern!r} matches no Linear layer of the model; its Linear layers are "
        f"named {names}{example}. A target is a module-name suffix ('q_proj') or a regex over "
        "the full dotted path"
    )
    if any(_matches(pattern, _dotted(p)) for p in adapted):
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
) -> list[str]:
    """Replace every ``nnx.Linear`` whose path matches one of ``targets`` by a ``LoRALinear``,
    in place; return the replaced paths (dotted, in tree order).

    A target is a suffix of the dotted module path (``"q_proj"`` matches
    ``model.layers.3.self_attn.q_proj``) or a regex matched against the whole path. A target
    that matches nothing is a ``UserError`` naming it and the model's Linear names.
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
        hits = [p for p in plain if _matches(pattern, _dotted(p))]
        if not hits:
            raise _no_match_error(pattern, plain, adapted)
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
    model: nnx.Module, adapters: dict[str, LoRALinear], targets: Sequence[str] | None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT tensors named after our module paths and the ``target_modules`` list."""
    target_modules = list(adapters)
    if targets is not None:
        targets = [targets] if isinstance(targets, str) else list(targets)
        plain, adapted = _linears(model)
        every = [_dotted(p) for p in plain + adapted]
        selected = sorted(d for d in every if any(_matches(t, d) for t in targets))
        # PEFT matches plain names by the same suffix rule; anything else is listed exactly.
        if all(re.fullmatch(r"[\w.]+", t) for t in targets) and selected == sorted(adapters):
            target_modules = sorted(set(targets))
    tensors = {}
    for path, module in adapters.items():
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(module.lora_a[...], np.float32).T
        tensors[f"{prefix}.lora_B.weight"] = np.asarray(module.lora_b[...], np.float32).T
    return tensors, target_modules


_QKV = ("q_proj", "k_proj", "v_proj")


def _chatglm_adapter(
    model: nnx.Module, adapters: dict[str, LoRALinear], multi_query: bool
) -> tuple[dict[str, np.ndarray], list[str], int]:
    """PEFT tensors for THUDM's ChatGLM2/3 module tree, its ``target_modules`` and the rank.

    Adapters ``(a_q, b_q)``, ``(a_k, b_k)``, ``(a_v, b_v)`` of rank r on the split q/k/v are
    exactly one adapter of rank 3r on the fused ``query_key_value``: A stacks the three A's
    along the rank axis, B is block-diagonal (``b_q`` writes only the q rows, ...). A
    projection without an adapter is a zero block. The B blocks are fused by
    ``glm.ours_to_chatglm``, which also renames every module, so the qkv row layout (multi-query
    ``[q | k | v]`` or per head) has one source of truth. Every module is zero-padded to the
    largest rank, which is exact, so that one ``r`` and ``lora_alpha`` hold for all of them
    (simpler for PEFT than ``rank_pattern``/``alpha_pattern``, whose key matching has changed
    between PEFT versions). The fused adapter draws one dropout mask where ours draw three:
    the same function at inference, where the adapter is used.
    """
    if not isinstance(model, glm.GlmForCausalLM):
        raise UserError(
            "a ChatGLM-named PEFT export needs a lib.models.glm model, got "
            f"{type(model).__name__}: check config.model.path"
        )
    plain, adapted = _linears(model)
    linears = {}
    for path in plain + adapted:
        node = _resolve(model, path)
        linears[_dotted(path)] = node.base if isinstance(node, LoRALinear) else node
    members: dict[str, list[str]] = {}  # per ChatGLM Linear: our Linears that make it up
    for path in linears:
        parent, _, leaf = path.rpartition(".")
        if leaf in _QKV:
            members.setdefault(parent, [f"{parent}.{name}" for name in _QKV])
        else:
            members[path] = [path]
    width = max(sum(adapters[p].rank for p in group if p in adapters) for group in members.values())

    tensors, every, chosen = {}, set(), set()
    for group in members.values():
        is_adapted = any(p in adapters for p in group)
        a = np.zeros((width, linears[group[0]].in_features), np.float32)
        b_parts, offset = {}, 0
        for path in group:
            # Unadapted modules go through ours_to_chatglm too, with no columns: for the name.
            b = np.zeros((linears[path].out_features, width if is_adapted else 0), np.float32)
            if path in adapters:
                module, end = adapters[path], offset + adapters[path].rank
                a[offset:end] = np.asarray(module.lora_a[...], np.float32).T
                b[:, offset:end] = np.asarray(module.lora_b[...], np.float32).T
                offset = end
            b_parts[f"{path}.weight"] = b
        fused = glm.ours_to_chatglm(b_parts, model.config, multi_query=multi_query)
        ((name, b_fused),) = fused.items()
        name = name.removesuffix(".weight")
        every.add(name)
        if is_adapted:
            chosen.add(name)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b_fused
    # Module names when each names only adapted modules (PEFT's suffix rule), else full paths.
    leaves = {name.rsplit(".", 1)[-1] for name in chosen}
    if {name for name in every if name.rsplit(".", 1)[-1] in leaves} == chosen:
        return tensors, sorted(leaves), width
    return tensors, sorted(chosen), width


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
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for PEFT.

    ``PeftModel.from_pretrained(hf_model, out_dir)`` then computes what ``model`` computes.
    Tensors are named ``base_model.model.<module path>.lora_A.weight [r, in]`` and
    ``...lora_B.weight [out, r]``; our module paths are the HF module names for the ports that
    mirror HF (Qwen2, HF ``glm``). ``rank``/``alpha``/``dropout`` default to the adapters' own
    and must agree with them when given. ``targets`` (the patterns given to ``apply_lora``)
    become ``target_modules`` when they are plain names that select exactly the adapted
    layers; otherwise the adapted module paths are listed one by one, which PEFT matches
    exactly.

    ``base_config`` is the base checkpoint's ``config.json``. When it is a ChatGLM2/3 one
    (``model_type: chatglm``) the adapter is written for THUDM's module tree instead (see
    ``_chatglm_adapter``): ``r`` and ``lora_alpha`` grow by the same factor (3 for q/k/v), so
    the scaling ``lora_alpha / r`` is unchanged, and ``targets`` is not used.
    """
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
    if base_config is not None and base_config.get("model_type") == "chatglm":
        multi_query = glm.chatglm_multi_query(base_config)
        tensors, target_modules, width = _chatglm_adapter(model, adapters, multi_query)
        rank, alpha = width, alpha * width / rank
    else:
        tensors, target_modules = _hf_adapter(model, adapters, targets)
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
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    hf.write_safetensors(tensors, out / "adapter_model.safetensors")
    return out
