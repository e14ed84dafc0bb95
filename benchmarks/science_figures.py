"""Draw docs/science.md's figure from the checks in ``tga.science``, with the same settings
(``CHECK_CASES``) and mutants as tests/test_science.py, and print every number the page
quotes outside the generated mutation table.

    python benchmarks/science_figures.py --out docs/figures

Writes ``science_init_checks.png``: Lemma 2 (Post-LN, Pre-LN bounds, Pre-LN per-block
terms) and Dong et al. (pure attention; skip connections against the same weights without
them; the same contrast for attention that does not mix tokens). About 30 s on one CPU
thread. benchmarks/science_mutation_table.py writes the mutation table.
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
    CHECK_CASE_BY_NAME,
    DONG_PROBE,
    LEMMA_PROBE,
    MAX_MEAN_RATE,
    MAX_PURE_KEPT,
    MIN_KEPT,
    MUTANT_BY_NAME,
    attention_distance_from_uniform,
    build_lemma2,
    check_dong_pure_attention_collapse,
    check_dong_skip_keeps_rank,
    lemma2_config,
    run_case,
)

SHARPNESS = (0.0, 1.0, 2.0, 4.0)
SETTING = ("12 layers, d = 64, 4 heads, LayerNorm, Xavier init (no 1/sqrt(2L)), ReLU FFN of width d, "
           "unit-variance input; random tokens, vocabulary 256")


def lemma2_panels(ax_post: plt.Axes, ax_pre: plt.Axes, ax_terms: plt.Axes) -> None:
    post = run_case(CHECK_CASE_BY_NAME["xiong_postln"])
    pre = run_case(CHECK_CASE_BY_NAME["xiong_preln"])
    print("Xiong Post-LN:", post.passed, post.reason)
    print("  per block:", np.round(post.values["mean"], 3).tolist(), "+-", np.round(post.values["half_width"], 3).tolist())
    print("Xiong Pre-LN:", pre.passed, pre.reason)
    print("  per depth:", np.round(pre.values["mean"], 2).tolist(), "+-", np.round(pre.values["half_width"], 2).tolist())
    for key in ("attention", "ffn"):
        print(f"  {key} term minus expected, per block:", np.round(pre.values[f"{key}_excess"], 3).tolist(), "+-",
              np.round(pre.values[f"{key}_excess_half_width"], 3).tolist(), "; mean over blocks",
              np.round(pre.values[f"{key}_pooled"], 4).tolist())
    print("  E||y_bar||^2/d per block:", np.round(pre.values["attention_expected"], 3).tolist())

    blocks = np.arange(1, len(post.values["mean"]) + 1)
    ax_post.errorbar(blocks, post.values["mean"], yerr=post.values["half_width"], fmt="o", color="tab:blue",
                     capsize=3, label="measured, mean ± t·SE (Bonferroni, 1% family-wise)")
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
               title="(b) Xiong Lemma 2, Pre-LN residual stream: the bounds")
    ax_pre.legend(fontsize=7, loc="upper left")

    for key, label, color, offset in (("attention", "attention: ‖x^{pre,3}_l − x_{l−1}‖² − ‖ȳ_l‖²", "tab:purple", -0.1),
                                      ("ffn", "FFN: ‖x_l − x^{pre,3}_l‖² − d/2", "tab:orange", 0.1)):
        mean, half = pre.values[f"{key}_excess"], pre.values[f"{key}_excess_half_width"]
        pooled, pooled_half = pre.values[f"{key}_pooled"]
        ax_terms.errorbar(blocks + offset, mean, yerr=half, fmt="o", ms=3, capsize=3, color=color,
                          label=f"{label}; mean over blocks {pooled:+.3f} ± {pooled_half:.3f}")
    ax_terms.axhline(0.0, color="k", ls="--", lw=1, label="the proof: 0 (each term's expectation)")
    ax_terms.set(xlabel="Pre-LN block l", ylabel="term − its expected value (units of d)",
                 title="(c) Pre-LN: each block's two terms (Bonferroni over 24)")
    ax_terms.legend(fontsize=6.5, loc="lower left")


def dong_panels(ax_pure: plt.Axes, ax_skip: plt.Axes, ax_mixing: plt.Axes) -> None:
    depth = np.arange(lemma2_config("pre").n_layer + 1)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(SHARPNESS)))
    for sharpness, color in zip(SHARPNESS, colors):
        build = build_lemma2(lemma2_config("pre", residual=False, mlp=False), sharpness)
        result = check_dong_pure_attention_collapse(build, DONG_PROBE)
        distance = attention_distance_from_uniform(build, DONG_PROBE)
        print(f"Dong pure attention, W^Q,W^K x{sharpness:g} (distance from uniform {distance:.3f}):",
              result.passed, result.reason, "; per-layer ratios", np.round(result.values["ratio"], 3).tolist())
        ax_pure.semilogy(depth, result.values["mean"], "o-", ms=3, color=color,
                         label=f"W^Q, W^K × {sharpness:g}: TV from uniform {distance:.2f}, "
                               f"rate {result.values['rate'][0]:.2f}")
    start = result.values["mean"][0]
    ax_pure.semilogy(depth, start * MAX_MEAN_RATE ** depth, "k--", lw=1,
                     label=f"res_0 · {MAX_MEAN_RATE}^l: the check needs res_L below this")
    ax_pure.set(xlabel="layer l (0 = input)", ylabel="relative residual ‖X − 1x̄ᵀ‖_F / ‖X‖_F",
                title="(d) Dong: pure attention (no skip, no MLP), Pre-LN")
    ax_pure.legend(fontsize=6.5, loc="lower left")

    cases = [
        ("Pre-LN, Xavier (the check's Pre-LN case)", build_lemma2(lemma2_config("pre", mlp=False), 1.0), "tab:red"),
        ("Post-LN, W^O × 0.5 (the check's Post-LN case)", CHECK_CASE_BY_NAME["dong_skip_postln"].build(), "tab:blue"),
        ("Post-LN, Xavier (fails the check)", build_lemma2(lemma2_config("post", mlp=False), 1.0), "tab:cyan"),
        ("Post-LN, GPT-2 init (outside the setting)", build_lemma2(lemma2_config("post", mlp=False, init="gpt2"), 1.0),
         "tab:gray"),
    ]
    for label, build, color in cases:
        result = check_dong_skip_keeps_rank(build, DONG_PROBE)
        ratio = result.values["branch_ratio"][0]
        print(f"Dong skip, {label}:", result.passed, result.reason)
        ax_skip.plot(depth, np.concatenate([[1.0], result.values["kept"]]), "o-", ms=3, color=color,
                     label=f"{label}; branch/stream {ratio:.2g}")
        ax_skip.plot(depth, np.concatenate([[1.0], result.values["pure_kept"]]), "x:", ms=3, color=color)
    ax_skip.axhline(MIN_KEPT, color="k", ls="--", lw=1, label=f"with skips every seed must keep ≥ {MIN_KEPT}")
    ax_skip.axhline(MAX_PURE_KEPT, color="k", ls=":", lw=1,
                    label=f"without skips (dotted, ×) the mean must fall to ≤ {MAX_PURE_KEPT}")
    ax_skip.set(xlabel="layer l (0 = input)", ylabel="res_l / res_0 (mean over seeds)", yscale="log",
                ylim=(1e-3, 1.5), title="(e) Dong: the same attention with (solid) and without (dotted) skips")
    ax_skip.legend(fontsize=6, loc="lower left")

    for case_name, color in (("dong_skip_preln", "tab:red"), ("dong_skip_postln", "tab:blue")):
        case = CHECK_CASE_BY_NAME[case_name]
        placement = case.title.split(", ")[-1]
        intact = run_case(case)
        ax_mixing.plot(depth, np.concatenate([[1.0], intact.values["pure_kept"]]), "x:", ms=3, color=color,
                       label=f"{placement}, intact attention, without skips")
        broken = {name: run_case(case, MUTANT_BY_NAME[name]) for name in ("attention_no_mixing", "attention_x0")}
        for name, result in broken.items():
            print(f"Dong skip, {case_name} / {name}:", result.passed, result.reason)
        no_mixing = broken["attention_no_mixing"]  # attention x0 has no residual to plot: its output is zero
        ax_mixing.plot(depth, np.concatenate([[1.0], no_mixing.values["kept"]]), "s-", ms=4, color=color, alpha=0.6,
                       label=f"{placement}, no mixing, with skips")
        ax_mixing.plot(depth, np.concatenate([[1.0], no_mixing.values["pure_kept"]]), "^--", ms=3, color=color,
                       label=f"{placement}, no mixing, without skips: no collapse")
    ax_mixing.axhline(MAX_PURE_KEPT, color="k", ls=":", lw=1, label=f"collapse: ≤ {MAX_PURE_KEPT}")
    ax_mixing.set(xlabel="layer l (0 = input)", ylabel="res_l / res_0 (mean over seeds)", yscale="log",
                  ylim=(1e-3, 1.5), title="(f) attention that does not mix tokens: the check fails")
    ax_mixing.legend(fontsize=6.5, loc="lower left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(19, 10), constrained_layout=True)
    lemma2_panels(*axes[0])
    dong_panels(*axes[1])
    fig.suptitle(f"Science checks at initialization: {SETTING}.\n(a–c) W^Q = W^K = 0 (uniform attention, "
                 f"Lemma 2's assumption), {len(LEMMA_PROBE.seeds)} seeds; (d–f) attention only, "
                 f"{len(DONG_PROBE.seeds)} seeds, {DONG_PROBE.batch} sequences x {DONG_PROBE.seq} tokens each",
                 fontsize=9)
    fig.savefig(args.out / "science_init_checks.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
