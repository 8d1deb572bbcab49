"""THUDM's ChatGLM2-6B / ChatGLM3-6B checkpoints (``model_type: chatglm``): the GLM decoder
(``lib.models.glm``) under other names, read as data (their Python files are never imported).

    transformer.embedding.word_embeddings            model.embed_tokens
    transformer.encoder.layers.N.input_layernorm     model.layers.N.input_layernorm
    ...self_attention.query_key_value (fused q|k|v)   self_attn.{q,k,v}_proj
    ...self_attention.dense                           self_attn.o_proj
    ...post_attention_layernorm                       post_attention_layernorm
    ...mlp.dense_h_to_4h (fused gate|up)              mlp.gate_up_proj
    ...mlp.dense_4h_to_h                              mlp.down_proj
    transformer.encoder.final_layernorm               model.norm
    transformer.output_layer                          lm_head
    transformer.rotary_pos_emb.inv_freq               (buffer, dropped)

ChatGLM2 rotates half of each head (``RotaryEmbedding(kv_channels // 2)``) on interleaved pairs
with base ``10000 * rope_ratio``: exactly GLM's ``partial_rotary_factor = 0.5``. A fine-tuned
model is exported under the HF ``glm`` names; a LoRA adapter can be exported in THUDM's names
(``peft_adapter``).
"""

from __future__ import annotations

import numpy as np

from lib import hf
from lib.errors import UserError
from lib.models import decoder

NAMES = hf.NameMap(
    model={"transformer.embedding.word_embeddings": "model.embed_tokens",
           "transformer.encoder.final_layernorm": "model.norm",
           "transformer.output_layer": "lm_head"},
    stacks={"transformer.encoder.layers.": ("model.layers.", {
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
        "self_attention.dense": "self_attn.o_proj", "mlp.dense_h_to_4h": "mlp.gate_up_proj",
        "mlp.dense_4h_to_h": "mlp.down_proj"})},
)
_QKV = ("q_proj", "k_proj", "v_proj")
_FUSED = "self_attention.query_key_value"


def chatglm_multi_query(cfg: dict) -> bool:
    """Whether a ChatGLM2/3 ``config.json`` dict uses grouped (multi-query) attention, which
    also decides the row layout of its fused ``query_key_value``."""
    # Missing keys take the defaults of THUDM's ChatGLMConfig (released configs set them all).
    return bool(cfg.get("multi_query_attention", False))


def config_fields(cfg: dict) -> dict:
    """``GlmConfig`` fields of THUDM's ``config.json`` (``num_layers``, ``ffn_hidden_size``...)."""
    if "multi_query_group_num" not in cfg and "padded_vocab_size" not in cfg:
        raise UserError(
            "config.json is a first-generation ChatGLM-6B (no multi_query_group_num / "
            "padded_vocab_size): its 2-D positions and post-LN blocks are a different "
            "architecture; use a ChatGLM2-6B or ChatGLM3-6B checkpoint"
        )
    # Variants of the ChatGLM code that this port does not implement.
    for key, supported in (("rmsnorm", True), ("apply_residual_connection_post_layernorm", False),
                           ("post_layer_norm", True), ("add_bias_linear", False),
                           ("original_rope", True)):
        if cfg.get(key, supported) != supported:
            raise UserError(f"config.json {key}={cfg[key]!r} is not supported by "
                            f"lib.models.glm (ChatGLM2/3 use {key}={supported})")
    try:
        heads = cfg["num_attention_heads"]
        return dict(
            vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["ffn_hidden_size"], num_hidden_layers=cfg["num_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg["multi_query_group_num"] if chatglm_multi_query(cfg)
            else heads,
            head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
            partial_rotary_factor=0.5,
            # ChatGLM3-6B-32k stretches the rotary wavelengths by rope_ratio (50).
            rope_theta=10000.0 * cfg.get("rope_ratio", 1),
            norm_eps=cfg.get("layernorm_epsilon", 1e-5),
            attention_bias=bool(cfg.get("add_qkv_bias", False)),
            attention_dropout=cfg.get("attention_dropout", 0.0),
            max_position_embeddings=cfg.get("seq_length", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            pad_token_id=cfg.get("pad_token_id", 0),
            eos_token_id=decoder.ids(cfg.get("eos_token_id", 2)),
        )
    except KeyError as e:
        raise UserError(f"config.json lacks the key {e.args[0]!r} of a ChatGLM2/3 model") from None


def tokenizer(model_dir) -> object:
    """A ChatGLM2/3 directory's SentencePiece tokenizer, else the HF tokenizer of a ``glm``
    one."""
    from lib.tokenizer import load_lm_tokenizer

    if hf.read_config(model_dir).get("model_type") == "chatglm":
        from lib.chatglm_tokenizer import ChatGLMTokenizer

        return ChatGLMTokenizer.from_pretrained(model_dir)
    return load_lm_tokenizer(model_dir)


def renamer(hf_config: dict):
    """The ``hf_to_ours(state, cfg)`` of a checkpoint: ChatGLM's for ``model_type: chatglm``,
    else None (HF ``glm`` names are ours)."""
    if hf_config.get("model_type") != "chatglm":
        return None
    multi_query = chatglm_multi_query(hf_config)
    return lambda state, cfg: chatglm_to_ours(state, cfg, multi_query=multi_query)


def chatglm_to_ours(state: hf.StateDict, config, *, multi_query: bool = True) -> hf.StateDict:
    """Rename a ChatGLM2/3 state dict to our (HF ``glm``) names and split the fused qkv.

    ``query_key_value`` rows are ``[q (heads*d) | k (groups*d) | v (groups*d)]`` with
    multi-query attention (every released ChatGLM2/3), and per head ``[q_h | k_h | v_h]``
    without it (``multi_query=False``). Keys it does not know are passed through unchanged,
    so a strict load names them.
    """
    out: hf.StateDict = {}
    for name, value in state.items():
        if name == "transformer.rotary_pos_emb.inv_freq":
            continue
        layer, _, rest = name.partition(f".{_FUSED}.")
        if rest and layer.startswith("transformer.encoder.layers."):
            ours = "model.layers." + layer.rsplit(".", 1)[1]
            parts = _split_qkv(np.asarray(value), config, multi_query)
            out.update({f"{ours}.self_attn.{p}.{rest}": v for p, v in zip(_QKV, parts)})
        else:
            out[NAMES.convert(name, "ours") or name] = value
    return out


def ours_to_chatglm(state: hf.StateDict, config, *, multi_query: bool = True) -> hf.StateDict:
    """Inverse of ``chatglm_to_ours`` (the dropped ``inv_freq`` buffer is not recreated)."""
    out: hf.StateDict = {}
    fused: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, value in state.items():
        module, _, leaf = name.rpartition(".")
        parent, _, proj = module.rpartition(".")
        if proj in _QKV and parent.endswith(".self_attn") and parent.startswith("model.layers."):
            index = parent.split(".")[2]
            fused.setdefault((index, leaf), {})[proj] = np.asarray(value)
        else:
            out[NAMES.convert(name, "theirs") or name] = value
    for (index, leaf), parts in fused.items():
        out[f"transformer.encoder.layers.{index}.{_FUSED}.{leaf}"] = _join_qkv(
            [parts[p] for p in _QKV], config, multi_query
        )
    return out


def _split_qkv(value: np.ndarray, config, multi_query: bool) -> list[np.ndarray]:
    h, g, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if value.shape[0] != (h + 2 * g) * d:
        raise UserError(
            f"query_key_value has {value.shape[0]} rows, config.json implies (heads {h} + "
            f"2 * groups {g}) * kv_channels {d} = {(h + 2 * g) * d}"
        )
    if multi_query:
        return np.split(value, [h * d, (h + g) * d])
    per_head = value.reshape(h, 3, d, *value.shape[1:])
    return [per_head[:, i].reshape(h * d, *value.shape[1:]) for i in range(3)]


def _join_qkv(qkv: list[np.ndarray], config, multi_query: bool) -> np.ndarray:
    if multi_query:
        return np.concatenate(qkv, axis=0)
    h, d = config.num_attention_heads, config.head_dim
    parts = [a.reshape(h, 1, d, *a.shape[1:]) for a in qkv]
    return np.concatenate(parts, axis=1).reshape(3 * h * d, *qkv[0].shape[1:])


def peft_adapter(model, adapters: dict, linears: dict, base_config: dict):
    """PEFT tensors for THUDM's module tree, its ``target_modules`` and the common rank, for a
    ChatGLM2/3 base (``base_config``; None for another base).

    ``adapters``: our dotted module path -> ``LoRALinear``; ``linears``: every Linear (the base
    of an adapted one) by path. Adapters ``(a_q, b_q)``, ``(a_k, b_k)``, ``(a_v, b_v)`` of rank r
    on the split q/k/v are exactly one adapter of rank 3r on the fused ``query_key_value``: A
    stacks the three A's along the rank axis, B is block-diagonal (``b_q`` writes only the q
    rows, ...); a projection without an adapter is a zero block. The B blocks are fused by
    ``ours_to_chatglm``, which also renames every module, so the qkv row layout has one source
    of truth. Every module is zero-padded to the largest rank, which is exact, so that one
    ``r`` and ``lora_alpha`` hold for all of them. The fused adapter draws one dropout mask
    where ours draw three: the same function at inference, where the adapter is used.
    """
    from lib.models import glm

    if base_config.get("model_type") != "chatglm":
        return None  # an HF glm base: the model's own names
    if not isinstance(model, glm.GlmForCausalLM):
        raise UserError("a ChatGLM-named PEFT export needs a lib.models.glm model, got "
                        f"{type(model).__name__}: check config.model.path")
    multi_query = chatglm_multi_query(base_config)
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
        ((name, b_fused),) = ours_to_chatglm(b_parts, model.config, multi_query=multi_query).items()
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
