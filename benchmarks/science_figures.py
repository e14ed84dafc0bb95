"""Draw docs/science.md's figures from the checks in ``tga.science``, with the same models,
probes and mutations as tests/test_science.py, and print every number the page quotes.

    python benchmarks/science_figures.py --out docs/figures

Writes ``science_init_checks.png`` (the four checks on intact models) and
``science_mutations.png`` (each check's statistic on the broken models). Takes about a
minute on one CPU thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tga.science import (  # noqa: E402
    MAX_MEAN_RATE,
    MIN_KEPT,
    Probe,
    attention_distance_from_uniform,
    branch_to_stream_ratio,
    build_lemma2,
    check_dong_pure_attention_collapse,
    check_dong_skip_keeps_rank,
    check_xiong_lemma2_postln,
    check_xiong_lemma2_preln,
    lemma2_config,
    pre_post_swapped,
    residual_removed,
    residual_restored,
    sublayers_x1000,
)

LEMMA_PROBE = Probe()
DONG_PROBE = Probe(seeds=tuple(range(8)))
SHARPNESS = (0.0, 1.0, 2.0, 4.0)
SETTING = ("12 layers, d = 64, 4 heads, LayerNorm, Xavier init (no 1/sqrt(2L)), ReLU FFN of width d, "
           "unit-variance input; random tokens, vocabulary 256")


def lemma2_panels(ax_post: plt.Axes, ax_pre: plt.Axes) -> None:
    post = check_xiong_lemma2_postln(build_lemma2(lemma2_config("post")), LEMMA_PROBE)
    pre = check_xiong_lemma2_preln(build_lemma2(lemma2_config("pre")), LEMMA_PROBE)
    print("Xiong Post-LN:", post.passed, post.reason)
    print("  per block:", np.round(post.values["mean"], 3).tolist(), "+-", np.round(post.values["half_width"], 3).tolist())
    print("Xiong Pre-LN:", pre.passed, pre.reason)
    print("  per depth:", np.round(pre.values["mean"], 2).tolist(), "+-", np.round(pre.values["half_width"], 2).tolist())
    blocks = np.arange(1, len(post.values["mean"]) + 1)
    mean, half = post.values["mean"], post.values["half_width"]
    ax_post.errorbar(blocks, mean, yerr=half, fmt="o", color="tab:blue", capsize=3,
                     label="measured, mean ± t·SE (Bonferroni, 1% family-wise)")
    ax_post.axhline(1.5, color="k", ls="--", label="Lemma 2: 3d/2")
    ax_post.axhline(1.0, color="tab:gray", ls=":", label="after the norm: d (by construction, not tested)")
    ax_post.set(xlabel="Post-LN block l", ylabel="E‖x^{post,5}_l‖² / d", ylim=(0.8, 1.8),
                title=f"(a) Xiong Lemma 2, Post-LN, before the norm ({len(LEMMA_PROBE.seeds)} seeds)")
    ax_post.legend(fontsize=7, loc="lower right")

    depth = np.arange(len(pre.values["mean"]))
    ax_pre.fill_between(depth, pre.values["lower"], pre.values["upper"], color="tab:green", alpha=0.15,
                        label="Lemma 2: (1 + l/2) d … (1 + 3l/2) d")
    ax_pre.errorbar(depth, pre.values["mean"], yerr=pre.values["half_width"], fmt="o-", ms=3, color="tab:red",
                    capsize=3, label="measured, mean ± t·SE")
    ax_pre.set(xlabel="Pre-LN depth l (0 = input)", ylabel="E‖x_l‖² / d",
               title="(b) Xiong Lemma 2, Pre-LN residual stream")
    ax_pre.legend(fontsize=7, loc="upper left")


def dong_panels(ax_pure: plt.Axes, ax_skip: plt.Axes) -> None:
    depth = np.arange(lemma2_config("pre").n_layer + 1)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(SHARPNESS)))
    for sharpness, color in zip(SHARPNESS, colors):
        build = build_lemma2(lemma2_config("pre", residual=False, mlp=False), sharpness)
        result = check_dong_pure_attention_collapse(build, DONG_PROBE)
        distance = attention_distance_from_uniform(build, DONG_PROBE)
        print(f"Dong pure attention, W^Q,W^K x{sharpness:g} (distance from uniform {distance:.3f}):",
              result.passed, result.reason)
        ax_pure.semilogy(depth, result.values["mean"], "o-", ms=3, color=color,
                         label=f"W^Q, W^K × {sharpness:g}: TV from uniform {distance:.2f}, rate {result.values['rate'][0]:.2f}")
    start = result.values["mean"][0]
    ax_pure.semilogy(depth, start * MAX_MEAN_RATE ** depth, "k--", lw=1,
                     label=f"res_0 · {MAX_MEAN_RATE}^l: the check needs res_L below this")
    ax_pure.set(xlabel="layer l (0 = input)", ylabel="relative residual ‖X − 1x̄ᵀ‖_F / ‖X‖_F",
                title="(c) Dong: pure attention (no skip, no MLP), Pre-LN")
    ax_pure.legend(fontsize=6.5, loc="lower left")

    cases = [
        ("Pre-LN, Xavier, attention + skip", lemma2_config("pre", mlp=False), "tab:red", "s-"),
        ("Pre-LN, Xavier, full blocks", lemma2_config("pre"), "tab:orange", "o-"),
        ("Post-LN, GPT-2 init, full blocks", lemma2_config("post", init="gpt2"), "tab:blue", "o-"),
        ("Post-LN, Xavier, full blocks (not asserted)", lemma2_config("post"), "tab:cyan", "^--"),
        ("pure attention (no skip), Pre-LN", lemma2_config("pre", residual=False, mlp=False), "k", "x:"),
    ]
    for label, config, color, style in cases:
        build = build_lemma2(config, 1.0)
        result = check_dong_skip_keeps_rank(build, DONG_PROBE)
        if config.residual:  # the branch's size relative to the skip path it joins
            ratio = branch_to_stream_ratio(build, DONG_PROBE)
            label = f"{label}; branch/stream {ratio:.2g}"
        print(f"Dong skip, {label}:", result.passed, result.reason)
        kept = np.concatenate([[1.0], result.values["kept"]])
        ax_skip.plot(depth, kept, style, ms=3, color=color, label=label)
    ax_skip.axhline(MIN_KEPT, color="k", ls="--", lw=1, label=f"check: every seed keeps ≥ {MIN_KEPT}")
    ax_skip.set(xlabel="layer l (0 = input)", ylabel="res_l / res_0 (mean over seeds)", ylim=(0, 1.05),
                title="(d) Dong: with skip connections (W^Q, W^K at Xavier scale)")
    ax_skip.legend(fontsize=6.5, loc="lower left")


MUTATED = [
    ("Xiong Post-LN\n|E‖x^{post,5}‖²/d − 1.5|, worst block", check_xiong_lemma2_postln, lemma2_config("post"), 0.0,
     LEMMA_PROBE, (sublayers_x1000, residual_removed, pre_post_swapped)),
    ("Xiong Pre-LN\nworst distance outside the bounds (units of d)", check_xiong_lemma2_preln, lemma2_config("pre"),
     0.0, LEMMA_PROBE, (sublayers_x1000, residual_removed, pre_post_swapped)),
    ("Dong pure attention\naverage rate per layer", check_dong_pure_attention_collapse,
     lemma2_config("pre", residual=False, mlp=False), 1.0, DONG_PROBE,
     (residual_restored, sublayers_x1000, pre_post_swapped)),
    ("Dong skip, Pre-LN Xavier\nsmallest res_l/res_0", check_dong_skip_keeps_rank, lemma2_config("pre"), 1.0,
     DONG_PROBE, (residual_removed, pre_post_swapped)),
    ("Dong skip, Post-LN GPT-2 init\nsmallest res_l/res_0", check_dong_skip_keeps_rank,
     lemma2_config("post", init="gpt2"), 1.0, DONG_PROBE, (sublayers_x1000, residual_removed)),
]


def statistic(result, check) -> float:
    """The one number each check's verdict turns on, for the mutation figure."""
    values = result.values
    if check is check_xiong_lemma2_postln:
        return float(np.max(np.abs(values["mean"] - 1.5)))
    if check is check_xiong_lemma2_preln:
        outside = np.maximum(values["lower"] - values["mean"], values["mean"] - values["upper"])[1:]
        return float(np.max(outside))
    if check is check_dong_pure_attention_collapse:
        return float(values["rate"][0])
    return float(np.min(values["kept_min"]))


def mutation_figure(path: Path) -> None:
    fig, axes = plt.subplots(1, len(MUTATED), figsize=(17, 3.8), constrained_layout=True)
    for ax, (title, check, config, sharpness, probe, mutations) in zip(axes, MUTATED):
        names, numbers, colors = [], [], []
        for mutation in (None, *mutations):
            build = build_lemma2(config, sharpness)
            result = check(build if mutation is None else mutation(build), probe)
            name = "intact" if mutation is None else mutation.__name__
            print(f"{title.splitlines()[0]} / {name}: passed={result.passed}: {result.reason}")
            names.append(name.replace("_", "\n"))
            numbers.append(statistic(result, check))
            colors.append("tab:green" if result.passed else "tab:red")
        symlog = max(abs(v) for v in numbers) > 100
        ax.bar(range(len(numbers)), numbers, color=colors)
        if symlog:
            ax.set_yscale("symlog", linthresh=1)
        threshold = {check_xiong_lemma2_preln: 0.0, check_dong_pure_attention_collapse: MAX_MEAN_RATE,
                     check_dong_skip_keeps_rank: MIN_KEPT}.get(check)
        if threshold is not None:  # Post-LN's threshold is each block's own t*SE, so no line
            ax.axhline(threshold, color="k", ls="--", lw=1, label=f"check threshold {threshold:g}")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(title, fontsize=8)
        for i, v in enumerate(numbers):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle("Each check on intact and broken models: green = check passes, red = fails "
                 "(Pre-LN's negative values are inside the bounds)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    lemma2_panels(axes[0, 0], axes[0, 1])
    dong_panels(axes[1, 0], axes[1, 1])
    fig.suptitle(f"Science checks at initialization: {SETTING}.\n(a, b) W^Q = W^K = 0 (uniform attention, "
                 f"Lemma 2's assumption), {len(LEMMA_PROBE.seeds)} seeds; (c, d) {len(DONG_PROBE.seeds)} seeds, "
                 f"{DONG_PROBE.batch} sequences x {DONG_PROBE.seq} tokens each", fontsize=9)
    fig.savefig(args.out / "science_init_checks.png", dpi=110)
    plt.close(fig)
    mutation_figure(args.out / "science_mutations.png")


if __name__ == "__main__":
    main()
