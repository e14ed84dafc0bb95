"""The context-copy diagnostic's n-gram baseline and cache are proper probabilities."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from context_copy import KneserNeyTrigram, report, window_cache_probability  # noqa: E402


def test_kneser_ney_conditionals_sum_to_one_and_favour_seen_continuations():
    tokens = torch.randint(0, 12, (400,), generator=torch.Generator().manual_seed(0)).tolist() + [3, 4, 5] * 30
    kn = KneserNeyTrigram(tokens, vocab_size=20)
    for context in [(3, 4), (None, 3), (17, 18), (0, 1)]:
        total = sum(kn.trigram(*context, w) for w in range(20))
        assert total == pytest.approx(1.0, abs=1e-9)
    assert kn.trigram(3, 4, 5) > 0.5
    assert 0 < kn.trigram(3, 4, 19) < kn.trigram(3, 4, 5)  # never seen, still possible


def test_window_cache_counts_earlier_inputs_only():
    x = torch.tensor([[7, 8, 7, 9]])
    y = torch.tensor([[8, 7, 9, 7]])
    cache = window_cache_probability(x, y)
    assert cache.tolist() == [[0.0, 1 / 2, 0.0, 2 / 4]]


def test_report_buckets_and_cache_mixing():
    nll = torch.full((1, 4), 5.0, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    cache = torch.tensor([[0.0, 1.0, 0.0, 0.5]], dtype=torch.float64)
    counts = torch.tensor([[0, 0, 50, 0]])
    out = report(nll, mask, cache, counts)
    assert out["ppl"] == pytest.approx(148.4, abs=0.05)
    # the copied token gains far more than the others lose: exp((2*5.22 + 1.58) / 3) = 55
    assert out["ppl_with_cache"]["0.2"] == pytest.approx(55.0, rel=0.02)
    rare = out["buckets"][0]
    assert (rare["n_repeat"], rare["n_first"]) == (1, 1)
    assert out["buckets"][3]["n_first"] == 1 and out["buckets"][3]["n_repeat"] == 0
