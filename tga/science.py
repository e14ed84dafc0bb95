"""Checks of two published statements about transformers at initialization, each a
function that measures a model and returns a :class:`CheckResult`.

- Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture", Lemma 2.
  Setting: Xavier init without depth scaling, W^Q = W^K = 0 (uniform attention), a ReLU
  FFN of width d, inputs with E||x_0||^2 = d. Post-LN: E||x^{post,5}_l||^2 = 3d/2 at every
  block l (x^{post,5} is the sum *before* the block's last norm). Pre-LN:
  (1 + l/2) d <= E||x_l||^2 <= (1 + 3l/2) d for every l.
- Dong, Cordonnier & Loukas 2021, "Attention is not all you need": without skip
  connections and MLPs, self-attention drives the token matrix X to rank one, measured
  by the relative residual ||X - 1 x^T|| / ||X||; skip connections stop this.

Every quantity is read from the model's own forward pass (``return_prenorm_sums``), never
after a norm, so no check holds by construction; tests/test_science.py runs each check on
the intact model and on broken ones (sublayers x1000, residual removed, Pre/Post swapped)
through the same functions. The checks take a ``build(seed) -> Transformer`` callable, so
that a test can break the model it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import stats

from tga.model import ModelConfig, ModelOutput, Transformer

Build = Callable[[int], Transformer]


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


def build_lemma2(config: ModelConfig, query_key_scale: float = 0.0) -> Build:
    """``build(seed)``: the model of ``config`` at init (eval mode), seeded, with W^Q and
    W^K scaled by ``query_key_scale`` (0 = the lemma's uniform attention)."""

    def build(seed: int) -> Transformer:
        torch.manual_seed(seed)
        return scale_query_key_(Transformer(config).eval(), query_key_scale)

    return build


# ----------------------------------------------------------------- measurements


def relative_residual(x: torch.Tensor) -> torch.Tensor:
    """Dong et al.'s res(X) / ||X|| for each (tokens x d) matrix in ``x`` (..., T, d).

    res(X) = X - 1 x^T with x minimizing the norm of the difference. We use the Frobenius
    norm, whose minimizer is the token mean; the paper's theorem uses the composite
    ||.||_{1,inf} norm, whose minimizer has no closed form. 0 = all tokens identical."""
    x = x.double()
    centred = x - x.mean(dim=-2, keepdim=True)
    return centred.flatten(-2).norm(dim=-1) / x.flatten(-2).norm(dim=-1)


def prenorm_stream(out: ModelOutput) -> list[torch.Tensor]:
    """x_0, then each block's last sum before a norm: Post-LN's x^{post,5} (x^{post,2}
    without an MLP), Pre-LN's residual stream. Nothing here has passed through a norm
    since its sum was formed."""
    assert out.hidden_states is not None and out.prenorm_sums is not None, "forward with both flags"
    return [out.hidden_states[0]] + [s.mlp if s.mlp is not None else s.attention for s in out.prenorm_sums]


def _forward(model: Transformer, tokens: torch.Tensor) -> ModelOutput:
    with torch.inference_mode():
        return model(tokens, return_hidden_states=True, return_prenorm_sums=True)


def squared_norm_by_depth(build: Build, probe: Probe) -> np.ndarray:
    """E||x_l||^2 / d per seed (rows) and depth l = 0..L (columns), on the stream before
    any norm (:func:`prenorm_stream`), averaged over every token of the probe."""
    rows = []
    for seed in probe.seeds:
        model = build(seed)
        stream = prenorm_stream(_forward(model, probe.tokens(seed)))
        rows.append([h.double().pow(2).sum(-1).mean().item() / model.config.n_embd for h in stream])
    return np.array(rows)


def residual_by_depth(build: Build, probe: Probe) -> np.ndarray:
    """Relative residual per seed (rows) and depth l = 0..L, on the stream before any norm,
    averaged over the probe's sequences (each sequence is one X)."""
    rows = []
    for seed in probe.seeds:
        stream = prenorm_stream(_forward(build(seed), probe.tokens(seed)))
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
        inputs: list[torch.Tensor] = []
        handles = [b.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for b in model.blocks]
        try:
            _forward(model, probe.tokens(seed))
        finally:
            for handle in handles:
                handle.remove()
        for block, x in zip(model.blocks, inputs):
            probs = block.attn.attention_probs(x).double()  # (B, H, T, T)
            seq = probs.size(-1)
            prefix = torch.arange(1, seq + 1, dtype=torch.float64).view(seq, 1)
            uniform = torch.ones(seq, seq, dtype=torch.float64).tril() / prefix
            distances.append(0.5 * (probs - uniform).abs().sum(-1)[..., 1:].mean().item())
    return float(np.mean(distances))


def branch_to_stream_ratio(build: Build, probe: Probe) -> float:
    """||attention branch|| / ||stream it is added to||, Frobenius over each block's input,
    averaged over blocks and seeds: the branch scale a skip-connection claim was tested at."""
    ratios = []
    for seed in probe.seeds:
        out = _forward(build(seed), probe.tokens(seed))
        for x, sums in zip(out.hidden_states, out.prenorm_sums):
            ratios.append(((sums.attention - x).double().norm() / x.double().norm()).item())
    return float(np.mean(ratios))


def _t_quantile(n_seeds: int, n_tests: int, alpha: float) -> float:
    """Two-sided Student-t quantile, Bonferroni-corrected over ``n_tests`` blocks."""
    return float(stats.t.ppf(1.0 - alpha / (2 * n_tests), n_seeds - 1))


def _mean_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])


# ----------------------------------------------------------------- Xiong et al. 2020, Lemma 2

ALPHA = 0.01  # family-wise error rate of each check's per-block comparisons
# Widest per-block interval, relative to 3/2, that still tests the lemma: +-10% tells 1.5
# from the 1.35 or 1.65 of a 10% error, and a broken (e.g. exploding) model cannot pass
# on a wide interval. The spread is per seed, not per token: every token shares the FFN
# output's mean direction (ReLU outputs have a nonzero mean), so one seed gives one
# sample of how W^1, W^2 meet that direction; more tokens do not narrow it, more seeds do.
MAX_RELATIVE_HALF_WIDTH = 0.10


def check_xiong_lemma2_postln(build: Build, probe: Probe, alpha: float = ALPHA) -> CheckResult:
    """E||x^{post,5}_l||^2 / d = 3/2 at every block l: each block's seed mean must lie
    within t * SE of 3/2 (Student t over seeds, Bonferroni over blocks), with intervals no
    wider than +-10% of 3/2; and the mean over blocks (one number per seed, so a narrower
    interval) must too. Why 3/2: x^{post,3} = LN(x^{post,2}) has squared norm d, and a
    Xavier ReLU FFN of width d adds an independent term with E||.||^2 = d/2."""
    sq = squared_norm_by_depth(build, probe)[:, 1:]
    n_seeds, n_blocks = sq.shape
    mean, se = _mean_se(sq)
    half = _t_quantile(n_seeds, n_blocks, alpha) * se
    pooled_mean, pooled_se = _mean_se(sq.mean(axis=1, keepdims=True))
    pooled_half = _t_quantile(n_seeds, 1, alpha) * pooled_se
    values = {"mean": mean, "se": se, "half_width": half,
              "pooled": np.array([pooled_mean[0], pooled_half[0]])}
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
    """(1 + l/2) <= E||x_l||^2 / d <= (1 + 3l/2) at every l >= 1, with the whole t * SE
    interval inside the bounds; and the premise E||x_0||^2 = d (unit-variance input), to
    within the same interval. Why: each block adds, independently of the stream, an
    attention term between 0 and d (the squared norm of an average of normalized tokens)
    and an FFN term of d/2."""
    sq = squared_norm_by_depth(build, probe)
    mean, se = _mean_se(sq)
    half = _t_quantile(len(probe.seeds), sq.shape[1], alpha) * se
    depth = np.arange(sq.shape[1])
    lower, upper = 1 + depth / 2, 1 + 3 * depth / 2
    values = {"mean": mean, "se": se, "half_width": half, "lower": lower, "upper": upper}
    if not np.all(np.isfinite(mean)):
        return CheckResult("xiong_lemma2_preln", False, "non-finite squared norms", values)
    if abs(mean[0] - 1) > half[0]:
        return CheckResult("xiong_lemma2_preln", False,
                           f"premise: E||x_0||^2/d = {mean[0]:.4g} +- {half[0]:.2g}, not 1", values)
    # how far each block's interval reaches outside its bounds (> 0 = outside), in units of d
    outside = np.maximum(lower - (mean - half), (mean + half) - upper)[1:]
    if np.any(outside > 0):
        l = 1 + int(np.argmax(outside))
        return CheckResult("xiong_lemma2_preln", False,
                           f"block {l}: E||x_l||^2/d = {mean[l]:.4g} +- {half[l]:.2g} outside [{lower[l]:g}, {upper[l]:g}]",
                           values)
    return CheckResult("xiong_lemma2_preln", True,
                       f"every block inside its bounds; block {depth[-1]}: {mean[-1]:.3f} in [{lower[-1]:g}, {upper[-1]:g}]",
                       values)


# ----------------------------------------------------------------- Dong et al. 2021

FLOAT_FLOOR = 1e-5  # below this relative residual float32 rounding dominates the ratio
MAX_MEAN_RATE = 0.8  # pure attention must shrink the residual by >= 20% per layer on average
MIN_KEPT = 0.2  # "no collapse": every seed keeps >= 20% of its input residual at every depth


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
        return CheckResult(name, False, "non-finite residuals", values)
    growing = (mean[:-1] > FLOAT_FLOOR) & (ratios >= 1)
    if growing.any():
        l = int(np.argmax(growing))
        return CheckResult(name, False, f"layer {l + 1}: residual grows {mean[l]:.3g} -> {mean[l + 1]:.3g}", values)
    if rate > max_rate:
        return CheckResult(name, False, f"mean rate per layer {rate:.3f} > {max_rate} "
                           f"(res {mean[0]:.3g} -> {mean[-1]:.3g} over {n_layer} layers)", values)
    return CheckResult(name, True, f"mean rate {rate:.3f} per layer (largest ratio {ratios.max():.3f}); "
                       f"res_L/res_0 = {mean[-1] / mean[0]:.2e}", values)


def check_dong_skip_keeps_rank(build: Build, probe: Probe, min_kept: float = MIN_KEPT) -> CheckResult:
    """With skip connections the residual does not collapse: every seed keeps at least
    ``min_kept`` of its input's relative residual at every depth (pure attention keeps
    < 1% after 12 layers)."""
    res = residual_by_depth(build, probe)
    kept = res[:, 1:] / res[:, :1]
    values = {"mean": res.mean(axis=0), "kept": kept.mean(axis=0), "kept_min": kept.min(axis=0)}
    name = "dong_skip"
    if not np.all(np.isfinite(res)):
        return CheckResult(name, False, "non-finite residuals", values)
    if kept.min() < min_kept:
        seed, l = np.unravel_index(int(np.argmin(kept)), kept.shape)
        return CheckResult(name, False, f"seed {probe.seeds[seed]}, block {l + 1}: res_l/res_0 = "
                           f"{kept[seed, l]:.3g} < {min_kept}", values)
    return CheckResult(name, True, f"smallest res_l/res_0 over seeds and blocks {kept.min():.3f} "
                       f"(mean at block {kept.shape[1]}: {kept[:, -1].mean():.3f})", values)


# ----------------------------------------------------------------- broken models
# Mutations of a built model, for showing that each check fails when the model is broken
# (tests/test_science.py, benchmarks/science_figures.py). They act on the model a build
# returns (forward hooks, the blocks' own switches), never on the library code.


def _mutate(build: Build, change: Callable[[Transformer], None]) -> Build:
    def mutated(seed: int) -> Transformer:
        model = build(seed)
        change(model)
        return model
    return mutated


def sublayers_x1000(build: Build) -> Build:
    """Every attention and MLP output multiplied by 1000."""
    def change(model: Transformer) -> None:
        for block in model.blocks:
            for sublayer in (block.attn, block.mlp):
                if sublayer is not None:
                    sublayer.register_forward_hook(lambda _module, _inputs, output: output * 1000.0)
    return _mutate(build, change)


def _set_blocks(name: str, attribute: str, value: Callable[[bool], bool]) -> Callable[[Build], Build]:
    def mutation(build: Build) -> Build:
        def change(model: Transformer) -> None:
            for block in model.blocks:
                setattr(block, attribute, value(getattr(block, attribute)))
        return _mutate(build, change)
    mutation.__name__ = name
    return mutation


residual_removed = _set_blocks("residual_removed", "residual", lambda _: False)
residual_restored = _set_blocks("residual_restored", "residual", lambda _: True)
pre_post_swapped = _set_blocks("pre_post_swapped", "pre", lambda pre: not pre)
