"""Pegasus (HF ``PegasusForConditionalGeneration``; ``IDEA-CCNL/Randeng-Pegasus-*``): the shared
encoder-decoder with fixed sinusoidal positions (HF's table: sines of the even features, then
cosines of the odd ones), token embeddings scaled by ``sqrt(d_model)`` when
``scale_embedding``, pre-LayerNorm blocks with a final LayerNorm per stack, biases on every
projection, scaled attention, a head tied to the shared embedding and ``final_logits_bias``.

Our module names are HF's (``model.encoder.layers.N.self_attn.q_proj``), so LoRA targets and
PEFT adapters use them as they are. The position tables are not parameters: a checkpoint that
stores them (transformers does) is checked against the formula and they are written back on
export.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from lib import hf
from lib.errors import UserError
from lib.models import seq2seq
from lib.models.layers import sinusoidal_table

# config.json key -> our field.
_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size",
         "encoder_ffn_dim": "intermediate_size", "encoder_layers": "num_encoder_layers",
         "decoder_layers": "num_decoder_layers", "encoder_attention_heads": "num_attention_heads",
         "max_position_embeddings": "max_position_embeddings",
         "activation_function": "hidden_act", "dropout": "hidden_dropout",
         "attention_dropout": "attention_dropout", "activation_dropout": "activation_dropout",
         "scale_embedding": "scale_embedding", "init_std": "initializer_range",
         "pad_token_id": "pad_token_id", "eos_token_id": "eos_token_id",
         "decoder_start_token_id": "decoder_start_token_id"}
# Encoder and decoder sizes that our one config holds once: (encoder key, decoder key).
_SAME = (("encoder_ffn_dim", "decoder_ffn_dim"),
         ("encoder_attention_heads", "decoder_attention_heads"))
_POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")
_SHARED = "model.shared.weight"


@dataclasses.dataclass(frozen=True)
class PegasusConfig(seq2seq.Seq2SeqConfig):
    """A Pegasus; defaults are transformers' ``PegasusConfig`` (pegasus-large)."""

    family = "Pegasus"

    vocab_size: int = 50265
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    num_attention_heads: int = 16
    positions: str = "sinusoidal"
    max_position_embeddings: int = 1024
    use_bias: bool = True
    mlp: str = "plain"
    hidden_act: str = "gelu"
    norm: str = "layer"
    norm_eps: float = 1e-5
    final_logits_bias: bool = True
    hidden_dropout: float = 0.1
    decoder_start_token_id: int | None = 0

    def to_hf(self) -> dict:
        """The ``config.json`` transformers needs to rebuild this model (fp32 weights)."""
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise UserError("Pegasus has d_model = heads x head_dim")
        out = {key: getattr(self, ours) for key, ours in _KEYS.items()}
        eos = self.eos_token_id
        out.update(
            architectures=["PegasusForConditionalGeneration"], model_type="pegasus",
            decoder_ffn_dim=self.intermediate_size,
            decoder_attention_heads=self.num_attention_heads,
            # transformers ties the encoder's and decoder's embeddings to the shared one only
            # when this is true; a separate head is untied on load because it is stored.
            tie_word_embeddings=True,
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
            is_encoder_decoder=True, torch_dtype="float32",
        )
        return out


def config_fields(hf_config: dict, state: hf.StateDict) -> dict:
    """Our config fields of a Pegasus ``config.json`` and its weights (which say whether the
    head is tied)."""
    for enc, dec in _SAME:
        if enc in hf_config and hf_config.get(dec, hf_config[enc]) != hf_config[enc]:
            raise UserError(f"Pegasus config.json {enc}={hf_config[enc]} and "
                            f"{dec}={hf_config[dec]}: the port needs them equal")
    fields = {ours: hf_config[key] for key, ours in _KEYS.items() if key in hf_config}
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = tuple(fields["eos_token_id"])
    fields["tie_word_embeddings"] = not seq2seq.stores_separate_head(
        state, "lm_head.weight", _SHARED)
    return fields


def hf_to_ours(state: hf.StateDict, cfg: PegasusConfig) -> hf.StateDict:
    """HF Pegasus keys to ours (the same names): stored copies of the shared embedding and
    a tied ``lm_head`` are dropped; stored position tables are checked and dropped."""
    state = dict(state)
    for alias in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        seq2seq.pop_alias(state, alias, _SHARED)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for key in _POSITIONS:
        if key in state:
            stored = np.asarray(state.pop(key), np.float32)
            expected = sinusoidal_table(stored.shape[0], cfg.hidden_size)
            if stored.shape != expected.shape or not np.allclose(stored, expected, atol=1e-5):
                raise UserError(f"{key} is not the sinusoidal table of Pegasus "
                                "(learned positions are not supported)")
    return state


def ours_to_hf(cfg: PegasusConfig):
    """Our state plus the position tables transformers stores."""
    table = sinusoidal_table(cfg.max_position_embeddings, cfg.hidden_size)
    return lambda state: {**state, **{key: table for key in _POSITIONS}}


class PegasusForConditionalGeneration(seq2seq.Seq2SeqLM):
    """HF ``PegasusForConditionalGeneration`` (the encoder-decoder interface:
    ``lib.models.seq2seq.Seq2SeqLM``)."""

    config_class = PegasusConfig


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: str = "float32", **overrides: Any
) -> tuple[PegasusForConditionalGeneration, PegasusConfig]:
    """Load an HF Pegasus directory: ``(model, cfg)`` with fp32 params and ``dtype`` compute."""
    return seq2seq.load_pretrained(PegasusForConditionalGeneration, model_dir, dtype=dtype,
                                   hf_to_ours=hf_to_ours, config_of=config_fields, **overrides)


def export_pretrained(model, cfg: PegasusConfig, out_dir: str | os.PathLike, tokenizer=None):
    """Write ``model`` as an HF ``PegasusForConditionalGeneration`` directory."""
    return seq2seq.export_pretrained(model, cfg, out_dir, tokenizer, ours_to_hf(cfg))


def scratch_config(model_cfg: Any, tokenizer: Any, max_length: int | None) -> PegasusConfig:
    """A scratch Pegasus sized by ``config.model`` (embeddings scaled as Randeng's)."""
    fields = seq2seq.scratch_fields(model_cfg, tokenizer, max_length)
    return PegasusConfig(scale_embedding=True, **fields)


PORT = seq2seq.seq2seq_port(
    "pegasus", PegasusForConditionalGeneration, load=load_pretrained, export=export_pretrained,
    scratch=scratch_config,
)
