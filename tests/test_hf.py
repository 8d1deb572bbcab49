"""lib.hf: safetensors reading/writing, HF directory loading and export, strict name mapping."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx

from lib import hf
from lib.errors import UserError
from lib.models import layers


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.normal(size=(2, 3)).astype(np.float32),
        "bf16": np.array([1.5, -2.25, 3e-3, 65504.0], ml_dtypes.bfloat16),
        "i64": np.array([0, -1, 2**40 + 7], np.int64),
        "f16": np.array([[0.5, -1.0]], np.float16),
        "i32": np.arange(5, dtype=np.int32),
        "u8": np.array([0, 255], np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(7.0, np.float64),
        "empty": np.zeros((0, 3), np.float32),
    }


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name])


def test_safetensors_round_trip(tmp_path):
    path = tmp_path / "x.safetensors"
    hf.write_safetensors(_arrays(), path)
    _assert_same(hf.read_safetensors(path), _arrays())
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0  # tensor data starts 8-byte aligned, as the format requires
    assert json.loads(raw[8 : 8 + header_len])["bf16"]["dtype"] == "BF16"


def test_safetensors_library_reads_our_file(tmp_path):
    path = tmp_path / "x.safetensors"
    want = _arrays()
    hf.write_safetensors(want, path)
    got = safetensors.torch.load_file(path)
    assert got["bf16"].dtype == torch.bfloat16 and got["i64"].dtype == torch.int64
    np.testing.assert_array_equal(got["bf16"].float().numpy(), want["bf16"].astype(np.float32))
    assert got["i64"].tolist() == [0, -1, 2**40 + 7]
    plain = {k: v for k, v in want.items() if k != "bf16"}  # numpy has no bfloat16
    hf.write_safetensors(plain, path)
    _assert_same(safetensors.numpy.load_file(path), plain)


def test_we_read_files_written_by_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([0.5, -1.5], dtype=torch.bfloat16),
        "i": torch.tensor([2**40, -3], dtype=torch.int64),
    }
    safetensors.torch.save_file(tensors, path)
    got = hf.read_safetensors(path)
    assert got["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["b"].astype(np.float32), [0.5, -1.5])
    np.testing.assert_array_equal(got["w"], tensors["w"].numpy())
    assert got["i"].tolist() == [2**40, -3]


def test_torch_bin_with_bf16(tmp_path):
    torch.save(
        {"a": torch.tensor([1.0, -0.5], dtype=torch.bfloat16), "n": torch.tensor([5, 2**40])},
        tmp_path / "pytorch_model.bin",
    )
    got = hf.load_state_dict(tmp_path)
    assert got["a"].dtype == ml_dtypes.bfloat16 and got["n"].dtype == np.int64
    assert got["a"].astype(np.float32).tolist() == [1.0, -0.5] and got["n"].tolist() == [5, 2**40]


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=20,
    )
    return transformers.BertModel(config).eval()


def test_transformers_reads_our_export(tiny_bert, tmp_path):
    state = {k: v.numpy() for k, v in tiny_bert.state_dict().items()}
    hf.save_pretrained(state, tiny_bert.config.to_dict(), tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    back = transformers.BertModel.from_pretrained(tmp_path)
    for name, value in back.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name], err_msg=name)


def test_sharded_export_writes_index_and_reloads(tiny_bert, tmp_path):
    state = {k: v.numpy() for k, v in tiny_bert.state_dict().items()}
    hf.save_pretrained(state, tiny_bert.config.to_dict(), tmp_path, max_shard_bytes=4096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in state.values())
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == shards
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same(hf.load_state_dict(tmp_path), state)
    back = transformers.BertModel.from_pretrained(tmp_path)
    for name, value in back.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name], err_msg=name)


def test_missing_model_dir_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError, match=f"{missing}.*does not exist.*--config.model.path"):
        hf.read_config(missing)
    with pytest.raises(UserError, match=f"{missing}.*does not exist"):
        hf.load_state_dict(missing)


def test_dir_without_weights_or_config(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}/config.json is missing"):
        hf.read_config(tmp_path)
    (tmp_path / "config.json").write_text('{\n  "hidden_size": 8,\n  oops\n}')
    with pytest.raises(UserError, match=f"{tmp_path}/config.json:3: invalid JSON"):
        hf.read_config(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path} has no weights: expected model.safetensors"):
        hf.load_state_dict(tmp_path)


class _Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = layers.embedding(5, 3, rngs=rngs)
        self.proj = layers.dense(3, 2, ("embed", None), rngs=rngs)
        self.norm = layers.layer_norm(2, 1e-5, rngs=rngs)


def test_load_into_maps_names_transposes_and_copies(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "embed.weight": rng.normal(size=(5, 3)).astype(np.float32),
        "proj.weight": rng.normal(size=(2, 3)).astype(np.float32),  # torch layout [out, in]
        "proj.bias": np.array([1.0, 2.0], np.float32),
        "norm.weight": np.array([3.0, 4.0], np.float32),
        "norm.bias": np.array([5.0, 6.0], np.float32),
    }
    hf.write_safetensors(state, tmp_path / "model.safetensors")
    mapped = hf.load_state_dict(tmp_path)
    model = nnx.eval_shape(lambda: _Toy(nnx.Rngs(0)))
    hf.load_into(model, mapped)
    np.testing.assert_array_equal(model.proj.kernel[...], state["proj.weight"].T)
    np.testing.assert_array_equal(model.norm.scale[...], [3.0, 4.0])
    # Parameters are copies, not views of the memory-mapped file (which an export may rewrite).
    assert not np.shares_memory(np.asarray(model.embed.embedding[...]), mapped["embed.weight"])
    _assert_same(hf.state_of(model), state)
    hf.write_safetensors({k: v + 1 for k, v in state.items()}, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(model.norm.bias[...], [5.0, 6.0])

    bad = dict(state, extra=np.zeros(1, np.float32))
    del bad["norm.bias"]
    with pytest.raises(UserError, match=r"missing keys \[norm\.bias\] \(1\); unexpected keys "
                                        r"\[extra\] \(1\)"):
        hf.load_into(model, bad, where="dir")
    with pytest.raises(UserError, match=r"'proj\.weight' has shape \(3, 2\), the model expects "
                                        r"\(2, 3\)"):
        hf.load_into(model, dict(state, **{"proj.weight": state["proj.weight"].T}))
