"""Checks of two published statements about transformers at initialization, each a
function that measures a model and returns a :class:`CheckResult`.

- Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture", Lemma 2.
  Setting: Xavier init without depth scaling, W^Q = W^K = 0 (uniform attention), a ReLU
  FFN of width d, inputs with E||x_0||^2 = d. Post-LN: E||x^{post,5}_l||^2 = 3d/2 at every
  block l (x^{post,5} is the sum *before* the block's last norm). Pre-LN:
  (1 + l/2) d <= E||x_l||^2 <= (1 + 3l/2) d for every l, which the lemma's proof builds
  from two per-block terms that the Pre-LN check also tests: the attention sublayer adds
  E||y_bar||^2 (y_bar: the mean of the normalized tokens it averages) and the FFN d/2.
- Dong, Cordonnier & Loukas 2021, "Attention is not all you need": without skip
  connections self-attention drives the token matrix X to rank one, measured by the
  relative residual ||X - 1 x^T|| / ||X||; skip connections stop this. The skip check is
  a contrast on one model: its attention layers, with the skips taken away, collapse; with
  them, at a branch scale comparable to the stream, they keep the rank.

Every tested quantity is read from the model's own forward pass (``return_prenorm_sums``)
before any norm, so no check holds by construction (the Pre-LN attention's normalized
input is read too, as the reference for the attention term). The checks take a ``build(seed) ->
Transformer`` callable, so that a test can break the model it returns: :data:`MUTANTS`
are the broken models (attention x0, attention that does not mix tokens, MLP x0.95, ...),
and :data:`CHECK_CASES` names each check's setting and the mutants its statement cannot
see, with the reason. tests/test_science.py and benchmarks/science_mutation_table.py run
both through the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import stats
from torch import nn

from tga.model import ModelConfig, ModelOutput, Transformer

Build = Callable[[int], Transformer]
Mutation = Callable[[Build], Build]


@dataclass(frozen=True)
class Probe:
    """Random token sequences fed to each seed's model; the seed sets both the init
    (``build(seed)``) and the tokens, so the spread over seeds covers both, as the
    lemma's expectation over input and initialization does."""

    seeds: tuple[int, ...] = tuple(range(32))
    batch: int = 4
    seq: int = 16
    vocab_size: int = 256

    def tokens(self, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(10_000 + seed)
        return torch.randint(0, self.vocab_size, (self.batch, self.seq), generator=generator)


LEMMA_PROBE = Probe()  # 32 seeds: the lemma's spread is per seed (see MAX_RELATIVE_HALF_WIDTH)
DONG_PROBE = Probe(seeds=tuple(range(8)))  # rank collapse is orders of magnitude, not percent


@dataclass(frozen=True)
class CheckResult:
    """Whether the measurement agrees with the paper's statement, the per-block numbers
    behind that verdict, and a one-line reason (what failed, with numbers)."""

    name: str
    passed: bool
    reason: str
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def __bool__(self) -> bool:  # a CheckResult is never mistaken for a pass by truthiness
        raise TypeError("use CheckResult.passed")


# ----------------------------------------------------------------- the papers' settings


def lemma2_config(norm_position: str, *, n_layer: int = 12, n_embd: int = 64, n_head: int = 4,
                  vocab_size: int = 256, block_size: int = 16, **overrides: object) -> ModelConfig:
    """Xiong et al.'s setting through ordinary config keys: Xavier init without the
    1/sqrt(2L) scaling, a ReLU FFN of width d, LayerNorm, and unit-variance input
    (embeddings N(0, 1/d) times sqrt(d)). Rotary positions add nothing to x_0, so
    E||x_0||^2 = d exactly; with W^Q = W^K = 0 rotation has nothing to act on."""
    settings: dict[str, object] = dict(
        vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        norm_position=norm_position, norm="layernorm", activation="relu", mlp_hidden=n_embd,
        init="xavier", scale_embeddings=True, position_encoding="rope", dropout=0.0,
    )
    return ModelConfig(**{**settings, **overrides})


@torch.no_grad()
def scale_query_key_(model: Transformer, factor: float) -> Transformer:
    """Multiply every W^Q and W^K by ``factor`` (in place). ``factor = 0`` is Lemma 2's
    assumption W^Q = W^K = 0: all scores are 0, so causal attention is uniform over the
    prefix. Larger factors sharpen attention (scores scale with factor^2)."""
    d = model.config.n_embd
    for block in model.blocks:
        block.attn.qkv.weight[: 2 * d].mul_(factor)
        if block.attn.qkv.bias is not None:
            block.attn.qkv.bias[: 2 * d].mul_(factor)
    return model


@torch.no_grad()
def scale_attention_output_(model: Transformer, factor: float) -> Transformer:
    """Multiply every attention output projection W^O by ``factor`` (in place): sets the
    attention branch's size relative to the stream it joins (Dong et al.'s bound has the
    weights' norms as a free parameter), without touching the pattern of attention."""
    for block in model.blocks:
        block.attn.proj.weight.mul_(factor)
    return model


def build_lemma2(config: ModelConfig, query_key_scale: float = 0.0, output_scale: float = 1.0) -> Build:
    """``build(seed)``: the model of ``config`` at init (eval mode), seeded, with W^Q and
    W^K scaled by ``query_key_scale`` (0 = the lemma's uniform attention) and W^O by
    ``output_scale``."""

    def build(seed: int) -> Transformer:
        torch.manual_seed(seed)
        model = scale_query_key_(Transformer(config).eval(), query_key_scale)
        return scale_attention_output_(model, output_scale) if output_scale != 1.0 else model

    return build


# ----------------------------------------------------------------- measurements


def relative_residual(x: torch.Tensor) -> torch.Tensor:
    """Dong et al.'s res(X) / ||X|| for each (tokens x d) matrix in ``x`` (..., T, d).

    res(X) = X - 1 x^T with x minimizing the norm of the difference. We use the Frobenius
    norm, whose minimizer is the token mean; the paper's theorem uses the composite
    ||.||_{1,inf} norm, whose minimizer has no closed form. 0 = all tokens identical;
    NaN for X = 0 (a layer that outputs nothing has no rank to keep or lose)."""
    x = x.double()
    centred = x - x.mean(dim=-2, keepdim=True)
    return centred.flatten(-2).norm(dim=-1) / x.flatten(-2).norm(dim=-1)


def prenorm_stream(out: ModelOutput) -> list[torch.Tensor]:
    """x_0, then each block's last sum before a norm: Post-LN's x^{post,5} (x^{post,2}
    without an MLP), Pre-LN's residual stream. Nothing here has passed through a norm
    since its sum was formed."""
    assert out.hidden_states is not None and out.prenorm_sums is not None, "forward with both flags"
    return [out.hidden_states[0]] + [s.mlp if s.mlp is not None else s.attention for s in out.prenorm_sums]


def _forward(model: Transformer, tokens: torch.Tensor) -> tuple[ModelOutput, list[torch.Tensor]]:
    """The forward pass with hidden states and pre-norm sums, and each block's attention
    input (after its norm in Pre-LN), captured by a hook."""
    inputs: list[torch.Tensor] = []
    handles = [b.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for b in model.blocks]
    try:
        with torch.inference_mode():
            out = model(tokens, return_hidden_states=True, return_prenorm_sums=True)
    finally:
        for handle in handles:
            handle.remove()
    return out, inputs


def squared_norm_by_depth(build: Build, probe: Probe) -> np.ndarray:
    """E||x_l||^2 / d per seed (rows) and depth l = 0..L (columns), on the stream before
    any norm (:func:`prenorm_stream`), averaged over every token of the probe."""
    rows = []
    for seed in probe.seeds:
        model = build(seed)
        stream = prenorm_stream(_forward(model, probe.tokens(seed))[0])
        rows.append([h.double().pow(2).sum(-1).mean().item() / model.config.n_embd for h in stream])
    return np.array(rows)


def prefix_mean(x: torch.Tensor) -> torch.Tensor:
    """Row t = the mean of tokens 0..t of ``x`` (..., T, d): what causal attention with
    W^Q = W^K = 0 (uniform over the prefix) averages, before W^V W^O."""
    count = torch.arange(1, x.size(-2) + 1, dtype=x.dtype, device=x.device).unsqueeze(-1)
    return x.cumsum(dim=-2) / count


def preln_block_terms(build: Build, probe: Probe) -> dict[str, np.ndarray]:
    """The terms of Lemma 2's Pre-LN proof, per seed (rows) and block (columns), each in
    units of d and averaged over the probe's tokens:

    - ``stream``: E||x_l||^2 / d for l = 0..L (L + 1 columns);
    - ``attention``: ||x^{pre,3}_l - x_{l-1}||^2, the attention branch read as the
      stream's increment;
    - ``attention_expected``: ||y_bar_l||^2, y_bar the prefix mean of the attention's
      input; with W^Q = W^K = 0 and Xavier W^V, W^O, E||y_bar W^V W^O||^2 = ||y_bar||^2;
    - ``ffn``: ||x_l - x^{pre,3}_l||^2, the FFN branch (the lemma: d/2)."""
    rows: dict[str, list[list[float]]] = {"stream": [], "attention": [], "attention_expected": [], "ffn": []}
    for seed in probe.seeds:
        model = build(seed)
        d = model.config.n_embd
        out, attention_inputs = _forward(model, probe.tokens(seed))

        def per_token(t: torch.Tensor) -> float:
            return t.double().pow(2).sum(-1).mean().item() / d

        rows["stream"].append([per_token(h) for h in prenorm_stream(out)])
        rows["attention"].append([per_token(s.attention - x) for x, s in zip(out.hidden_states, out.prenorm_sums)])
        rows["attention_expected"].append([per_token(prefix_mean(y.double())) for y in attention_inputs])
        rows["ffn"].append([per_token(s.mlp - s.attention) if s.mlp is not None else 0.0 for s in out.prenorm_sums])
    return {key: np.array(value) for key, value in rows.items()}


def residual_by_depth(build: Build, probe: Probe) -> np.ndarray:
    """Relative residual per seed (rows) and depth l = 0..L, on the stream before any norm,
    averaged over the probe's sequences (each sequence is one X)."""
    rows = []
    for seed in probe.seeds:
        stream = prenorm_stream(_forward(build(seed), probe.tokens(seed))[0])
        rows.append([relative_residual(h).mean().item() for h in stream])
    return np.array(rows)


def attention_distance_from_uniform(build: Build, probe: Probe) -> float:
    """How far attention is from Lemma 2's uniform case: the total-variation distance
    between each attention row and the uniform distribution over its causal prefix,
    averaged over rows 1..T-1 (row 0 has one key), heads, layers and seeds. 0 = uniform;
    near 1 = each query puts almost all weight on one key."""
    distances = []
    for seed in probe.seeds:
        model = build(seed)
        _, inputs = _forward(model, probe.tokens(seed))
        for block, x in zip(model.blocks, inputs):
            probs = block.attn.attention_probs(x).double()  # (B, H, T, T)
            seq = probs.size(-1)
            uniform = prefix_mean(torch.eye(seq, dtype=torch.float64))
            distances.append(0.5 * (probs - uniform).abs().sum(-1)[..., 1:].mean().item())
    return float(np.mean(distances))


def branch_to_stream_ratio(build: Build, probe: Probe) -> float:
    """||attention branch|| / ||stream it is added to||, Frobenius over each block's input,
    averaged over blocks and seeds: the branch scale a skip-connection claim was tested at."""
    ratios = []
    for seed in probe.seeds:
        out, _ = _forward(build(seed), probe.tokens(seed))
        for x, sums in zip(out.hidden_states, out.prenorm_sums):
            ratios.append(((sums.attention - x).double().norm() / x.double().norm()).item())
    return float(np.mean(ratios))


def _t_quantile(n_seeds: int, n_tests: int, alpha: float) -> float:
    """Two-sided Student-t quantile, Bonferroni-corrected over ``n_tests`` comparisons."""
    return float(stats.t.ppf(1.0 - alpha / (2 * n_tests), n_seeds - 1))


def _mean_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])


def _t_interval(values: np.ndarray, n_tests: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Seed mean (over rows) and its Student-t half width, Bonferroni over ``n_tests``."""
    mean, se = _mean_se(values)
    return mean, _t_quantile(values.shape[0], n_tests, alpha) * se


# ----------------------------------------------------------------- Xiong et al. 2020, Lemma 2

ALPHA = 0.01  # family-wise error rate of each check's comparisons
# Widest per-block interval, relative to 3/2, that still tests the lemma: +-10% tells 1.5
# from the 1.35 or 1.65 of a 10% error, and a broken (e.g. exploding) model cannot pass
# on a wide interval. The spread is per seed, not per token: every token shares the FFN
# output's mean direction (ReLU outputs have a nonzero mean), so one seed gives one
# sample of how W^1, W^2 meet that direction; more tokens do not narrow it, more seeds do.
MAX_RELATIVE_HALF_WIDTH = 0.10
# Widest interval, in units of d, on the mean over blocks of a Pre-LN proof term: +-0.025
# is 5% of the FFN's d/2. Measured at 32 seeds: +-0.012 (FFN) and +-0.015 (attention).
MAX_POOLED_HALF_WIDTH = 0.025


def check_xiong_lemma2_postln(build: Build, probe: Probe, alpha: float = ALPHA) -> CheckResult:
    """E||x^{post,5}_l||^2 / d = 3/2 at every block l: each block's seed mean must lie
    within t * SE of 3/2 (Student t over seeds, Bonferroni over blocks), with intervals no
    wider than +-10% of 3/2; and the mean over blocks (one number per seed, so a narrower
    interval) must too. Why 3/2: x^{post,3} = LN(x^{post,2}) has squared norm d, and a
    Xavier ReLU FFN of width d adds an independent term with E||.||^2 = d/2. The lemma
    says nothing about attention: LN(x^{post,2}) has squared norm d whatever attention did."""
    sq = squared_norm_by_depth(build, probe)[:, 1:]
    n_blocks = sq.shape[1]
    mean, half = _t_interval(sq, n_blocks, alpha)
    pooled_mean, pooled_half = _t_interval(sq.mean(axis=1, keepdims=True), 1, alpha)
    values = {"mean": mean, "half_width": half, "pooled": np.array([pooled_mean[0], pooled_half[0]])}
    name = "xiong_lemma2_postln"
    if not np.all(np.isfinite(sq)):
        return CheckResult(name, False, "non-finite squared norms", values)
    gap = np.abs(mean - 1.5) - half
    if np.any(gap > 0):
        worst = int(np.argmax(gap))
        return CheckResult(name, False, f"block {worst + 1}: E||x^post,5||^2/d = {mean[worst]:.4g} "
                           f"+- {half[worst]:.2g}, lemma 1.5", values)
    if np.any(half > MAX_RELATIVE_HALF_WIDTH * 1.5):
        worst = int(np.argmax(half))
        return CheckResult(name, False, f"too noisy to test: block {worst + 1} interval +-{half[worst]:.3g} "
                           f"> {MAX_RELATIVE_HALF_WIDTH * 1.5:.3g}", values)
    if abs(pooled_mean[0] - 1.5) > pooled_half[0]:
        return CheckResult(name, False, f"mean over blocks {pooled_mean[0]:.4g} +- {pooled_half[0]:.2g}, lemma 1.5",
                           values)
    return CheckResult(name, True, f"blocks 1..{n_blocks}: E||x^post,5||^2/d in [{mean.min():.3f}, {mean.max():.3f}] "
                       f"(+-{half.max():.3f}); mean over blocks {pooled_mean[0]:.4f} +- {pooled_half[0]:.4f}", values)


def check_xiong_lemma2_preln(build: Build, probe: Probe, alpha: float = ALPHA) -> CheckResult:
    """Lemma 2 for Pre-LN, as its proof builds it, in three parts:

    1. the premise E||x_0||^2 = d (unit-variance input), within t * SE;
    2. each block's two terms, the stream's increment over each sublayer: attention adds
       E||y_bar_l||^2 (uniform attention averages the normalized tokens of the prefix,
       and Xavier W^V, W^O keep the squared norm in expectation) and the FFN d/2. Tested
       per block (Bonferroni over 2L) and as the mean over blocks (one number per seed,
       an interval of +-0.012 to +-0.015 d at 32 seeds, which no more than
       ``MAX_POOLED_HALF_WIDTH`` may be). A 5% error in either sublayer's output
       (a 10% error in its squared norm) falls outside it;
    3. the lemma's bounds (1 + l/2) <= E||x_l||^2 / d <= (1 + 3l/2), the whole t * SE
       interval inside, at every l >= 1.

    Part 2 is what gives the check its power: the bounds alone pass an FFN x0.85..1.2 or
    attention x0.5..1.15. Neither part can see an FFN replaced by noise of the FFN's
    variance: the lemma is about second moments only."""
    terms = preln_block_terms(build, probe)
    name = "xiong_lemma2_preln"
    sq = terms["stream"]
    n_blocks = sq.shape[1] - 1
    mean, half = _t_interval(sq, n_blocks + 1, alpha)
    depth = np.arange(sq.shape[1])
    lower, upper = 1 + depth / 2, 1 + 3 * depth / 2
    excess = {"attention": terms["attention"] - terms["attention_expected"], "ffn": terms["ffn"] - 0.5}
    intervals = {key: _t_interval(value, 2 * n_blocks, alpha) for key, value in excess.items()}
    pooled = {key: _t_interval(value.mean(axis=1, keepdims=True), 2, alpha) for key, value in excess.items()}
    values = {"mean": mean, "half_width": half, "lower": lower, "upper": upper,
              **{f"{key}_excess": m for key, (m, _) in intervals.items()},
              **{f"{key}_excess_half_width": h for key, (_, h) in intervals.items()},
              **{f"{key}_pooled": np.array([m[0], h[0]]) for key, (m, h) in pooled.items()},
              "attention_expected": terms["attention_expected"].mean(axis=0)}
    if not all(np.all(np.isfinite(v)) for v in terms.values()):
        return CheckResult(name, False, "non-finite squared norms", values)
    if abs(mean[0] - 1) > half[0]:
        return CheckResult(name, False, f"premise: E||x_0||^2/d = {mean[0]:.4g} +- {half[0]:.2g}, not 1", values)
    expected = {"attention": "E||y_bar||^2/d", "ffn": "1/2"}
    for key, (m, h) in intervals.items():
        gap = np.abs(m) - h
        if np.any(gap > 0):
            l = int(np.argmax(gap))
            return CheckResult(name, False, f"block {l + 1}: {key} term {expected[key]} {m[l]:+.3g} +- {h[l]:.2g}",
                               values)
    for key, (m, h) in pooled.items():
        if h[0] > MAX_POOLED_HALF_WIDTH:
            return CheckResult(name, False, f"too noisy to test: {key} term, mean over blocks +-{h[0]:.3g} "
                               f"> {MAX_POOLED_HALF_WIDTH}", values)
        if abs(m[0]) > h[0]:
            return CheckResult(name, False, f"mean over blocks: {key} term {expected[key]} {m[0]:+.3g} +- {h[0]:.2g}",
                               values)
    # how far each block's interval reaches outside its bounds (> 0 = outside), in units of d
    outside = np.maximum(lower - (mean - half), (mean + half) - upper)[1:]
    if np.any(outside > 0):
        l = 1 + int(np.argmax(outside))
        return CheckResult(name, False, f"block {l}: E||x_l||^2/d = {mean[l]:.4g} +- {half[l]:.2g} outside "
                           f"[{lower[l]:g}, {upper[l]:g}]", values)
    (attention, attention_half), (ffn, ffn_half) = (pooled[key] for key in ("attention", "ffn"))
    return CheckResult(name, True, f"terms, mean over blocks: attention {attention[0]:+.3f} +- {attention_half[0]:.3f}, "
                       f"FFN {ffn[0]:+.3f} +- {ffn_half[0]:.3f}; block {depth[-1]}: {mean[-1]:.3f} in "
                       f"[{lower[-1]:g}, {upper[-1]:g}]", values)


# ----------------------------------------------------------------- Dong et al. 2021

FLOAT_FLOOR = 1e-5  # below this relative residual float32 rounding dominates the ratio
MAX_MEAN_RATE = 0.8  # pure attention must shrink the residual by >= 20% per layer on average
MIN_KEPT = 0.2  # "no collapse": every seed keeps >= 20% of its input residual at every depth
MAX_PURE_KEPT = 0.05  # "collapse": without skips, the seed mean keeps <= 5% by the last layer
# The branch scales at which "skips prevent collapse" says something: with a branch far
# below the stream, the skip path trivially dominates; far above it, the skip is noise.
BRANCH_RATIO_RANGE = (0.1, 10.0)


def check_dong_pure_attention_collapse(build: Build, probe: Probe, max_rate: float = MAX_MEAN_RATE) -> CheckResult:
    """Pure attention (no skip, no MLP): the relative residual (seed mean) shrinks at every
    layer (ratio < 1; layers already under float32's floor are not rated), and at least
    geometrically: (res_L / res_0)^(1/L) <= ``max_rate``. Sharp attention starts slowly
    (a query that attends to one key averages nothing) and speeds up as tokens align,
    so the check bounds the average rate, not the first layer's."""
    res = residual_by_depth(build, probe)
    mean = res.mean(axis=0)
    n_layer = len(mean) - 1
    ratios = mean[1:] / mean[:-1]
    rate = float((mean[-1] / mean[0]) ** (1 / n_layer))
    values = {"mean": mean, "ratio": ratios, "rate": np.array([rate])}
    name = "dong_pure_attention"
    if not np.all(np.isfinite(res)):
        return CheckResult(name, False, "non-finite residuals (a layer outputs zero or overflows)", values)
    growing = (mean[:-1] > FLOAT_FLOOR) & (ratios >= 1)
    if growing.any():
        l = int(np.argmax(growing))
        return CheckResult(name, False, f"layer {l + 1}: residual grows {mean[l]:.3g} -> {mean[l + 1]:.3g}", values)
    if rate > max_rate:
        return CheckResult(name, False, f"mean rate per layer {rate:.3f} > {max_rate} "
                           f"(res {mean[0]:.3g} -> {mean[-1]:.3g} over {n_layer} layers)", values)
    return CheckResult(name, True, f"mean rate {rate:.3f} per layer (largest ratio {ratios.max():.3f}); "
                       f"res_L/res_0 = {mean[-1] / mean[0]:.2e}", values)


def check_dong_skip_keeps_rank(build: Build, probe: Probe, min_kept: float = MIN_KEPT,
                               max_pure_kept: float = MAX_PURE_KEPT) -> CheckResult:
    """Skip connections stop the collapse that the same attention layers cause without
    them. On one model, three parts, all needed:

    1. the setting: the attention branch is comparable to the stream it joins
       (``BRANCH_RATIO_RANGE``, mean over blocks and seeds), so the skip path does not
       win by default;
    2. the same model with every skip removed (same weights) collapses: its seed-mean
       relative residual at the last layer is <= ``max_pure_kept`` of the input's. This
       is the statement's content, attention mixes tokens: attention that is zeroed or
       does not mix tokens fails here;
    3. with the skips, every seed keeps >= ``min_kept`` of its input residual at every
       depth."""
    ratio = branch_to_stream_ratio(build, probe)
    res = residual_by_depth(build, probe)
    pure = residual_by_depth(residual_removed(build), probe)
    kept = res[:, 1:] / res[:, :1]
    pure_kept = pure[:, 1:].mean(axis=0) / pure[:, 0].mean()
    values = {"mean": res.mean(axis=0), "kept": kept.mean(axis=0), "kept_min": kept.min(axis=0),
              "pure_kept": pure_kept, "branch_ratio": np.array([ratio])}
    name = "dong_skip"
    low, high = BRANCH_RATIO_RANGE
    failures = []  # every part that fails, so a broken model's reason says all it broke
    if not low <= ratio <= high:  # also catches NaN
        failures.append(f"setting: attention branch / stream = {ratio:.3g}, outside [{low:g}, {high:g}]")
    if not np.all(np.isfinite(pure)):
        failures.append("without skips a layer outputs zero: no collapse to prevent")
    elif pure_kept[-1] > max_pure_kept:
        failures.append(f"without skips the same layers keep {pure_kept[-1]:.3g} of the residual at layer "
                        f"{len(pure_kept)} (collapse: <= {max_pure_kept}), so attention does not mix tokens")
    if not np.all(np.isfinite(res)):
        failures.append("non-finite residuals with skips")
    elif kept.min() < min_kept:
        seed, l = np.unravel_index(int(np.argmin(kept)), kept.shape)
        failures.append(f"with skips seed {probe.seeds[seed]}, block {l + 1}: res_l/res_0 = "
                        f"{kept[seed, l]:.3g} < {min_kept}")
    if failures:
        return CheckResult(name, False, "; ".join(failures), values)
    return CheckResult(name, True, f"branch/stream {ratio:.2f}; without skips {pure_kept[-1]:.2e} kept; with skips "
                       f"smallest res_l/res_0 {kept.min():.3f} (mean at block {kept.shape[1]}: "
                       f"{kept[:, -1].mean():.3f})", values)


# ----------------------------------------------------------------- broken models
# Mutations of a built model, for showing what each check can and cannot see
# (tests/test_science.py, benchmarks/science_mutation_table.py). They act on the model a
# build returns (forward hooks, the blocks' own switches), never on the library code.


def _mutate(build: Build, change: Callable[[Transformer], None]) -> Build:
    def mutated(seed: int) -> Transformer:
        model = build(seed)
        change(model)
        return model
    return mutated


def _named(name: str, mutation: Mutation) -> Mutation:
    mutation.__name__ = name
    return mutation


def _replace_output(name: str, sublayer: str, output: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> Mutation:
    """A mutation whose every ``sublayer`` ("attn" or "mlp") returns ``output(module,
    input, output)`` instead (a forward hook; blocks without that sublayer are left alone)."""
    def change(model: Transformer) -> None:
        for block in model.blocks:
            module = getattr(block, sublayer)
            if module is not None:
                module.register_forward_hook(lambda m, inputs, out: output(m, inputs[0], out))
    return _named(name, lambda build: _mutate(build, change))


def scaled(sublayer: str, factor: float) -> Mutation:
    """Every ``sublayer`` output multiplied by ``factor``."""
    label = "attention" if sublayer == "attn" else sublayer
    return _replace_output(f"{label}_x{factor:g}", sublayer, lambda _m, _x, out: out * factor)


def sublayers_x1000(build: Build) -> Build:
    """Every attention and MLP output multiplied by 1000."""
    return scaled("mlp", 1000.0)(scaled("attn", 1000.0)(build))


def _no_mixing(module: nn.Module, x: torch.Tensor, _out: torch.Tensor) -> torch.Tensor:
    """Attention in which each token attends only to itself: W^O W^V x_t, token by token."""
    d = x.size(-1)
    return module.proj(module.qkv(x)[..., 2 * d:])


def _ffn_noise(_module: nn.Module, _x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gaussian noise with the lemma's FFN variance (1/2 per coordinate), whatever the input."""
    return torch.randn_like(out) * math.sqrt(0.5)


attention_no_mixing = _replace_output("attention_no_mixing", "attn", _no_mixing)
mlp_noise = _replace_output("mlp_noise", "mlp", _ffn_noise)


def _set_blocks(name: str, attribute: str, value: Callable[[bool], bool]) -> Mutation:
    def change(model: Transformer) -> None:
        for block in model.blocks:
            setattr(block, attribute, value(getattr(block, attribute)))
    return _named(name, lambda build: _mutate(build, change))


residual_removed = _set_blocks("residual_removed", "residual", lambda _: False)
residual_restored = _set_blocks("residual_restored", "residual", lambda _: True)
pre_post_swapped = _set_blocks("pre_post_swapped", "pre", lambda pre: not pre)


def _remove_norms(model: Transformer) -> None:
    for block in model.blocks:
        block.attn_norm = nn.Identity()
        if block.mlp_norm is not None:
            block.mlp_norm = nn.Identity()


@torch.no_grad()
def _sharpen_attention(model: Transformer) -> None:
    """W^Q, W^K redrawn at twice Xavier's std: attention far from uniform (the Dong
    probe's x2 level, TV distance ~0.5)."""
    d = model.config.n_embd
    for block in model.blocks:
        block.attn.qkv.weight[: 2 * d].normal_(0.0, 2.0 / math.sqrt(d))


def _input_variance_x2(model: Transformer) -> None:
    model.token_embedding.register_forward_hook(lambda _m, _i, out: out * math.sqrt(2.0))


norms_removed = _named("norms_removed", lambda build: _mutate(build, _remove_norms))
attention_sharpened = _named("attention_sharpened", lambda build: _mutate(build, _sharpen_attention))
input_variance_x2 = _named("input_variance_x2", lambda build: _mutate(build, _input_variance_x2))


@dataclass(frozen=True)
class Mutant:
    """A broken model: ``apply(build)`` returns the build of the broken version."""

    name: str
    description: str
    apply: Mutation


MUTANTS: tuple[Mutant, ...] = (
    Mutant("sublayers_x1000", "every attention and MLP output x1000", sublayers_x1000),
    Mutant("residual_removed", "every skip connection removed", residual_removed),
    Mutant("residual_restored", "skip connections put back (a model that ignores residual: false)",
           residual_restored),
    Mutant("pre_post_swapped", "norms placed the other way round (Pre-LN <-> Post-LN)", pre_post_swapped),
    Mutant("norms_removed", "the blocks' norms replaced by the identity", norms_removed),
    Mutant("input_variance_x2", "embeddings x sqrt(2): E||x_0||^2 = 2d", input_variance_x2),
    Mutant("attention_sharpened", "W^Q, W^K redrawn at 2x Xavier std: attention far from uniform",
           attention_sharpened),
    Mutant("attention_x0", "attention output x0", scaled("attn", 0.0)),
    Mutant("attention_no_mixing", "each token attends only to itself (W^O W^V x_t)", attention_no_mixing),
    *(Mutant(f"attention_x{c:g}", f"attention output x{c:g}", scaled("attn", c)) for c in (0.5, 0.95, 1.05)),
    Mutant("mlp_x0", "FFN output x0", scaled("mlp", 0.0)),
    *(Mutant(f"mlp_x{c:g}", f"FFN output x{c:g}", scaled("mlp", c)) for c in (0.85, 0.95, 0.98, 1.02, 1.05, 1.2)),
    Mutant("mlp_noise", "FFN replaced by input-independent noise of the lemma's FFN variance (d/2)", mlp_noise),
)
MUTANT_BY_NAME = {mutant.name: mutant for mutant in MUTANTS}


# ----------------------------------------------------------------- each check in its setting

Check = Callable[[Build, Probe], CheckResult]
NO_MLP = "no-op: this setting has no MLP (Dong's statement is about attention)"
POSTLN_ATTENTION = ("expected blind: the lemma says nothing about attention in Post-LN "
                    "(LN(x^{post,2}) has squared norm d whatever attention did)")
SECOND_MOMENTS = "expected blind: the lemma is about second moments, and noise of the FFN's variance has the same"
RANK_SCALE_FREE = "expected blind: res(X) is scale-invariant and the next layer normalizes its input"


@dataclass(frozen=True)
class CheckCase:
    """One check in the setting it is tested at, and the mutants its statement cannot
    see: mutant name -> why (every other mutant breaks the statement, so the check
    should fail on it; where it passes, that is the check's power limit)."""

    name: str
    title: str
    check: Check
    config: ModelConfig
    query_key_scale: float
    probe: Probe
    blind: dict[str, str]
    output_scale: float = 1.0

    def build(self) -> Build:
        return build_lemma2(self.config, self.query_key_scale, self.output_scale)


DONG_SKIP_BLIND = {
    "residual_restored": "no-op: the model has its skips",
    "norms_removed": "expected blind: Dong's statement concerns attention and skips; their model has no norms",
    "input_variance_x2": "expected blind: the first norm removes the input's scale",
    "attention_sharpened": "expected blind: the statement holds for any attention pattern that mixes",
    **{f"attention_x{c:g}": "expected blind: the branch stays comparable to the stream (inside the setting)"
       for c in (0.5, 0.95, 1.05)},
    **{m.name: NO_MLP for m in MUTANTS if m.name.startswith("mlp_")},
}

CHECK_CASES: tuple[CheckCase, ...] = (
    CheckCase("xiong_postln", "Xiong Lemma 2, Post-LN", check_xiong_lemma2_postln, lemma2_config("post"), 0.0,
              LEMMA_PROBE, {
                  "residual_restored": "no-op: the model has its skips",
                  "input_variance_x2": "expected blind: the first norm removes the input's scale",
                  "attention_sharpened": POSTLN_ATTENTION,
                  "attention_x0": POSTLN_ATTENTION,
                  "attention_no_mixing": POSTLN_ATTENTION,
                  "attention_x0.5": POSTLN_ATTENTION,
                  "attention_x0.95": POSTLN_ATTENTION,
                  "attention_x1.05": POSTLN_ATTENTION,
                  "mlp_noise": SECOND_MOMENTS,
              }),
    CheckCase("xiong_preln", "Xiong Lemma 2, Pre-LN", check_xiong_lemma2_preln, lemma2_config("pre"), 0.0,
              LEMMA_PROBE, {
                  "residual_restored": "no-op: the model has its skips",
                  "mlp_noise": SECOND_MOMENTS,
              }),
    CheckCase("dong_pure", "Dong, pure attention collapses", check_dong_pure_attention_collapse,
              lemma2_config("pre", residual=False, mlp=False), 1.0, DONG_PROBE, {
                  "sublayers_x1000": RANK_SCALE_FREE,
                  "residual_removed": "no-op: the model has no skips",
                  "pre_post_swapped": "expected blind: pure attention collapses at either norm placement",
                  "norms_removed": "expected blind: Dong's pure attention has no norms",
                  "input_variance_x2": RANK_SCALE_FREE,
                  "attention_sharpened": "expected blind: the statement holds for any attention pattern that mixes",
                  "attention_x0.5": RANK_SCALE_FREE,
                  "attention_x0.95": RANK_SCALE_FREE,
                  "attention_x1.05": RANK_SCALE_FREE,
                  **{m.name: NO_MLP for m in MUTANTS if m.name.startswith("mlp_")},
              }),
    CheckCase("dong_skip_preln", "Dong, skips keep rank, Pre-LN", check_dong_skip_keeps_rank,
              lemma2_config("pre", mlp=False), 1.0, DONG_PROBE, DONG_SKIP_BLIND),
    # W^O x 0.5: Xavier Post-LN's branch/stream ratio (0.83) becomes 0.34. At 0.83 the norm
    # after every sum shrinks the skip path's share each layer, which leaves ~16% of the
    # residual by block 12: slower than pure attention, but a collapse (docs/science.md).
    CheckCase("dong_skip_postln", "Dong, skips keep rank, Post-LN", check_dong_skip_keeps_rank,
              lemma2_config("post", mlp=False), 1.0, DONG_PROBE, {
                  **DONG_SKIP_BLIND,
                  "pre_post_swapped": "expected blind: Pre-LN keeps rank too (the Pre-LN case)",
              }, output_scale=0.5),
)
CHECK_CASE_BY_NAME = {case.name: case for case in CHECK_CASES}


def run_case(case: CheckCase, mutant: Mutant | None = None) -> CheckResult:
    """``case``'s check on its intact model, or on ``mutant``'s broken version of it."""
    build = case.build()
    return case.check(build if mutant is None else mutant.apply(build), case.probe)
