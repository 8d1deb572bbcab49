"""A Qwen2-format directory end to end: tokenizer loading, ChatML, SFT / LoopCoT examples, tiny
runs (full and LoRA, with both LoRA exports).

No Qwen checkpoint can be downloaded, so ``qwen_dir`` builds one in the format of the released
Qwen2 / Qwen2.5 directories: a byte-level BPE ``tokenizer.json`` (NFC, Qwen2's split regex,
GPT-2 byte mapping) trained here on the shipped Chinese data, the special tokens
``<|endoftext|>`` (EOS and pad of the base models), ``<|im_start|>`` and ``<|im_end|>`` placed
after the BPE vocabulary (as Qwen's 151643..151645), a ``tokenizer_config.json`` in the released
layout (ChatML ``chat_template`` inline, no BOS), and a tiny random ``Qwen2ForCausalLM`` whose
vocabulary is the tokenizer's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import jieba
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, normalizers, pre_tokenizers

from configs import loopcot as loopcot_config
from configs import sft as sft_config
from lib import lm_data, train
from lib.generate import apply_chat_template, generate, left_pad
from lib.models import qwen2
from lib.tokenizer import load_hf_tokenizer
from tasks import base, loopcot, sft

ROOT = Path(__file__).resolve().parents[1]
IGN = lm_data.IGNORE

# The split pattern of the released Qwen2 tokenizer.json: letters with one leading non-letter
# (a space or a punctuation mark), single digits, punctuation runs, newlines, whitespace.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BPE_SIZE = 1000  # 256 byte tokens + merges; the specials get ids 1000, 1001, 1002
EOT, IM_START, IM_END = BPE_SIZE, BPE_SIZE + 1, BPE_SIZE + 2
# Plain ChatML, no default system prompt (Qwen2.5's own template adds one).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus() -> list[str]:
    """A few hundred lines of the shipped data: the SFT alpaca texts as the task builds them,
    poems, and appreciations both plain and cut into jieba words joined by spaces. Web text
    puts spaces before Chinese words, so Qwen's vocabulary is full of a space merged with
    Chinese ("Ġ" + bytes); the segmented lines teach this small BPE such merges too."""
    jieba.setLogLevel(logging.WARNING)
    records = json.loads((ROOT / "data/sft/train.json").read_text(encoding="utf-8"))
    lines = [sft.alpaca_prompt(r) + r["output"] for r in records]
    for r in json.loads((ROOT / "data/poetry/pairs.json").read_text(encoding="utf-8")):
        lines += [r["poem"], r["appreciation"], " ".join(jieba.cut(r["appreciation"]))]
    return lines


def write_qwen2_tokenizer(out_dir: Path, eos_token: str = "<|endoftext|>") -> None:
    """Train the BPE and write ``tokenizer.json`` + ``tokenizer_config.json`` as Qwen ships
    them (``eos_token="<|im_end|>"`` gives an Instruct-style tokenizer)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    assert tok.get_vocab_size() == BPE_SIZE
    tok.add_special_tokens(list(SPECIALS))
    fast = transformers.Qwen2TokenizerFast(
        tokenizer_object=tok, bos_token=None, unk_token=None, eos_token=eos_token,
        pad_token="<|endoftext|>",
    )
    fast.save_pretrained(out_dir)
    # The released layout (transformers 4.x era): chat template inline, no BOS, no cleanup of
    # spaces in decode. transformers 5 would write the template to chat_template.jinja.
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    added = {
        str(BPE_SIZE + i): {"content": t, "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIALS)
    }
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": CHATML, "clean_up_tokenization_spaces": False,
        "eos_token": eos_token, "errors": "replace", "model_max_length": 32768,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A Qwen2.5-base-shaped directory: the tokenizer and a tiny random tied-head model."""
    out = tmp_path_factory.mktemp("qwen2_bpe")
    write_qwen2_tokenizer(out)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=BPE_SIZE + len(SPECIALS), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=EOT, eos_token_id=EOT,  # as Qwen2.5 base: both <|endoftext|>
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(qwen_dir):
    """The fixture's tokenizer as the tasks load it."""
    return load_hf_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def instruct_tok(tmp_path_factory):
    """The same vocabulary with Qwen2.5-Instruct's EOS, ``<|im_end|>`` (pad stays
    ``<|endoftext|>``)."""
    out = tmp_path_factory.mktemp("qwen2_bpe_instruct")
    write_qwen2_tokenizer(out, eos_token="<|im_end|>")
    return load_hf_tokenizer(out)


# ----------------------------------------------------------------------------- loading

TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "2024年3月15日，GPT-4o 的 API 价格降了 50%！（见第 3 页）",
    "Hello, 世界! It's a test: x = 1.5e-3; path/to/file.json",
    "表情😀和罕见字𠀀𪚥，全角　空格、tab\t与\n\n换行\r\n结束  ",
    "“引号”《书名》——破折号……省略号",
]


def test_fixture_has_qwen2_layout(qwen_dir, tok):
    assert QWEN2_SPLIT == transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
    assert sorted(os.listdir(qwen_dir)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) == BPE_SIZE + 3
    assert tok.convert_tokens_to_ids(list(SPECIALS)) == [EOT, IM_START, IM_END]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (EOT, EOT, None)
    assert tok.chat_template == CHATML


def test_load_hf_tokenizer_round_trips_and_matches_auto_tokenizer(qwen_dir, tok):
    auto = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    raw = tokenizers.Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text)
        # No BOS/EOS is added by default (Qwen has no BOS): the ids are the raw BPE's.
        assert ids == tok.encode(text, add_special_tokens=False) == raw.encode(text).ids
        assert ids == auto.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < BPE_SIZE  # plain text never yields a special token
    # Digits are single tokens (\p{N} alone), whatever merges the BPE learned.
    assert tok.encode("2024") == tok.convert_tokens_to_ids(["2", "0", "2", "4"])
    # Characters the BPE never saw fall back to their UTF-8 bytes, one token per byte
    # (GPT-2's byte-to-character map: F0 9F 98 80 -> ð Ł ĺ Ģ); no unknown token exists.
    assert tok.convert_ids_to_tokens(tok.encode("😀")) == ["ð", "Ł", "ĺ", "Ģ"]
    assert len(tok.encode("𪚥")) == 4 and tok.decode(tok.encode("𪚥")) == "𪚥"
    # A special token written in a text is that token (split_special_tokens=False, as Qwen).
    ids = tok.encode("答<|im_end|>\n")
    assert ids == [*tok.encode("答"), IM_END, *tok.encode("\n")]
    assert tok.decode(ids, skip_special_tokens=True) == "答\n"
    # NFC: a decomposed "é" encodes as the composed one.
    assert tok.encode("e\u0301") == tok.encode("\u00e9")


# ----------------------------------------------------------------------------- ChatML


def test_apply_chat_template_gives_chatml_ids(tok):
    messages = [{"role": "user", "content": "床前明月光的下一句是什么？"}]
    ids = apply_chat_template(tok, messages)
    want_text = "<|im_start|>user\n床前明月光的下一句是什么？<|im_end|>\n<|im_start|>assistant\n"
    # Special tokens cut the text; each piece between them is encoded on its own.
    want = [IM_START, *tok.encode("user\n床前明月光的下一句是什么？"), IM_END,
            *tok.encode("\n"), IM_START, *tok.encode("assistant\n")]
    assert ids == want
    assert tok.decode(ids) == want_text
    assert ids.count(IM_START) == 2 and ids.count(IM_END) == 1 and EOT not in ids

    chat = [{"role": "system", "content": "你是一只猫。"}, *messages,
            {"role": "assistant", "content": "疑是地上霜。"}]
    ids = apply_chat_template(tok, chat, add_generation_prompt=False)
    assert tok.decode(ids) == (
        "<|im_start|>system\n你是一只猫。<|im_end|>\n<|im_start|>user\n床前明月光的下一句是什么？"
        "<|im_end|>\n<|im_start|>assistant\n疑是地上霜。<|im_end|>\n"
    )
    assert ids[-2:] == [IM_END, *tok.encode("\n")]


# ----------------------------------------------------------------------------- SFT examples


def _sft_pairs(n: int) -> list[tuple[str, str]]:
    records = json.loads((ROOT / "data/sft/eval.json").read_text(encoding="utf-8"))[:n]
    return [(sft.alpaca_prompt(r), r["output"]) for r in records]


def test_sft_masked_labels_cover_the_answer_and_eos(tok):
    pairs = _sft_pairs(3)
    length = 160
    arrays = lm_data.build_arrays(tok, pairs, max_length=length, max_prompt_length=120,
                                  loss_mode="masked")
    unmasked = lm_data.build_arrays(tok, pairs, max_length=length, max_prompt_length=120,
                                    loss_mode="unmasked")
    for row, (prompt, answer) in enumerate(pairs):
        p, a = tok.encode(prompt), tok.encode(answer, add_special_tokens=False)
        n = len(p) + len(a) + 1
        assert n <= length  # nothing is cut here
        ids, mask = arrays["input_ids"][row], arrays["attention_mask"][row]
        # Qwen pads with its EOS id: only the mask tells the real EOS from padding.
        assert ids.tolist() == p + a + [EOT] + [EOT] * (length - n)
        assert mask.tolist() == [1] * n + [0] * (length - n)
        labels = arrays["labels"][row].tolist()
        assert labels == [IGN] * (len(p) - 1) + a + [EOT] + [IGN] * (length - n + 1)
        assert sum(x != IGN for x in labels) == len(a) + 1
        assert tok.decode(ids[:n]) == prompt + answer + "<|endoftext|>"
        u = unmasked["labels"][row].tolist()
        assert u == ids[1:n].tolist() + [IGN] * (length - n + 1)
        np.testing.assert_array_equal(unmasked["input_ids"][row], ids)


def test_sft_prompt_and_answer_are_tokenized_apart_at_the_bpe_boundary(tok):
    """The alpaca prompt ends with "Output: ". Encoded with its answer, Qwen2's split regex
    glues that space to the answer's first word (" 秦川..."), and the BPE merges across the
    boundary. lib.lm_data encodes prompt and answer apart, as at inference where only the
    prompt exists, so the training prompt is token for token the prompt the model decodes
    from; the text is the same either way."""
    (prompt, answer), = _sft_pairs(1)
    p, a = tok.encode(prompt), tok.encode(answer, add_special_tokens=False)
    joint = tok.encode(prompt + answer)
    assert p[-1] == tok.convert_tokens_to_ids("Ġ")  # the prompt's trailing space, alone
    assert joint[: len(p) - 1] == p[:-1]
    boundary = tok.convert_ids_to_tokens(joint[len(p) - 1])
    assert boundary.startswith("Ġ") and len(boundary) > 1  # space merged with answer bytes
    assert joint != p + a
    assert tok.decode(joint) == tok.decode(p + a) == prompt + answer

    ids = lm_data.build_arrays(tok, [(prompt, answer)], max_length=160,
                               max_prompt_length=120)["input_ids"][0]
    assert ids[: len(p) + len(a)].tolist() == p + a
    infer_ids, infer_mask = lm_data.prompt_arrays(tok, [prompt], max_prompt_length=120)
    assert infer_ids[0][infer_mask[0] == 1].tolist() == p


def test_sft_examples_with_an_instruct_tokenizer_end_with_im_end(instruct_tok):
    """Qwen2.5-Instruct's EOS is <|im_end|>, its pad <|endoftext|>: a ChatML prompt + answer
    + <|im_end|> is exactly the chat the template writes for the whole conversation."""
    tok = instruct_tok
    assert (lm_data.eos_id(tok), lm_data.pad_id(tok)) == (IM_END, EOT)
    user = [{"role": "user", "content": "写一句关于月亮的诗。"}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    answer = "举头望明月，低头思故乡。"
    arrays = lm_data.build_arrays(tok, [(prompt, answer)], max_length=64, max_prompt_length=40)
    p = apply_chat_template(tok, user)
    a = tok.encode(answer, add_special_tokens=False)
    n = len(p) + len(a) + 1
    assert arrays["input_ids"][0].tolist() == p + a + [IM_END] + [EOT] * (64 - n)
    assert arrays["labels"][0].tolist() == [IGN] * (len(p) - 1) + a + [IM_END] + [IGN] * (
        64 - n + 1)
    full = user + [{"role": "assistant", "content": answer}]
    whole = tok.apply_chat_template(full, tokenize=False)
    assert tok.decode(arrays["input_ids"][0][:n]) + "\n" == whole
    # Decoding stops at <|im_end|>, and drops what follows it.
    assert lm_data.decode_answer(tok, [*a, IM_END, *tok.encode("多余")]) == answer


# ----------------------------------------------------------------------------- a tiny run

RECORDS = [{"instruction": "写", "input": w, "output": w * 3} for w in "春夏秋冬山水风月花鸟云雨"]
MAX_NEW = 8


def _env() -> dict:
    """The environment of a ``main.py`` run."""
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # one device, as a user runs it
    e["JAX_PLATFORMS"] = "cpu"
    return e


def _overrides(tmp_path: Path, qwen_dir: Path) -> dict:
    """A tiny SFT run from ``qwen_dir``: 200 steps (a few ms each; compiling dominates) are
    enough for the tiny model to learn the 12 answers and their EOS."""
    return {
        "model.path": qwen_dir, "data.train": tmp_path / "train.json",
        "data.eval": tmp_path / "eval.json", "data.template": "{instruction}{input}=",
        "data.max_length": 16, "data.max_prompt_length": 8, "data.prompt_tail": 1,
        "train.epochs": 0, "train.steps": 200, "train.batch_size": 4, "train.lr": 3e-2,
        "train.warmup_ratio": 0.0, "eval.every": 200, "checkpoint.every": 200,
        "eval.batch_size": 4, "eval.num_samples": 0, "eval.max_new_tokens": MAX_NEW,
        "log.every": 50,
    }


def _main(workdir: Path, overrides: dict, *extra: str, stdin: str | None = None):
    """Run ``main.py`` with the SFT config and ``overrides``; it must succeed."""
    cmd = [sys.executable, "main.py", "--config=configs/sft.py", f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in overrides.items()), *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), input=stdin, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_sft_run_and_predict_from_a_qwen2_directory(qwen_dir, tok, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(RECORDS, ensure_ascii=False))
    (tmp_path / "eval.json").write_text(json.dumps(RECORDS[:4], ensure_ascii=False))
    overrides = _overrides(tmp_path, qwen_dir)
    workdir = tmp_path / "run"
    _main(workdir, overrides)
    saved = json.loads((workdir / "eval" / "step_200.json").read_text())
    metrics = saved["metrics"]
    assert math.isfinite(metrics["loss"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    # The eval targets are the 4 answers' BPE tokens plus one <|endoftext|> each.
    assert metrics["tokens"] == sum(len(tok.encode(r["output"])) + 1 for r in RECORDS[:4])
    assert not (workdir / base.TOKENIZER_DIR).exists()  # the HF tokenizer stays in model.path

    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS[:3]]
    result = _main(workdir, overrides, "--mode=predict", stdin="\n".join(lines) + "\n")
    preds = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert [p["input"] for p in preds] == lines

    # Our own greedy decoding of the same checkpoint, with the same tokenizer.
    config = sft_config.get_config("demo")
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = type(config[section][name])(value)
    config.workdir = str(workdir)
    task = sft.Task(config)
    model, loaded, step = train.restore_model(task, workdir)
    assert step == 200 and (loaded.eos_token_id, loaded.pad_token_id) == (EOT, EOT)
    prompts = [r["instruction"] + r["input"] + "=" for r in RECORDS[:3]]
    ids, mask = left_pad([tok.encode(p) for p in prompts], EOT, length=8)
    out = generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=EOT,
                   pad_token_id=EOT)
    for row, pred in zip(out.tolist(), preds):
        # Trained to end with <|endoftext|>: decoding stops there, before the length limit,
        # and everything after it is padding.
        assert EOT in row and row.index(EOT) < MAX_NEW - 1
        end = row.index(EOT)
        assert row[end:] == [EOT] * (MAX_NEW - end)
        assert IM_END not in row[:end]
        assert pred["output"] == tok.decode(row[:end]).strip()
    # The model learned the answers (3x the input character).
    assert [p["output"] for p in preds] == [r["output"] for r in RECORDS[:3]]

    # HF's greedy generate on the exported weights gives the same tokens.
    export = tmp_path / "export"
    qwen2.export_pretrained(model, task.built.config, export)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(export).eval()
    for row, prompt in zip(out.tolist(), prompts):
        x = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(x, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=EOT,
                              pad_token_id=EOT)[0, x.shape[1]:].tolist()
        assert ref == row[: row.index(EOT) + 1]  # HF stops at, and keeps, the EOS


def test_lora_run_exports_an_adapter_or_the_merged_model(qwen_dir, tok, tmp_path):
    """``--mode=export`` of a LoRA run: the PEFT adapter on the HF base and the merged HF
    directory both compute what the run's model computes."""
    (tmp_path / "train.json").write_text(json.dumps(RECORDS, ensure_ascii=False))
    (tmp_path / "eval.json").write_text(json.dumps(RECORDS[:4], ensure_ascii=False))
    overrides = {**_overrides(tmp_path, qwen_dir), "train.steps": 20, "eval.every": 20,
                 "checkpoint.every": 20, "model.lora.rank": 4, "model.lora.dropout": 0.0}
    workdir = tmp_path / "run"
    _main(workdir, overrides)
    _main(workdir, overrides, "--mode=export")
    adapter_dir = shutil.copytree(workdir / "export", tmp_path / "adapter")
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj", "v_proj"]
    _main(workdir, {**overrides, "model.lora.export": "merged"}, "--mode=export")
    merged_dir = workdir / "export"
    # An export replaces the previous one whole: no adapter file is left among the weights.
    assert not (merged_dir / "adapter_config.json").exists()

    config = sft_config.get_config("demo")
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if "." in name:
            config[section][name.split(".")[0]][name.split(".")[1]] = value
        else:
            config[section][name] = type(config[section][name])(value)
    config.workdir = str(workdir)
    model, _, step = train.restore_model(sft.Task(config), workdir)
    assert step == 20
    ids = np.array([tok.encode(text)[:8] for text in corpus()[:4]])
    ours = np.asarray(model(jnp.asarray(ids))[0])
    base = transformers.Qwen2ForCausalLM.from_pretrained(qwen_dir).eval()
    with torch.no_grad():
        plain = base(torch.from_numpy(ids)).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
        via_adapter = adapted(torch.from_numpy(ids)).logits.numpy()
        merged = transformers.Qwen2ForCausalLM.from_pretrained(merged_dir).eval()
        via_merged = merged(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours - plain).max() > 1e-2  # the adapters changed the function
    assert np.abs(via_adapter - ours).max() <= 1e-4
    assert np.abs(via_merged - ours).max() <= 1e-4
    with pytest.raises(AssertionError, match="lora.export='both': choose one of adapter, merged"):
        _main(workdir, {**overrides, "model.lora.export": "both"}, "--mode=export")


# ----------------------------------------------------------------------------- LoopCoT


LOOP_LEN = 448


def test_loopcot_examples_with_a_qwen2_directory(qwen_dir, tok, tmp_path):
    records = json.loads((ROOT / "data/poetry/pairs.json").read_text(encoding="utf-8"))[:3]
    (tmp_path / "pairs.json").write_text(json.dumps(records, ensure_ascii=False))
    c = loopcot_config.get_config("qwen2.5-0.5b")
    c.model.path = str(qwen_dir)
    c.data.train = c.data.eval = str(tmp_path / "pairs.json")
    c.data.extra_generation = ""
    c.data.max_length, c.data.max_prompt_length = LOOP_LEN, 192  # nothing is cut
    c.data.mix = "mix"
    task = loopcot.Task(c)
    model, loaded = task.build()
    assert type(loaded).__name__ == "Qwen2Tokenizer" and loaded.eos_token_id == EOT
    assert model.config.vocab_size == len(tok)
    train_data, eval_data = task.datasets(loaded)
    pairs = loopcot.PoetryData(c).train_examples("mix")
    arrays = train_data.arrays
    assert arrays["input_ids"].shape == (6, LOOP_LEN)
    for row, (prompt, answer) in enumerate(pairs):
        # Qwen adds no special token to a prompt; the template's final "\n" stands alone in
        # the split regex, so the joint encoding has the same boundary.
        p = tok.encode(prompt, add_special_tokens=False)
        a = tok.encode(answer, add_special_tokens=False)
        assert tok.encode(prompt + answer) == p + a
        n = len(p) + len(a) + 1
        assert arrays["input_ids"][row].tolist() == p + a + [EOT] + [EOT] * (LOOP_LEN - n)
        assert arrays["attention_mask"][row].tolist() == [1] * n + [0] * (LOOP_LEN - n)
        labels = arrays["labels"][row].tolist()
        assert labels[len(p) - 1 : n - 1] == a + [EOT]
        assert labels[: len(p) - 1] == [IGN] * (len(p) - 1)
        assert labels[n - 1 :] == [IGN] * (LOOP_LEN - n + 1)
    # Test prompts are the bare templates (no ChatGLM wrapping), encoded as in training.
    prompts = eval_data.prompts["appreciation"]
    assert prompts[0] == loopcot.appreciation_prompt(records[0]["poem"])
    ids, mask = lm_data.prompt_arrays(loaded, prompts[:1], max_prompt_length=192)
    assert ids[0][mask[0] == 1].tolist() == tok.encode(prompts[0], add_special_tokens=False)
