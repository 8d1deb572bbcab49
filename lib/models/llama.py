"""Llama (HF ``LlamaForCausalLM``): the shared decoder with rotary halves, RMSNorm, SwiGLU and
optional biases; its weights carry the decoder's own names. Also the ``config.json`` reading
that Qwen2 (Llama with q/k/v biases) shares."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lib.errors import UserError
from lib.models import causal_lm_port, decoder

# config.json key -> our field, for the Llama-style configs (Llama, Qwen2, Mistral ...).
LLAMA_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "max_position_embeddings": "max_position_embeddings",
    "hidden_act": "hidden_act",
    "attention_dropout": "attention_dropout",
    "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}


def llama_fields(hf_config: dict, family: str) -> dict:
    """Our fields of a Llama-style ``config.json``; RoPE variants we do not implement are a
    UserError naming the key. Where config.json is silent, transformers' defaults apply."""
    if hf_config.get("rope_scaling") is not None:
        raise UserError(f"{family} config.json rope_scaling {hf_config['rope_scaling']!r}: "
                        "RoPE scaling is not implemented (set rope_scaling to null)")
    # transformers 5 writes rope_parameters; older releases write rope_theta.
    rope = hf_config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{family} config.json rope_parameters.rope_type {rope['rope_type']!r}: "
                        "only 'default' RoPE is implemented")
    fields = decoder.hf_keys(hf_config, LLAMA_KEYS)
    fields.setdefault("tie_word_embeddings", False)
    fields["rope_theta"] = float(rope.get("rope_theta", hf_config.get("rope_theta", 1e4)))
    fields["eos_token_id"] = decoder.ids(fields.get("eos_token_id"))
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = fields.get("num_attention_heads")
    return {k: v for k, v in fields.items() if v is not None or k.endswith("token_id")}


def llama_hf(cfg: decoder.DecoderConfig, **extra: Any) -> dict:
    """The Llama-style ``config.json`` of ``cfg`` (readable by transformers 4.x and 5.x)."""
    out = {key: getattr(cfg, ours) for key, ours in LLAMA_KEYS.items()}
    out.update(decoder.hf_ids(cfg))
    out.update(
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
        rope_theta=cfg.rope_theta, rope_scaling=None,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        use_cache=True, dtype="float32", torch_dtype="float32", **extra,
    )
    return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig(decoder.DecoderConfig, defaults=dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
)):
    """A Llama decoder; defaults are transformers' ``LlamaConfig`` (Llama-2-7B)."""

    family = "Llama"

    @classmethod
    def from_hf(cls, hf_config: dict, **overrides: Any) -> LlamaConfig:
        """From a ``config.json`` dict; ``overrides`` replace fields by our names."""
        if hf_config.get("pretraining_tp", 1) != 1:
            raise UserError("Llama config.json pretraining_tp must be 1 (it only changes how "
                            "the original sliced its matmuls; set it to 1)")
        fields = llama_fields(hf_config, cls.family)
        bias = bool(hf_config.get("attention_bias", False))
        fields.update(attention_bias=bias, o_bias=bias,
                      mlp_bias=bool(hf_config.get("mlp_bias", False)))
        return cls.with_overrides(fields, overrides)

    def to_hf(self) -> dict:
        """The ``config.json`` transformers needs to rebuild this model (fp32 weights)."""
        if self.attention_bias != self.o_bias:
            raise UserError("a Llama config.json has one attention_bias for q/k/v and o_proj")
        return llama_hf(self, architectures=["LlamaForCausalLM"], model_type="llama",
                        attention_bias=self.attention_bias, mlp_bias=self.mlp_bias,
                        pretraining_tp=1)


class LlamaForCausalLM(decoder.CausalLM):
    """HF ``LlamaForCausalLM`` (the decoder interface: ``lib.models.decoder.CausalLM``)."""

    config_class = LlamaConfig


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: str = "float32", **overrides: Any
) -> tuple[LlamaForCausalLM, LlamaConfig]:
    """Load an HF Llama directory: ``(model, cfg)`` with fp32 params and ``dtype`` compute."""
    return decoder.load_pretrained(LlamaForCausalLM, model_dir, dtype=dtype, **overrides)


export_pretrained = decoder.export_pretrained


PORT = causal_lm_port("llama", LlamaForCausalLM)
