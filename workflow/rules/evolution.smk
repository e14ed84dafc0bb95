# Model evolution: token geometry at initialization and at every saved checkpoint,
# plotted against the training step next to the loss.
from tga.fingerprint import code_fingerprint


rule evolution:
    input:
        evolution_outputs,


rule evolution_geometry:
    input:
        init="outputs/models/{variant}/seed{seed}/init.pt",
        final="outputs/models/{variant}/seed{seed}/final.pt",
        # The checkpoints are a directory() output of rule train; the files analysed are
        # the ones its training settings keep (params.stages), never a listing of the folder.
        checkpoints="outputs/models/{variant}/seed{seed}/checkpoints",
        tokenizer="outputs/data/tokens/tokenizer.json",
        # the prompts file, or the test split's token file for test windows
        prompts=GEOMETRY_PROMPTS,
        # the training split's token counts, for the mean vector's logit-frequency correlation
        train_tokens="outputs/data/tokens/train.bin",
        train_meta="outputs/data/tokens/train.json",
    output:
        metrics="outputs/evolution/{variant}/seed{seed}/metrics.csv",
        summary="outputs/evolution/{variant}/seed{seed}/summary.csv",
        similarity="outputs/evolution/{variant}/seed{seed}/similarity.npz",
        prompts="outputs/evolution/{variant}/seed{seed}/prompts.csv",
    params:
        code=code_fingerprint("tga.evolution"),
        stages=evolution_stage_paths,
        geometry=config["geometry"],
    log:
        "outputs/logs/evolution_geometry/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/evolution_geometry/{variant}/seed{seed}.tsv"
    threads: 1
    resources:
        gpu=analysis_gpus("geometry"),
        mem_mb=estimated_resources("evolution", "mem_mb"),
        runtime=estimated_resources("evolution", "runtime"),
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/evolution_geometry.py"


# The three evolution figures of one model in one job (start-up paid once per model);
# each figure is still a target of its own.
rule evolution_figures:
    input:
        summary="outputs/evolution/{variant}/seed{seed}/summary.csv",
        similarity="outputs/evolution/{variant}/seed{seed}/similarity.npz",
        metrics="outputs/evolution/{variant}/seed{seed}/metrics.csv",
        log="outputs/models/{variant}/seed{seed}/train_log.csv",
    output:
        metrics_by_step=[
            report(
                "outputs/evolution/{variant}/seed{seed}/metrics_by_step.png",
                caption="../report/metrics_by_step.rst",
                category="evolution",
                subcategory="{variant}",
                labels={"variant": "{variant}", "seed": "{seed}", "figure": "metrics by step"},
            ),
            *figure_copies("outputs/evolution/{variant}/seed{seed}/metrics_by_step.png", config["figures"]["format"]),
        ],
        heatmaps_before_after=[
            report(
                "outputs/evolution/{variant}/seed{seed}/heatmaps_before_after.png",
                caption="../report/heatmaps_before_after.rst",
                category="evolution",
                subcategory="{variant}",
                labels={"variant": "{variant}", "seed": "{seed}", "figure": "heatmaps before/after"},
            ),
            *figure_copies(
                "outputs/evolution/{variant}/seed{seed}/heatmaps_before_after.png", config["figures"]["format"]
            ),
        ],
        similarity_change=[
            report(
                "outputs/evolution/{variant}/seed{seed}/similarity_change.png",
                caption="../report/similarity_change.rst",
                category="evolution",
                subcategory="{variant}",
                labels={"variant": "{variant}", "seed": "{seed}", "figure": "similarity change"},
            ),
            *figure_copies("outputs/evolution/{variant}/seed{seed}/similarity_change.png", config["figures"]["format"]),
        ],
    params:
        code=code_fingerprint("tga.figures_evolution"),
        title=model_title,
        data_label=config["data"]["label"],
    log:
        "outputs/logs/evolution_figures/{variant}/seed{seed}.log",
    benchmark:
        "outputs/benchmarks/evolution_figures/{variant}/seed{seed}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/tga.yaml"
    script:
        "../scripts/plot_evolution_figures.py"
