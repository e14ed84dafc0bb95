# Pretrained Hugging Face causal LMs (config `pretrained:`, tga/pretrained.py): the same
# geometry, per-model figures and test perplexity as a trained variant, and for entries
# with `revisions` an evolution series against the training step each revision names.
# Outputs sit where a variant's do, with `pretrained` in place of `seed{seed}`.
from tga.fingerprint import code_fingerprint


wildcard_constraints:
    entry="|".join(re.escape(name) for name in PRETRAINED) or "(?!)",


rule pretrained_geometry:
    input:
        prompts=config["geometry"]["prompts"],
        # the training split's text, encoded with the model's tokenizer for the logit-frequency correlation
        train_text="outputs/data/corpus/train.txt",
    output:
        metrics="outputs/geometry/{entry}/pretrained/metrics.csv",
        summary="outputs/geometry/{entry}/pretrained/summary.csv",
        similarity="outputs/geometry/{entry}/pretrained/similarity.npz",
        prompts="outputs/geometry/{entry}/pretrained/prompts.csv",
    params:
        code=code_fingerprint("tga.pretrained"),
        entry=pretrained_entry,
        stages=pretrained_final_stage,
        geometry=config["geometry"],
    log:
        "outputs/logs/pretrained_geometry/{entry}.log",
    benchmark:
        "outputs/benchmarks/pretrained_geometry/{entry}.tsv"
    threads: 2
    resources:
        mem_mb=pretrained_mem_mb,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/pretrained_geometry.py"


rule pretrained_evaluate:
    input:
        text="outputs/data/corpus/test.txt",
    output:
        "outputs/eval/{entry}/pretrained/perplexity.json",
    params:
        code=code_fingerprint("tga.pretrained"),
        entry=pretrained_entry,
        evaluation=config["evaluation"],
    log:
        "outputs/logs/pretrained_evaluate/{entry}.log",
    benchmark:
        "outputs/benchmarks/pretrained_evaluate/{entry}.tsv"
    threads: 2
    resources:
        mem_mb=pretrained_mem_mb,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/pretrained_evaluate.py"


rule pretrained_evolution_geometry:
    input:
        prompts=config["geometry"]["prompts"],
        train_text="outputs/data/corpus/train.txt",
    output:
        metrics="outputs/evolution/{entry}/pretrained/metrics.csv",
        summary="outputs/evolution/{entry}/pretrained/summary.csv",
        similarity="outputs/evolution/{entry}/pretrained/similarity.npz",
        prompts="outputs/evolution/{entry}/pretrained/prompts.csv",
    params:
        code=code_fingerprint("tga.pretrained"),
        entry=pretrained_entry,
        stages=pretrained_evolution_stages,
        geometry=config["geometry"],
    log:
        "outputs/logs/pretrained_evolution_geometry/{entry}.log",
    benchmark:
        "outputs/benchmarks/pretrained_evolution_geometry/{entry}.tsv"
    threads: 2
    resources:
        mem_mb=pretrained_mem_mb,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/pretrained_geometry.py"


# Per-model figures: the variants' own scripts, with the entry's title.
rule pretrained_plot_geometry_layers:
    input:
        summary="outputs/geometry/{entry}/pretrained/summary.csv",
    output:
        report(
            "outputs/figures/{entry}/pretrained/geometry_layers.png",
            caption="../report/geometry_layers.rst",
            category="geometry",
            subcategory="{entry}",
            labels={"variant": "{entry}", "seed": "pretrained", "figure": "geometry by layer"},
        ),
        *figure_copies("outputs/figures/{entry}/pretrained/geometry_layers.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_model"),
        title=pretrained_title,
        data_label=config["data"]["label"],
    log:
        "outputs/logs/pretrained_plot_geometry_layers/{entry}.log",
    benchmark:
        "outputs/benchmarks/pretrained_plot_geometry_layers/{entry}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_geometry_layers.py"


rule pretrained_plot_similarity_heatmaps:
    input:
        similarity="outputs/geometry/{entry}/pretrained/similarity.npz",
    output:
        report(
            "outputs/figures/{entry}/pretrained/similarity_heatmaps.png",
            caption="../report/similarity_heatmaps.rst",
            category="geometry",
            subcategory="{entry}",
            labels={"variant": "{entry}", "seed": "pretrained", "figure": "similarity heatmaps"},
        ),
        *figure_copies("outputs/figures/{entry}/pretrained/similarity_heatmaps.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_model"),
        title=pretrained_title,
        data_label=config["data"]["label"],
    log:
        "outputs/logs/pretrained_plot_similarity_heatmaps/{entry}.log",
    benchmark:
        "outputs/benchmarks/pretrained_plot_similarity_heatmaps/{entry}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_similarity_heatmaps.py"


# Evolution figures over the revisions: before = the earliest revision (a published
# series need not start at step 0); there is no training log to draw beside them.
rule pretrained_plot_metrics_by_step:
    input:
        summary="outputs/evolution/{entry}/pretrained/summary.csv",
    output:
        report(
            "outputs/evolution/{entry}/pretrained/metrics_by_step.png",
            caption="../report/metrics_by_step.rst",
            category="evolution",
            subcategory="{entry}",
            labels={"variant": "{entry}", "seed": "pretrained", "figure": "metrics by step"},
        ),
        *figure_copies("outputs/evolution/{entry}/pretrained/metrics_by_step.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_evolution"),
        title=pretrained_title,
        data_label=config["data"]["label"],
    log:
        "outputs/logs/pretrained_plot_metrics_by_step/{entry}.log",
    benchmark:
        "outputs/benchmarks/pretrained_plot_metrics_by_step/{entry}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/pretrained_metrics_by_step.py"


rule pretrained_plot_heatmaps_before_after:
    input:
        similarity="outputs/evolution/{entry}/pretrained/similarity.npz",
    output:
        report(
            "outputs/evolution/{entry}/pretrained/heatmaps_before_after.png",
            caption="../report/heatmaps_before_after.rst",
            category="evolution",
            subcategory="{entry}",
            labels={"variant": "{entry}", "seed": "pretrained", "figure": "heatmaps before/after"},
        ),
        *figure_copies("outputs/evolution/{entry}/pretrained/heatmaps_before_after.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_evolution"),
        title=pretrained_title,
        data_label=config["data"]["label"],
        before=pretrained_first_stage,
    log:
        "outputs/logs/pretrained_plot_heatmaps_before_after/{entry}.log",
    benchmark:
        "outputs/benchmarks/pretrained_plot_heatmaps_before_after/{entry}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/pretrained_heatmaps_before_after.py"


rule pretrained_plot_similarity_change:
    input:
        metrics="outputs/evolution/{entry}/pretrained/metrics.csv",
    output:
        report(
            "outputs/evolution/{entry}/pretrained/similarity_change.png",
            caption="../report/similarity_change.rst",
            category="evolution",
            subcategory="{entry}",
            labels={"variant": "{entry}", "seed": "pretrained", "figure": "similarity change"},
        ),
        *figure_copies("outputs/evolution/{entry}/pretrained/similarity_change.png", config["figures"]["format"]),
    params:
        code=code_fingerprint("tga.figures_evolution"),
        title=pretrained_title,
        data_label=config["data"]["label"],
        before=pretrained_first_stage,
    log:
        "outputs/logs/pretrained_plot_similarity_change/{entry}.log",
    benchmark:
        "outputs/benchmarks/pretrained_plot_similarity_change/{entry}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/pretrained_similarity_change.py"
