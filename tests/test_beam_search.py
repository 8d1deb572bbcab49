"""lib.generate beyond greedy decoders: beam search and no-repeat n-grams token-identical to HF
``generate`` for decoders (Qwen2 and GPT-2 of the port harness) and encoder-decoders (T5 and
Pegasus of the seq2seq harness), greedy encoder-decoder decoding, and one prefill per prompt
for its samples."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import test_seq2seq_ports
import torch
from test_ports import ENTRIES, _build
from test_qwen2 import padded_batch

from lib import generate as gen

NEW = 16
# The id written after a sequence's EOS. Not 0: HF's beam search fills with the EOS id when
# the pad id is 0 (a falsy tensor).
FILL = 3

# (num_beams, no_repeat_ngram_size) -> [(length_penalty, early_stopping, num_return_sequences)]:
# one compilation per key (the length penalty and early stopping are data).
BEAM_SETTINGS = {
    (3, 0): [(1.0, False, 1), (0.6, True, 2), (2.0, "never", 3)],
    (4, 2): [(0.6, False, 4), (2.0, "never", 2), (1.0, True, 1)],
    (2, 3): [(1.0, False, 2), (2.0, True, 1), (0.6, "never", 1)],
}


def _models(name: str, tmp_path_factory) -> tuple:
    """(HF model, our port of it): the tiny random model ``name`` of the decoder or the
    encoder-decoder harness."""
    for entries, build in ((ENTRIES, _build),
                           (test_seq2seq_ports.ENTRIES, test_seq2seq_ports._build)):
        for entry in entries:
            if entry.name == name:
                ref, _, model, _, _ = build(entry, tmp_path_factory)
                # Pegasus configs force EOS as the last token; lib.generate has no such rule.
                ref.generation_config.forced_eos_token_id = None
                return ref, model
    raise KeyError(name)


def _inputs(ref) -> tuple[np.ndarray, np.ndarray]:
    """The harness's batch: left-padded prompts of a decoder, right-padded encoder inputs."""
    if ref.config.is_encoder_decoder:
        return test_seq2seq_ports.padded_batch()[:2]
    return padded_batch()


def hf_generate(ref, ids, mask, **kwargs) -> np.ndarray:
    """HF ``generate``'s new tokens, filled up to ``NEW`` columns (HF stops when all ended)."""
    first = ids.shape[1]
    if ref.config.is_encoder_decoder:
        # The harness's models have more decoder than encoder layers, which HF's T5 cache
        # mishandles; without a cache HF computes the same.
        kwargs.update(use_cache=False)
        first = 1  # the decoder start token
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask, dtype=torch.long),
                           max_new_tokens=NEW, pad_token_id=FILL, **kwargs)
    out = out[:, first:].numpy()
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=FILL)


def _early_eos(ref, ids, mask) -> int:
    """An EOS id that decoding reaches early: the commonest of HF's first 4 greedy tokens."""
    greedy = hf_generate(ref, ids, mask, do_sample=False, eos_token_id=None)
    values, counts = np.unique(greedy[:, :4], return_counts=True)
    return int(values[np.argmax(counts)])


# Every key of BEAM_SETTINGS on a decoder, two of them on an encoder-decoder (one compilation
# a case).
BEAM_CASES = [("qwen2", (3, 0)), ("qwen2", (4, 2)), ("gpt2", (2, 3)), ("t5", (2, 3)),
              ("pegasus", (3, 0))]


@pytest.mark.parametrize("name, beams_ngram", BEAM_CASES,
                         ids=[f"{n}-beams{b}-ngram{g}" for n, (b, g) in BEAM_CASES])
def test_beam_search_matches_hf(name, beams_ngram, tmp_path_factory):
    ref, model = _models(name, tmp_path_factory)
    ids, mask = _inputs(ref)
    num_beams, ngram = beams_ngram
    eos = _early_eos(ref, ids, mask)
    ended = []
    for length_penalty, early_stopping, n in BEAM_SETTINGS[beams_ngram]:
        kwargs = dict(num_beams=num_beams, no_repeat_ngram_size=ngram, eos_token_id=eos,
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      num_return_sequences=n)
        ours = gen.generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=FILL, **kwargs)
        assert ours.shape == (3 * n, NEW)
        theirs = hf_generate(ref, ids, mask, do_sample=False, **kwargs)
        np.testing.assert_array_equal(ours, theirs, err_msg=str(kwargs))
        ended.append(np.any(ours == eos, axis=1))
    ended = np.concatenate(ended)
    # Both cases occur: hypotheses that ended with the EOS, others that reached NEW tokens.
    assert 3 <= np.sum(ended) < len(ended) - 1

    # An EOS id that never comes: every hypothesis runs to NEW tokens.
    kwargs.update(eos_token_id=next(i for i in range(4, ref.config.vocab_size)
                                    if i not in ours), early_stopping=False)
    ours = gen.generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=FILL, **kwargs)
    np.testing.assert_array_equal(ours, hf_generate(ref, ids, mask, do_sample=False, **kwargs))


@pytest.mark.parametrize("name", ["t5", "pegasus"])
def test_seq2seq_greedy_matches_hf(name, tmp_path_factory):
    ref, model = _models(name, tmp_path_factory)
    ids, mask = _inputs(ref)
    eos = _early_eos(ref, ids, mask)
    ours = gen.generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=FILL,
                        eos_token_id=eos)
    np.testing.assert_array_equal(ours, hf_generate(ref, ids, mask, do_sample=False,
                                                    eos_token_id=eos))
    ended = np.any(ours == eos, axis=1)
    assert 1 <= np.sum(ended) < len(ended)
    assert len(np.unique(ours)) > 5  # real continuations


def test_no_repeat_ngram_greedy_matches_hf(tmp_path_factory):
    ref, model = _models("qwen2", tmp_path_factory)
    ids, mask = padded_batch()
    ours = gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[],
                        pad_token_id=FILL, no_repeat_ngram_size=2)
    unused = next(i for i in range(4, ref.config.vocab_size) if i not in ours)
    theirs = hf_generate(ref, ids, mask, do_sample=False, eos_token_id=unused,
                         no_repeat_ngram_size=2)
    np.testing.assert_array_equal(ours, theirs)
    plain = hf_generate(ref, ids, mask, do_sample=False, eos_token_id=unused)
    # No generated token completes a bigram seen before in its row (the prompt's columns
    # included, as in HF), while plain greedy decoding repeats some.
    def repeats(tokens):
        count = 0
        for row in np.concatenate([ids, tokens], 1).tolist():
            bigrams = list(zip(row, row[1:], strict=False))
            count += sum(bigrams[j] in bigrams[:j] for j in range(ids.shape[1] - 1, len(bigrams)))
        return count

    assert repeats(ours) == 0 and repeats(plain) > 0


def test_samples_share_one_prefill(tmp_path_factory):
    _, model = _models("qwen2", tmp_path_factory)
    ids, mask = padded_batch()
    kwargs = dict(max_new_tokens=NEW, eos_token_id=[], pad_token_id=FILL, do_sample=True,
                  temperature=0.9, top_p=0.95, rng=jax.random.key(4))
    ours = gen.generate(model, ids, mask, num_return_sequences=4, **kwargs)
    assert ours.shape == (12, NEW)
    # The same as four copies of every prompt (what HF does), grouped by prompt.
    copies = gen.generate(model, np.repeat(ids, 4, 0), np.repeat(mask, 4, 0), **kwargs)
    np.testing.assert_array_equal(ours, copies)
    assert len({tuple(r) for r in ours[:4].tolist()}) == 4  # four different samples


def test_rejects_bad_settings(tmp_path_factory):
    _, model = _models("qwen2", tmp_path_factory)
    ids, mask = padded_batch()
    bad = [
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 must be <= "),
        (dict(num_return_sequences=2), "greedy decoding returns one sequence"),
        (dict(num_beams=2, early_stopping="sometimes"), "choose True, False or 'never'"),
        (dict(num_beams=2, do_sample=True, rng=jax.random.key(0)), "needs num_beams=1"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            gen.generate(model, ids, mask, max_new_tokens=4, pad_token_id=FILL, **kwargs)
