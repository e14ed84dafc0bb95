"""Model evolution: token geometry at initialization and at every saved checkpoint.

The stages analysed are derived from the variant's training settings (the same
:func:`tga.schema.checkpoint_steps` the training loop uses), never by listing the
checkpoint folder, so a stale checkpoint left over from an earlier run with another
``checkpoint_spacing`` or ``checkpoint_interval`` can never slip into the analysis, and
a missing one is an error. By default (``checkpoint_spacing: log``) the checkpoints are
at steps 1, 2, 4, 8, ...: dense early, where the geometry changes most, and evenly
spread on the log step axis of the evolution figures. The spacing is a pure function of
the settings, so the same settings always give the same stages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Torch-free at import: the workflow calls evolution_stages while it builds the DAG.
from tga.schema import TrainConfig, checkpoint_steps

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["evolution_stages", "evolution_steps", "analyze_evolution"]


def _train_config(training: Mapping[str, Any]) -> TrainConfig:
    return TrainConfig.from_dict(dict(training))


def evolution_stages(training: Mapping[str, Any], model_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Ordered ``{stage: checkpoint path}``: ``init``, then ``step{N}`` for every kept checkpoint.

    ``training`` is a resolved variant's ``training`` block (``resolve_variant(...)["training"]``).
    When the last kept checkpoint is short of ``max_steps`` (not a power of two, or not a
    multiple of ``checkpoint_interval``), ``final.pt`` is added as ``step{max_steps}``:
    the "after" of the evolution is then always the model that was evaluated.
    """
    config = _train_config(training)
    model_dir = Path(model_dir)
    steps = checkpoint_steps(config)
    stages = {"init": str(model_dir / "init.pt")}
    for step in steps:
        stages[f"step{step}"] = str(model_dir / "checkpoints" / f"step{step:06d}.pt")
    if config.max_steps not in steps:
        stages[f"step{config.max_steps}"] = str(model_dir / "final.pt")
    return stages


def evolution_steps(training: Mapping[str, Any]) -> list[int]:
    """Training steps at which the geometry is measured: 0 (init) and every stage of
    :func:`evolution_stages`, in order."""
    return [0, *(int(stage[len("step"):]) for stage in evolution_stages(training, ".") if stage != "init")]


def analyze_evolution(
    stages: Mapping[str, str | os.PathLike[str]],
    prompts_path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
    threads: int = 0,
    train_tokens: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Geometry of every stage (see :func:`evolution_stages`) into ``out_dir``; returns the summary.

    ``train_tokens`` (the training split's token file) adds the logit-frequency
    correlation (tga/metrics.py). Checks that each checkpoint's own ``extra["step"]``
    (written by the training loop and used as the ``step`` column) agrees with its stage
    name, so a checkpoint saved by a different run can never be plotted at the wrong place
    on the step axis.
    """
    import pandas as pd

    from tga.geometry import analyze_run
    from tga.metrics import GeometryError

    missing = [f"{stage}: {path}" for stage, path in stages.items() if not Path(path).is_file()]
    if missing:
        raise GeometryError(
            "checkpoints expected from the training settings are missing (" + "; ".join(missing) + "); "
            "rerun the training job, e.g. after changing checkpoint_spacing, checkpoint_interval or max_steps"
        )
    analyze_run(dict(stages), prompts_path, tokenizer_path, out_dir, settings, threads=threads,
                train_tokens=train_tokens)
    summary = pd.read_csv(Path(out_dir) / "summary.csv")
    steps = summary.drop_duplicates("stage").set_index("stage")["step"].to_dict()
    wrong = [
        f"{stage} holds step {int(steps[stage])}"
        for stage in stages
        if stage != "init" and int(steps[stage]) != int(stage[len("step"):])
    ]
    if wrong:
        raise GeometryError("checkpoint step does not match its stage: " + "; ".join(wrong))
    return summary
