"""GPT-2 (HF ``GPT2LMHeadModel``): the shared decoder with learned absolute positions,
LayerNorm, a fused ``c_attn`` (q | k | v), biases everywhere, a GELU MLP and a tied head.

``uer/gpt2-chinese-cluecorpussmall`` is this model with a BERT ``vocab.txt`` tokenizer
(``lib.tokenizer.BertLMTokenizer``: ``[CLS]`` starts a text, ``[SEP]`` ends it).

Names: HF's ``transformer.h.N.attn.c_attn`` is our ``model.layers.N.self_attn.qkv_proj`` and so
on (``NAMES``); HF stores these projections as ``Conv1D`` weights ``[in, out]``, the transpose of
a ``Linear``'s, which the conversion undoes. LoRA targets and PEFT adapters use HF's names
(``c_attn``), PEFT with ``fan_in_fan_out`` as it does for ``Conv1D``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from lib import hf
from lib.errors import UserError
from lib.models import causal_lm_port, decoder

NAMES = hf.NameMap(
    model={"transformer.wte": "model.embed_tokens", "transformer.wpe": "model.embed_positions",
           "transformer.ln_f": "model.norm", "lm_head": "lm_head"},
    stacks={"transformer.h.": ("model.layers.", {
        "ln_1": "input_layernorm", "attn.c_attn": "self_attn.qkv_proj",
        "attn.c_proj": "self_attn.o_proj", "ln_2": "post_attention_layernorm",
        "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"})},
)
_CONV1D = ("c_attn", "c_proj", "c_fc")
# config.json key -> our field.
_KEYS = {"vocab_size": "vocab_size", "n_embd": "hidden_size", "n_layer": "num_hidden_layers",
         "n_head": "num_attention_heads", "n_positions": "max_position_embeddings",
         "activation_function": "hidden_act", "layer_norm_epsilon": "norm_eps",
         "attn_pdrop": "attention_dropout", "resid_pdrop": "hidden_dropout",
         "embd_pdrop": "embedding_dropout", "initializer_range": "initializer_range",
         "tie_word_embeddings": "tie_word_embeddings", "bos_token_id": "bos_token_id",
         "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}
# Variants of HF's GPT-2 code that change the computation: (key, the value implemented).
_UNSUPPORTED = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                ("add_cross_attention", False))


@dataclasses.dataclass(frozen=True)
class Gpt2Config(decoder.DecoderConfig, defaults=dict(
    vocab_size=50257, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, position_embedding="learned", max_position_embeddings=1024,
    fused_qkv=True, attention_bias=True, o_bias=True, mlp="plain", mlp_bias=True,
    norm="layer", norm_eps=1e-5, hidden_act="gelu_new", tie_word_embeddings=True,
)):
    """A GPT-2 decoder; defaults are transformers' ``GPT2Config`` (GPT-2 small)."""

    family = "GPT-2"

    @classmethod
    def from_hf(cls, hf_config: dict, **overrides: Any) -> Gpt2Config:
        """From a GPT-2 ``config.json`` dict; ``overrides`` replace fields by our names."""
        for key, supported in _UNSUPPORTED:
            if hf_config.get(key, supported) != supported:
                raise UserError(f"GPT-2 config.json {key}={hf_config[key]!r} is not supported "
                                f"(only {key}={supported})")
        fields = decoder.hf_keys(hf_config, _KEYS)
        hidden = fields.get("hidden_size", cls.hidden_size)
        fields["intermediate_size"] = hf_config.get("n_inner") or 4 * hidden
        fields["eos_token_id"] = decoder.ids(fields.get("eos_token_id"))
        return cls.with_overrides(fields, overrides)

    def to_hf(self) -> dict:
        """The ``config.json`` transformers needs to rebuild this model (fp32 weights)."""
        if self.head_dim * self.num_attention_heads != self.hidden_size or (
            self.num_key_value_heads != self.num_attention_heads
        ):
            raise UserError("GPT-2 has hidden_size = heads x head_dim and no grouped heads")
        out = {key: getattr(self, ours) for key, ours in _KEYS.items()}
        out.update(decoder.hf_ids(self))
        return {**out, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_inner": self.intermediate_size, "torch_dtype": "float32"}


class Gpt2LMHeadModel(decoder.CausalLM):
    """HF ``GPT2LMHeadModel`` (the decoder interface: ``lib.models.decoder.CausalLM``)."""

    config_class = Gpt2Config


def _transpose_conv1d(state: hf.StateDict) -> hf.StateDict:
    """Conv1D ``[in, out]`` weights <-> Linear ``[out, in]`` (the same swap both ways)."""
    return {k: (np.asarray(v).T if k.endswith(".weight") and k.split(".")[-2] in _CONV1D
                else v) for k, v in state.items()}


def hf_to_ours(state: hf.StateDict, cfg: Gpt2Config) -> hf.StateDict:
    """HF GPT-2 keys (with or without the ``transformer.`` of ``GPT2LMHeadModel``) to ours;
    the causal-mask buffers of older checkpoints are dropped."""
    state = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
             for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return decoder.drop_tied_head(NAMES.state(_transpose_conv1d(state), "ours"), cfg)


def ours_to_hf(state: hf.StateDict) -> hf.StateDict:
    """Inverse of ``hf_to_ours`` (``GPT2LMHeadModel`` names, no buffers)."""
    return _transpose_conv1d(NAMES.state(state, "theirs"))


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: str = "float32", **overrides: Any
) -> tuple[Gpt2LMHeadModel, Gpt2Config]:
    """Load an HF GPT-2 directory: ``(model, cfg)`` with fp32 params and ``dtype`` compute."""
    return decoder.load_pretrained(Gpt2LMHeadModel, model_dir, dtype=dtype,
                                   hf_to_ours=hf_to_ours, **overrides)


def export_pretrained(model, cfg: Gpt2Config, out_dir: str | os.PathLike, tokenizer=None):
    """Write ``model`` as an HF ``GPT2LMHeadModel`` directory."""
    return decoder.export_pretrained(model, cfg, out_dir, tokenizer, ours_to_hf)


PORT = causal_lm_port(
    "gpt2", Gpt2LMHeadModel, load=load_pretrained, export=export_pretrained, names=NAMES,
    # PEFT's LoRA on a Conv1D: the adapters are Linear-shaped, the base weight transposed.
    peft_config={"fan_in_fan_out": True},
    # GPT-2 has no grouped heads: a scratch model has as many key/value heads as heads.
    scratch=lambda m: {"num_key_value_heads": int(m.num_attention_heads)},
)
