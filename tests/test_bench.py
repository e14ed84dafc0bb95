"""The benchmark's FLOPs count, its peak-FLOPs choice, its settings (the pipeline's
own) and its JSON report (no timings are asserted)."""

import json
from pathlib import Path

import pytest
import yaml

from tga.bench import PEAK_FLOPS, flops_per_token, main, peak_flops_for, pipeline_settings
from tga.model import ModelConfig
from tga.schema import TrainConfig
from tga.settings import resolve_variant

ROOT = Path(__file__).resolve().parents[1]


def test_flops_per_token_is_6n_plus_attention_by_hand():
    config = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32, activation="gelu")
    per_block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32 + 2 * 32  # qkv, proj, up, down, two RMSNorm gains
    n = 2 * per_block + 32 + 100 * 32  # blocks, final norm, tied output head over the real vocabulary
    assert flops_per_token(config) == 6 * n + 12 * 2 * 16 * 32


@pytest.mark.parametrize("name, precision, entry, kind", [
    ("NVIDIA H200", "bf16", "H200", "bf16"),
    ("NVIDIA H200 NVL", "bf16", "H200 NVL", "bf16"),
    ("NVIDIA GH200 480GB", "bf16", "H200", "bf16"),
    ("NVIDIA H100 80GB HBM3", "bf16", "H100", "bf16"),  # how torch names the SXM part
    ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", "bf16"),
    ("NVIDIA H100 NVL", "fp32", "H100 NVL", "tf32"),
    ("NVIDIA H100 80GB HBM3", "fp32", "H100", "tf32"),  # fp32 runs use TF32 matmuls
    ("NVIDIA A100-SXM4-80GB", "fp32", "A100", "tf32"),
    ("NVIDIA A10G", "bf16", "A10G", "bf16"),
    ("Tesla V100-SXM2-16GB", "fp32", "V100", "fp32"),  # no TF32: the fp32 peak
])
def test_peak_is_the_device_form_factors_for_the_precision(name, precision, entry, kind):
    match = peak_flops_for(name, precision)
    assert (match.device, match.kind) == (entry, kind)
    assert match.flops == getattr(PEAK_FLOPS[entry], kind)


def test_no_peak_for_unknown_devices_or_a_precision_the_device_lacks():
    assert peak_flops_for("NVIDIA GeForce GTX 1080", "bf16") is None
    assert peak_flops_for("cpu (x86_64, 2 threads)", "fp32") is None
    assert peak_flops_for("Tesla V100-SXM2-16GB", "bf16") is None
    assert PEAK_FLOPS["H100 PCIe"].bf16 < PEAK_FLOPS["H100 NVL"].bf16 < PEAK_FLOPS["H100"].bf16
    assert all(p.tf32 is None or p.tf32 < p.bf16 for p in PEAK_FLOPS.values())


def test_benchmarked_settings_are_the_workflows_for_the_default_config():
    """What the training rule gets: config/config.yaml with the schema's defaults
    (Snakemake's validate fills them), resolved for the variant, GPT-2's vocabulary."""
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    variant, model, training = pipeline_settings(ROOT, "default")
    assert variant == next(iter(config["variants"]))
    workflow = resolve_variant(config, variant)
    assert model == ModelConfig.from_dict({**workflow["model"], "vocab_size": 50257})
    assert training == TrainConfig.from_dict(workflow["training"])
    assert training.compile == "auto" and model.n_embd == config["model"]["n_embd"]
    _, quick, quick_training = pipeline_settings(ROOT, "quick", "standard-postln")
    quick_file = yaml.safe_load((ROOT / "config" / "quick.yaml").read_text())
    assert quick.norm_position == "post" and quick.n_embd == quick_file["model"]["n_embd"]
    assert quick_training.max_steps == quick_file["training"]["max_steps"]  # quick.yaml merged over config.yaml
    assert quick.vocab_size < 200  # the character tokenizer of the shipped sample


def test_report_has_every_figure_per_precision(capsys):
    main(["--device", "cpu", "--models", "quick", "--steps", "2", "--warmup", "0", "--eval-tokens", "3000",
          "--precision", "fp32", "bf16", "--repo", str(ROOT)])
    report = json.loads(capsys.readouterr().out)
    assert report["device"].startswith("cpu")
    entry = report["models"]["quick"]
    assert entry["variant"] == "llama-preln" and entry["config_files"] == ["config/config.yaml", "config/quick.yaml"]
    assert entry["config"]["n_layer"] == 4 and entry["training"]["batch_size"] == 16
    assert [t["precision"] for t in entry["train"]] == ["fp32", "bf16"]
    assert [e["precision"] for e in entry["eval"]] == ["fp32", "bf16"]
    for train in entry["train"]:
        assert train["batch_size"] == 16 and train["compile"] is False  # compile: auto is eager on a CPU
        assert train["train_tokens_per_s"] > 0 and train["peak_memory_mb"] > 0
        assert train["diverged"] is False and train["mean_loss"] > 0
        # no peak-FLOPs figure for CPUs: none divided by, none matched
        assert train["mfu"] is None and train["peak_flops"] is None and train["peak_flops_device"] is None
        assert train["flops_per_token"] == flops_per_token(ModelConfig(**entry["config"]))
    assert all(e["eval_tokens"] == 2999 and e["eval_tokens_per_s"] > 0 for e in entry["eval"])
    assert entry["geometry"]["geometry_s_per_model"] > 0


def test_nanogpt_like_variant_is_the_benchmarks_own_on_the_configs_sizes():
    """nanoGPT's block (Pre-LN, LayerNorm, GELU, learned positions, no dropout) with the
    default config's sizes and training settings; the study's variants are untouched."""
    variant, model, training = pipeline_settings(ROOT, "default", "nanogpt-like")
    _, llama, llama_training = pipeline_settings(ROOT, "default")
    assert variant == "nanogpt-like"
    assert (model.norm_position, model.norm, model.activation, model.position_encoding, model.dropout) == \
        ("pre", "layernorm", "gelu", "learned", 0.0)
    assert (model.n_layer, model.n_embd, model.block_size, model.vocab_size) == \
        (llama.n_layer, llama.n_embd, llama.block_size, llama.vocab_size)
    assert training == llama_training
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert "nanogpt-like" not in (config.get("variants") or {})


def test_profile_writes_the_top_kernels_as_markdown_and_json(tmp_path, capsys):
    main(["--device", "cpu", "--models", "quick", "--steps", "1", "--warmup", "0", "--eval-tokens", "2000",
          "--loss-head", "full", "--profile", str(tmp_path), "--repo", str(ROOT)])
    train = json.loads(capsys.readouterr().out)["models"]["quick"]["train"][0]
    assert train["loss_head"] == "full" and train["optimizer_fused"] is False
    rows = train["profile"]
    assert 0 < len(rows) <= 15 and rows == sorted(rows, key=lambda r: r["ms_per_step"], reverse=True)
    assert any(r["name"] == "aten::mm" for r in rows) and 0 < sum(r["share"] for r in rows) <= 1.0001
    stem = tmp_path / "profile-quick-llama-preln-b16-eager-fp32"
    assert json.loads(stem.with_suffix(".json").read_text())["rows"] == rows
    table = stem.with_suffix(".md").read_text().splitlines()
    assert table[2] == "| kernel | calls/step | ms/step | share |" and len(table) == 4 + len(rows)
    assert "full head" in table[0] and "5 profiled steps" in table[0]
