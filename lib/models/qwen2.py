"""Qwen2 / Qwen2.5 (HF ``Qwen2ForCausalLM``): the shared decoder (``lib.models.decoder``) as
Llama with biases on q/k/v. Its weights carry the decoder's own names; with tied embeddings
some checkpoints still store ``lm_head.weight``, which is dropped on load.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lib.errors import UserError
from lib.models import causal_lm_port, decoder
from lib.models.llama import llama_fields, llama_hf


@dataclasses.dataclass(frozen=True)
class Qwen2Config(decoder.DecoderConfig, defaults=dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
    tie_word_embeddings=True, max_position_embeddings=32768, attention_bias=True,
)):
    """A Qwen2 decoder; defaults are Qwen2.5-0.5B."""

    family = "Qwen2"

    @classmethod
    def from_hf(cls, hf_config: dict, **overrides: Any) -> Qwen2Config:
        """Build from an HF ``config.json`` dict; ``overrides`` replace fields by our names.

        Sliding-window keys are accepted when the window is off (as in every Qwen2.5
        release); features we do not implement raise a UserError naming the key.
        """
        if hf_config.get("use_sliding_window"):
            raise UserError(
                "Qwen2 config.json sets use_sliding_window: true; sliding-window attention is "
                "not implemented (set it to false to use full attention in every layer)"
            )
        layer_types = hf_config.get("layer_types") or []
        if any(kind != "full_attention" for kind in layer_types):
            raise UserError(
                f"Qwen2 config.json layer_types {sorted(set(layer_types))}: only "
                "'full_attention' is implemented"
            )
        return cls.with_overrides(llama_fields(hf_config, cls.family), overrides)

    def to_hf(self) -> dict:
        """The ``config.json`` dict transformers needs to rebuild this model (fp32 weights)."""
        return llama_hf(self, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                        use_sliding_window=False)


class Qwen2ForCausalLM(decoder.CausalLM):
    """HF ``Qwen2ForCausalLM`` (the decoder interface: ``lib.models.decoder.CausalLM``)."""

    config_class = Qwen2Config


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: str = "float32", **overrides: Any
) -> tuple[Qwen2ForCausalLM, Qwen2Config]:
    """Load an HF Qwen2 directory: ``(model, cfg)`` with fp32 params and ``dtype`` compute.

    ``overrides`` replace config fields by our names (e.g. ``remat=True``).
    """
    return decoder.load_pretrained(Qwen2ForCausalLM, model_dir, dtype=dtype, **overrides)


export_pretrained = decoder.export_pretrained


PORT = causal_lm_port("qwen2", Qwen2ForCausalLM)
