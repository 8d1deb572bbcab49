"""T5 (HF ``T5ForConditionalGeneration``, v1.0 and v1.1) and mT5 (``MT5ForConditionalGeneration``):
the shared encoder-decoder with relative position buckets, T5's RMS norm (no mean, no bias),
no bias anywhere and unscaled attention scores.

- v1.0 (``t5-small``, ``uer/t5-small-chinese-cluecorpussmall``): ReLU MLP, the LM head tied
  to the shared embedding, the decoder output multiplied by ``d_model**-0.5`` before it;
- v1.1 and mT5 (``imxly/t5-pegasus``): gated-GELU MLP (``wi_0``, ``wi_1``) and a separate
  head without the rescale.

A checkpoint has its own head when it stores an ``lm_head.weight`` that is not a copy of the
shared embedding (the rule transformers applies on load). T5 rescales when ``config.json``
says so (``scale_decoder_outputs``, else ``tie_word_embeddings``, default true); mT5 never
does. Both go through one port: ``model_type`` (``t5`` or ``mt5``) is kept for export.

Names: HF's ``encoder.block.N.layer.0.SelfAttention.q`` is our
``model.encoder.layers.N.self_attn.q_proj`` and so on (``NAMES``); the relative-position table
that HF keeps in block 0 of each stack is our ``model.encoder.relative_attention_bias``. LoRA
targets and PEFT adapters use HF's names (``q``, ``v``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lib import hf
from lib.errors import UserError
from lib.models import seq2seq


def _layer_names(cross: bool) -> dict[str, str]:
    """HF names inside block N -> ours; the decoder's block has the cross-attention as
    sub-layer 1, which moves its MLP to sub-layer 2."""
    ff = "layer.2" if cross else "layer.1"
    names = {"layer.0.layer_norm": "self_attn_layer_norm",
             f"{ff}.layer_norm": "final_layer_norm",
             f"{ff}.DenseReluDense.wi": "fc1", f"{ff}.DenseReluDense.wi_0": "fc1_0",
             f"{ff}.DenseReluDense.wi_1": "fc1_1", f"{ff}.DenseReluDense.wo": "fc2"}
    attentions = {"layer.0.SelfAttention": "self_attn"}
    if cross:
        names["layer.1.layer_norm"] = "encoder_attn_layer_norm"
        attentions["layer.1.EncDecAttention"] = "encoder_attn"
    for theirs, ours in attentions.items():
        for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            names[f"{theirs}.{a}"] = f"{ours}.{b}"
    return names


NAMES = hf.NameMap(
    model={"shared": "model.shared", "lm_head": "lm_head",
           "encoder.final_layer_norm": "model.encoder.layer_norm",
           "decoder.final_layer_norm": "model.decoder.layer_norm",
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias":
               "model.encoder.relative_attention_bias",
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias":
               "model.decoder.relative_attention_bias"},
    stacks={"encoder.block.": ("model.encoder.layers.", _layer_names(cross=False)),
            "decoder.block.": ("model.decoder.layers.", _layer_names(cross=True))},
)
# Stored by some checkpoints but unused by HF's model (it ignores it on load).
_UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
# config.json key -> our field.
_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "d_ff": "intermediate_size",
         "num_layers": "num_encoder_layers", "num_heads": "num_attention_heads",
         "d_kv": "head_dim", "relative_attention_num_buckets": "relative_attention_num_buckets",
         "relative_attention_max_distance": "relative_attention_max_distance",
         "layer_norm_epsilon": "norm_eps", "pad_token_id": "pad_token_id",
         "eos_token_id": "eos_token_id", "decoder_start_token_id": "decoder_start_token_id"}
_ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class T5Config(seq2seq.Seq2SeqConfig):
    """A T5 / mT5; defaults are transformers' ``T5Config`` (t5-small, v1.0)."""

    family = "T5"

    # "t5" or "mt5": the HF class an export is written as.
    model_type: str = "t5"
    scale_attention: bool = False
    scale_decoder_outputs: bool = True
    dropout_after_final_norm: bool = True
    head_dim: int | None = 64

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in _ARCHITECTURES:
            raise UserError(f"T5 model_type {self.model_type!r}: choose one of "
                            f"{tuple(_ARCHITECTURES)}")

    def to_hf(self) -> dict:
        """The ``config.json`` transformers needs to rebuild this model (fp32 weights)."""
        act = self.hidden_act
        if self.mlp == "gated":
            if act == "gelu":
                raise UserError("T5 config.json cannot express a gated exact GELU (HF's "
                                "'gated-gelu' is the tanh approximation, gelu_new)")
            act = "gated-" + ("gelu" if act == "gelu_new" else act)
        out = {key: getattr(self, ours) for key, ours in _KEYS.items()}
        eos = self.eos_token_id
        out.update(
            architectures=[_ARCHITECTURES[self.model_type]], model_type=self.model_type,
            num_decoder_layers=self.num_decoder_layers, feed_forward_proj=act,
            dropout_rate=self.hidden_dropout, tie_word_embeddings=self.tie_word_embeddings,
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
            is_encoder_decoder=True, torch_dtype="float32",
        )
        if self.model_type == "t5":
            out["scale_decoder_outputs"] = self.scale_decoder_outputs
        elif self.scale_decoder_outputs:
            raise UserError("mT5 does not rescale the decoder output (scale_decoder_outputs)")
        return out


def _activation(feed_forward_proj: str) -> tuple[str, str]:
    """``(mlp, hidden_act)`` of HF's ``feed_forward_proj`` ("relu", "gated-gelu", ...)."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UserError(f"T5 config.json feed_forward_proj {feed_forward_proj!r}: expected "
                        "'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')")
    act = parts[-1]
    if feed_forward_proj == "gated-gelu":
        act = "gelu_new"  # as transformers reads it
    return ("gated" if len(parts) == 2 else "plain"), act


def _embedding_key(state: hf.StateDict) -> str:
    return "shared.weight" if "shared.weight" in state else "encoder.embed_tokens.weight"


def config_fields(hf_config: dict, state: hf.StateDict) -> dict:
    """Our config fields of a T5/mT5 ``config.json`` and its weights (which say whether the
    head is tied)."""
    model_type = hf_config.get("model_type", "t5")
    fields = {ours: hf_config[key] for key, ours in _KEYS.items() if key in hf_config}
    default_ff = "gated-gelu" if model_type == "mt5" else "relu"
    fields["mlp"], fields["hidden_act"] = _activation(
        hf_config.get("feed_forward_proj", default_ff))
    fields["num_decoder_layers"] = (hf_config.get("num_decoder_layers")
                                    or fields.get("num_encoder_layers", 6))
    rate = float(hf_config.get("dropout_rate", 0.1))
    fields.update(hidden_dropout=rate, attention_dropout=rate, activation_dropout=rate)
    fields["eos_token_id"] = tuple(fields["eos_token_id"]) if isinstance(
        fields.get("eos_token_id"), list) else fields.get("eos_token_id", 1)
    if fields.get("decoder_start_token_id") is None:
        fields["decoder_start_token_id"] = fields.get("pad_token_id", 0)
    fields["tie_word_embeddings"] = not seq2seq.stores_separate_head(
        state, "lm_head.weight", _embedding_key(state))
    if model_type == "mt5":
        fields["scale_decoder_outputs"] = False
    else:
        fields["scale_decoder_outputs"] = bool(hf_config.get(
            "scale_decoder_outputs", hf_config.get("tie_word_embeddings", True)))
    fields["model_type"] = model_type
    return fields


def hf_to_ours(state: hf.StateDict, cfg: T5Config) -> hf.StateDict:
    """HF T5 keys to ours: the stored copies of the shared embedding (``encoder.``/
    ``decoder.embed_tokens``, a tied ``lm_head``) and the unused cross-attention position table
    are dropped."""
    state = dict(state)
    key = "shared.weight"
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        seq2seq.pop_alias(state, alias, key)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state.pop(_UNUSED, None)
    return NAMES.state(state, "ours")


def ours_to_hf(state: hf.StateDict) -> hf.StateDict:
    """Inverse of ``hf_to_ours`` (``T5ForConditionalGeneration`` names)."""
    return NAMES.state(state, "theirs")


class T5ForConditionalGeneration(seq2seq.Seq2SeqLM):
    """HF ``T5ForConditionalGeneration`` / ``MT5ForConditionalGeneration`` (the encoder-decoder
    interface: ``lib.models.seq2seq.Seq2SeqLM``)."""

    config_class = T5Config


def load_pretrained(
    model_dir: str | os.PathLike, *, dtype: str = "float32", **overrides: Any
) -> tuple[T5ForConditionalGeneration, T5Config]:
    """Load an HF T5/mT5 directory: ``(model, cfg)`` with fp32 params and ``dtype`` compute."""
    return seq2seq.load_pretrained(T5ForConditionalGeneration, model_dir, dtype=dtype,
                                   hf_to_ours=hf_to_ours, config_of=config_fields, **overrides)


def export_pretrained(model, cfg: T5Config, out_dir: str | os.PathLike, tokenizer=None):
    """Write ``model`` as an HF ``T5ForConditionalGeneration`` (or mT5) directory."""
    return seq2seq.export_pretrained(model, cfg, out_dir, tokenizer, ours_to_hf)


def scratch_config(model_cfg: Any, tokenizer: Any, max_length: int | None) -> T5Config:
    """A scratch T5 sized by ``config.model``: ``family`` ``t5`` is v1.0 (ReLU, tied head),
    ``mt5`` the v1.1 layout (gated GELU, separate head)."""
    model_type = model_cfg.get("family", "t5")
    fields = seq2seq.scratch_fields(model_cfg, tokenizer, max_length)
    fields.pop("max_position_embeddings", None)  # relative positions need no range
    fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if model_type == "mt5":
        fields.update(mlp="gated", hidden_act="gelu_new", tie_word_embeddings=False,
                      scale_decoder_outputs=False)
    return T5Config(model_type=model_type, **fields)


PORT = seq2seq.seq2seq_port(
    "t5", T5ForConditionalGeneration, load=load_pretrained, export=export_pretrained,
    scratch=scratch_config, names=NAMES,
)
