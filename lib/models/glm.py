"""GLM (HF ``GlmForCausalLM``), also loading ChatGLM2-6B / ChatGLM3-6B: the shared decoder
(``lib.models.decoder``) with pre-norm blocks (RMSNorm), grouped-query attention with a bias on
q/k/v only, rotary embedding on the first ``partial_rotary_factor * head_dim`` features of each
head with *interleaved* pairs (features 2i, 2i+1), and a SwiGLU MLP whose fused
``gate_up_proj`` holds ``[gate | up]`` (gate first). The module tree has the HF ``glm`` names
(``model.layers.0.self_attn.q_proj``), so HF ``glm`` directories load by ``lib.hf``'s rule.

THUDM's ChatGLM2/3 checkpoints (``model_type: chatglm``) are the same network under other names;
``lib.models.chatglm`` reads them.

p-tuning v2 (``prefix``): learned keys/values ``[layers, b, N, kv, d]`` are put in front of every
layer's keys/values and are always attended. As in ChatGLM2's p-tuning, the prefix is used as
given (no rotary is applied to it) and does not shift the positions of the real tokens
(``lib.models.prefix`` holds the pytree and the learned ``PrefixEncoder`` / ``PrefixLM``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lib import hf
from lib.errors import UserError
from lib.models import causal_lm_port, decoder
from lib.models.prefix import Prefix  # noqa: F401 - the decoder's prefix type, for callers


@dataclasses.dataclass(frozen=True)
class GlmConfig(decoder.DecoderConfig, defaults=dict(
    vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
    num_attention_heads=32, num_key_value_heads=2, head_dim=128, rotary_interleaved=True,
    partial_rotary_factor=0.5, norm_eps=1e-5, attention_bias=True, mlp="gated_fused",
    max_position_embeddings=32768, pad_token_id=0, eos_token_id=2,
)):
    """A GLM decoder (defaults: ChatGLM2-6B)."""

    family = "GLM"

    @classmethod
    def from_hf(cls, hf_config: dict, **overrides: Any) -> GlmConfig:
        """From an HF ``config.json`` dict, ``model_type`` ``glm`` or ``chatglm`` (ChatGLM2/3)."""
        if hf_config.get("model_type") == "chatglm":
            from lib.models import chatglm

            return cls.with_overrides(chatglm.config_fields(hf_config), overrides)
        if hf_config.get("model_type") not in (None, "glm"):
            raise UserError(
                f"config.json has model_type {hf_config.get('model_type')!r}; lib.models.glm "
                "reads 'glm' (GlmForCausalLM) and 'chatglm' (ChatGLM2/3) checkpoints"
            )
        rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UserError(
                f"config.json rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                "supported: only the default rotary embedding is implemented"
            )
        try:
            fields = cls._glm_fields(hf_config, rope)
        except KeyError as e:
            raise UserError(f"config.json lacks the key {e.args[0]!r} of a GLM model") from None
        return cls.with_overrides(fields, overrides)

    @staticmethod
    def _glm_fields(hf_config: dict, rope: dict) -> dict:
        heads = hf_config["num_attention_heads"]
        return dict(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_hidden_layers=hf_config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
            head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
            partial_rotary_factor=rope.get(
                "partial_rotary_factor", hf_config.get("partial_rotary_factor", 0.5)
            ),
            rope_theta=rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
            norm_eps=hf_config.get("rms_norm_eps", 1e-5),
            attention_bias=hf_config.get("attention_bias", True),
            attention_dropout=hf_config.get("attention_dropout", 0.0),
            hidden_act=hf_config.get("hidden_act", "silu"),
            max_position_embeddings=hf_config.get("max_position_embeddings", 32768),
            tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
            pad_token_id=hf_config.get("pad_token_id"),
            eos_token_id=decoder.ids(hf_config.get("eos_token_id")),
            bos_token_id=hf_config.get("bos_token_id"),
        )

    def to_hf(self) -> dict:
        """HF ``glm`` ``config.json`` dict (readable by transformers 4.x and 5.x)."""
        return {
            "architectures": ["GlmForCausalLM"],
            "model_type": "glm",
            **{key: getattr(self, key) for key in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                "attention_dropout", "max_position_embeddings", "attention_bias",
                "tie_word_embeddings", "rope_theta", "partial_rotary_factor")},
            "rms_norm_eps": self.norm_eps,
            # 5.x reads rope_parameters, 4.x the two top-level keys.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            **decoder.hf_ids(self),
            "torch_dtype": "float32",
        }


class GlmForCausalLM(decoder.CausalLM):
    """HF ``GlmForCausalLM`` (the decoder interface: ``lib.models.decoder.CausalLM``)."""

    config_class = GlmConfig


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: str = "float32", **overrides: Any
) -> tuple[GlmForCausalLM, GlmConfig]:
    """Load an HF ``glm`` or ChatGLM2/3 directory: ``(model, config)``, fp32 params.

    The naming is detected from ``config.json``'s ``model_type``. ``overrides`` replace
    ``GlmConfig`` fields (e.g. ``remat=True``, ``attention_dropout=0.1``).
    """
    from lib.models import chatglm

    rename = chatglm.renamer(hf.read_config(model_dir))
    return decoder.load_pretrained(GlmForCausalLM, model_dir, dtype=dtype, hf_to_ours=rename,
                                   **overrides)


# A ChatGLM2/3 checkpoint is exported under the HF ``glm`` names too.
export_pretrained = decoder.export_pretrained


# The ChatGLM2/3 naming, where the tests and older callers look for it.
from lib.models.chatglm import (  # noqa: E402
    chatglm_multi_query,
    chatglm_to_ours,
    ours_to_chatglm,
    peft_adapter,
    tokenizer,
)

PORT = causal_lm_port("glm", GlmForCausalLM, load=load_pretrained, tokenizer=tokenizer,
                      peft_adapter=peft_adapter)

__all__ = ["GlmConfig", "GlmForCausalLM", "Prefix", "chatglm_multi_query", "chatglm_to_ours",
           "export_pretrained", "load_pretrained", "ours_to_chatglm"]
