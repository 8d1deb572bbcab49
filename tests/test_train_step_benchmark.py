"""``benchmarks/train_step.py``: the seq2seq pair (``t5-seq2seq``) at its toy size.

Both sides of the pair train the same T5 v1.1 / mT5 weights on the same batch, so they must
compute the same eval-mode logits and the same losses step after step (the same AdamW groups,
schedule and clipping); ``measure`` and ``print_table`` then time and print them.
"""

import numpy as np
import pytest
import torch

from benchmarks import train_step as bench


def test_seq2seq_batch_is_what_encode_pairs_builds():
    b = bench.seq2seq_batch(4, 16, 8, 100)
    # Rows 0 and 2 hold 16 source tokens, 1 and 3 hold 12; targets 6 (even rows) and 8 (odd).
    np.testing.assert_array_equal(b["attention_mask"].sum(1), [16, 12, 16, 12])
    np.testing.assert_array_equal(b["decoder_attention_mask"].sum(1), [6, 8, 6, 8])
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    np.testing.assert_array_equal(b["labels"] == -100, b["decoder_attention_mask"] == 0)
    # The decoder reads the start id (0) and then the targets shifted by one, padding 0.
    np.testing.assert_array_equal(b["decoder_input_ids"][:, 0], 0)
    np.testing.assert_array_equal(b["decoder_input_ids"][0, 1:6], b["labels"][0, :5])
    np.testing.assert_array_equal(b["decoder_input_ids"][0, 6:], 0)


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread (at this size its thread pool costs more than it gives)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_t5_seq2seq_pair_trains_like_pytorch(monkeypatch, one_torch_thread, capsys):
    # A learning rate at which a few steps move the loss well beyond the sides' difference.
    monkeypatch.setitem(bench.TRAIN, "lr", 1e-3)
    monkeypatch.setitem(bench.TRAIN, "warmup_steps", 1)
    pair = bench.PAIRS["t5-seq2seq"].build("tiny", 8, 32)
    assert pair.name == "t5-seq2seq tiny"
    assert pair.tokens == 8 * (32 + 8)
    assert pair.output_diff < 1e-5
    losses = np.array([[pair.ours(), pair.torch()] for _ in range(3)])
    # Near ln(vocab) at first; the warmup's first step has lr 0, then both sides descend alike.
    assert abs(losses[0, 0] - np.log(bench.VOCAB)) < 0.1, losses
    np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=0, atol=1e-5)
    assert losses[0, 0] - losses[2, 0] > 5e-3, losses

    result = bench.measure(pair, steps=1, block=1)
    assert result["ours"] > 0 and result["torch"] > 0
    bench.print_table([(pair, 8, result)])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:4] == ["t5-seq2seq", "tiny", "8", f"{pair.tokens / result['ours']:.0f}"]
