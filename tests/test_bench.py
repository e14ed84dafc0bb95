"""The benchmark's FLOPs count and its JSON report (no timings are asserted)."""

import json

from tga.bench import flops_per_token, main
from tga.model import ModelConfig


def test_flops_per_token_is_6n_plus_attention_by_hand():
    config = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32, activation="gelu")
    per_block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32 + 2 * 32  # qkv, proj, up, down, two RMSNorm gains
    n = 2 * per_block + 32 + 100 * 32  # blocks, final norm, tied output head over the real vocabulary
    assert flops_per_token(config) == 6 * n + 12 * 2 * 16 * 32


def test_report_has_every_figure_per_precision(capsys):
    main(["--device", "cpu", "--models", "quick", "--steps", "2", "--warmup", "0", "--eval-tokens", "3000",
          "--precision", "fp32", "bf16"])
    report = json.loads(capsys.readouterr().out)
    assert report["device"].startswith("cpu")
    entry = report["models"]["quick"]
    assert [t["precision"] for t in entry["train"]] == ["fp32", "bf16"]
    assert [e["precision"] for e in entry["eval"]] == ["fp32", "bf16"]
    for train in entry["train"]:
        assert train["train_tokens_per_s"] > 0 and train["peak_memory_mb"] > 0
        assert train["mfu"] is None  # no peak-FLOPs figure for CPUs
        assert train["flops_per_token"] == flops_per_token(ModelConfig(**entry["config"]))
    assert all(e["eval_tokens"] == 2999 and e["eval_tokens_per_s"] > 0 for e in entry["eval"])
    assert entry["geometry"]["geometry_s_per_model"] > 0
