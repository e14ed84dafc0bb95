"""Science checks: two published statements about transformers at initialization, tested
under the papers' own assumptions, and shown to fail on broken models.

Each check is a function in ``tga.science`` that measures a model and returns a
``CheckResult``; ``tga.science.CHECK_CASES`` names each check's setting, and
``tga.science.MUTANTS`` the broken models (one definition, shared with
benchmarks/science_mutation_table.py, which runs every check on every mutant for
docs/science.md). A mutant is applied to the built model inside the test (forward hooks
or the block's own switches), never to the library code. The tests here run the rows that
carry each check's content:

- every check passes on its intact model;
- ``BROKEN``: mutants that break a check's statement make it fail, and for the reason the
  statement gives (Dong's skip check: attention x0 and attention that does not mix
  tokens, at Pre-LN and at Post-LN; Lemma 2 Pre-LN: FFN or attention off by 5%);
- ``BLIND``: mutants the statement cannot see (Post-LN Lemma 2 and attention, noise of
  the FFN's variance, pure attention at any scale) leave the check passing, as
  ``CHECK_CASES`` says they must: a check that failed there would measure something else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tga.science import (
    BRANCH_RATIO_RANGE,
    CHECK_CASE_BY_NAME,
    CHECK_CASES,
    DONG_PROBE,
    MAX_PURE_KEPT,
    MIN_KEPT,
    MUTANT_BY_NAME,
    MUTANTS,
    attention_distance_from_uniform,
    build_lemma2,
    check_dong_skip_keeps_rank,
    lemma2_config,
    prefix_mean,
    relative_residual,
    run_case,
)

# W^Q, W^K multipliers of Xavier's std for the pure-attention check: 0 is uniform attention
# (Lemma 2's assumption), 4 puts most weight on few keys (distance from uniform ~0.7).
SHARPNESS = (0.0, 1.0, 2.0, 4.0)


@pytest.fixture(autouse=True)
def one_thread():
    """The matmuls are tiny; on a busy 2-core machine two threads only add hand-off time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------- the measures themselves


def test_relative_residual_closed_forms():
    torch.manual_seed(0)
    row = torch.randn(1, 16)
    assert relative_residual(row.expand(10, 16)).item() == pytest.approx(0.0, abs=1e-12)  # rank one: 1 x^T
    centred = torch.randn(10, 16)
    centred -= centred.mean(0)
    assert relative_residual(centred).item() == pytest.approx(1.0)  # nothing common to remove
    x = torch.randn(3, 10, 16) + 2.0  # a common offset: 0 < res < 1, invariant to scale
    res = relative_residual(x)
    assert ((res > 0) & (res < 1)).all()
    assert torch.allclose(relative_residual(1000.0 * x), res)
    # the token mean is the Frobenius minimizer: moving x away from it only adds
    other = x - x.mean(-2, keepdim=True) + 0.1
    assert (other.flatten(-2).norm(dim=-1) / x.flatten(-2).norm(dim=-1) > res).all()


def test_prefix_mean_is_what_uniform_causal_attention_averages():
    x = torch.arange(12.0).view(1, 4, 3)
    expected = torch.stack([x[0, : t + 1].mean(0) for t in range(4)])
    assert torch.allclose(prefix_mean(x)[0], expected)


def test_zero_query_key_gives_uniform_attention_and_scaling_sharpens_it():
    config = lemma2_config("pre", residual=False, mlp=False)
    distances = [attention_distance_from_uniform(build_lemma2(config, s), DONG_PROBE) for s in SHARPNESS]
    assert distances[0] == pytest.approx(0.0, abs=1e-6)  # W^Q = W^K = 0: uniform up to float32 rounding
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] > 0.5, f"the sharpest level must be far from uniform: {distances}"


def test_no_mixing_mutant_keeps_tokens_apart():
    """attention_no_mixing is what its name says: changing token 0 changes no later
    token's output, where intact attention (which averages the prefix) does."""
    build = build_lemma2(lemma2_config("pre", residual=False, mlp=False), 1.0)
    tokens = DONG_PROBE.tokens(0)
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % DONG_PROBE.vocab_size

    def later_tokens_move(model_build) -> bool:
        model = model_build(0)
        with torch.inference_mode():
            a, b = (model(t, return_hidden_states=True).hidden_states[1][:, 1:] for t in (tokens, changed))
        return not torch.allclose(a, b)

    assert later_tokens_move(build)
    assert not later_tokens_move(MUTANT_BY_NAME["attention_no_mixing"].apply(build))


def test_every_blind_entry_names_a_mutant():
    names = {m.name for m in MUTANTS}
    for case in CHECK_CASES:
        assert set(case.blind) <= names, f"{case.name}: {set(case.blind) - names}"


# ----------------------------------------------------------------- each check on its intact model


@pytest.mark.parametrize("case", CHECK_CASES, ids=lambda c: c.name)
def test_check_passes_on_intact_model(case):
    result = run_case(case)
    assert result.passed, result.reason


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("sharpness", SHARPNESS)
def test_dong_pure_attention_loses_rank_geometrically(norm_position: str, sharpness: float):
    case = CHECK_CASE_BY_NAME["dong_pure"]
    build = build_lemma2(lemma2_config(norm_position, residual=False, mlp=False), sharpness)
    result = case.check(build, case.probe)
    assert result.passed, result.reason


@pytest.mark.parametrize("name", ["dong_skip_preln", "dong_skip_postln"])
def test_dong_skip_setting_is_where_the_branch_matters(name: str):
    """The skip check's models have attention branches comparable to the stream, and the
    same weights without skips collapse: the pass above is not won by default."""
    values = run_case(CHECK_CASE_BY_NAME[name]).values
    low, high = BRANCH_RATIO_RANGE
    assert low < values["branch_ratio"][0] < high
    assert values["pure_kept"][-1] < MAX_PURE_KEPT / 10 and np.min(values["kept_min"]) > 2 * MIN_KEPT


def test_postln_skips_do_not_stop_collapse_at_xavier_branch_scale():
    """Post-LN at Xavier scale (branch ~0.8 of the stream): the norm after every sum
    erodes the skip path, and ~16% of the residual is left by block 12. The check says
    so, which is why its Post-LN setting halves W^O (docs/science.md)."""
    result = check_dong_skip_keeps_rank(build_lemma2(lemma2_config("post", mlp=False), 1.0), DONG_PROBE)
    assert not result.passed and "with skips" in result.reason, result.reason
    assert "setting" not in result.reason and "without skips" not in result.reason  # only the skip part fails


# ----------------------------------------------------------------- broken models

# (case, mutant, what the reason must name): each must make its check fail, for that reason
BROKEN = [
    ("xiong_postln", "sublayers_x1000", "block"),
    ("xiong_postln", "residual_removed", "block"),
    ("xiong_postln", "pre_post_swapped", "block"),
    ("xiong_postln", "mlp_x0.95", "x^post,5"),
    ("xiong_postln", "mlp_x1.05", "x^post,5"),
    ("xiong_preln", "sublayers_x1000", "term"),
    ("xiong_preln", "residual_removed", "term"),
    ("xiong_preln", "pre_post_swapped", "term"),
    ("xiong_preln", "input_variance_x2", "premise"),
    ("xiong_preln", "attention_sharpened", "attention term"),
    ("xiong_preln", "attention_no_mixing", "attention term"),
    ("xiong_preln", "attention_x0.95", "attention term"),
    ("xiong_preln", "attention_x1.05", "attention term"),
    ("xiong_preln", "mlp_x0.95", "ffn term"),
    ("xiong_preln", "mlp_x1.05", "ffn term"),
    ("dong_pure", "residual_restored", "rate"),
    ("dong_pure", "attention_x0", "outputs zero"),
    ("dong_pure", "attention_no_mixing", "grows"),
    ("dong_skip_preln", "attention_x0", "without skips a layer outputs zero"),
    ("dong_skip_preln", "attention_no_mixing", "does not mix tokens"),
    ("dong_skip_preln", "residual_removed", "with skips"),
    ("dong_skip_preln", "pre_post_swapped", "with skips"),
    ("dong_skip_postln", "attention_x0", "without skips a layer outputs zero"),
    ("dong_skip_postln", "attention_no_mixing", "does not mix tokens"),
    ("dong_skip_postln", "residual_removed", "with skips"),
    ("dong_skip_postln", "sublayers_x1000", "setting"),
]


@pytest.mark.parametrize("case_name, mutant_name, reason", BROKEN, ids=[f"{c}-{m}" for c, m, _ in BROKEN])
def test_check_fails_on_broken_model(case_name: str, mutant_name: str, reason: str) -> None:
    case = CHECK_CASE_BY_NAME[case_name]
    assert mutant_name not in case.blind, "a row here must be a mutant that breaks the statement"
    broken = run_case(case, MUTANT_BY_NAME[mutant_name])  # the intact model passes: test above
    assert not broken.passed, f"{case_name} still passes with {mutant_name}: {broken.reason}"
    assert reason in broken.reason, broken.reason


# (case, mutant): the statement cannot see these; CHECK_CASES says why
BLIND = [
    ("xiong_postln", "attention_x0"),
    ("xiong_postln", "attention_no_mixing"),
    ("xiong_postln", "mlp_noise"),
    ("xiong_preln", "mlp_noise"),
    ("dong_pure", "sublayers_x1000"),
    ("dong_pure", "pre_post_swapped"),
    ("dong_skip_preln", "attention_x0.5"),
    ("dong_skip_postln", "pre_post_swapped"),
]


@pytest.mark.parametrize("case_name, mutant_name", BLIND, ids=[f"{c}-{m}" for c, m in BLIND])
def test_check_is_blind_where_the_statement_is(case_name: str, mutant_name: str) -> None:
    case = CHECK_CASE_BY_NAME[case_name]
    assert mutant_name in case.blind
    result = run_case(case, MUTANT_BY_NAME[mutant_name])
    assert result.passed, f"{case_name} fails on {mutant_name} ({case.blind[mutant_name]}): {result.reason}"
