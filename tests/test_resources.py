"""Resource estimates (tga/resources.py) against what real jobs use.

Memory: each case trains a small model for a few steps with the real ``train_model``
in a fresh Python process and reads its peak resident set size (``ru_maxrss``); the
estimate, less the process base it assumes, must lie within [0.67x, 1.5x] of the
measured peak less the RSS the process had after its imports. That is the bound
MEMORY_SAFETY_FACTOR (1.5) is chosen to cover. The cases are chosen so that a different
part dominates in each: the logits, the blocks' activations, the attention matrices
of CPU training with dropout, and the weights with AdamW's state.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from tga.model import ModelConfig, Transformer
from tga.resources import (
    MEMORY_SAFETY_FACTOR,
    PROCESS_BASE_BYTES,
    ResourceError,
    ResourceEstimate,
    available_memory,
    check_fits,
    estimate_training,
    process_memory_bytes,
    scheduler_resources,
    slow_step_warning,
)
from tga.train import TrainConfig

LOW, HIGH = 0.67, 1.5
assert HIGH <= MEMORY_SAFETY_FACTOR  # the safety factor covers the worst estimate the test allows

TRAINING = {"max_steps": 3, "warmup_steps": 1, "eval_interval": 3, "eval_batches": 1, "checkpoint_interval": 3,
            "device": "cpu", "threads": 1}
CASES = {
    # vocab 2048 x 16 x 256 tokens: the logits (and their gradients) dominate
    "logits": ({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 256, "dropout": 0.0}, {"batch_size": 16}, 2047),
    # wide, deep, small vocabulary: the activations the blocks keep dominate
    "activations": ({"n_layer": 6, "n_head": 4, "n_embd": 256, "block_size": 256, "dropout": 0.0,
                     "activation": "gelu"}, {"batch_size": 16}, 63),
    # dropout on CPU makes attention materialize (window x window) matrices
    "attention": ({"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 1024, "dropout": 0.1},
                  {"batch_size": 4}, 63),
    # 25M weights in a short window: weights, gradients and AdamW's moments dominate
    "weights": ({"n_layer": 8, "n_head": 8, "n_embd": 512, "block_size": 16, "dropout": 0.0},
                {"batch_size": 2}, 1023),
}


def _write_tokens(folder: Path, vocab: int, n_chars: int, seed: int = 0) -> dict[str, Path]:
    """Train/validation token files over ``vocab`` distinct characters (+ <unk>)."""
    from tga.data import tokenize_to_file
    from tga.tokenizers import CharTokenizer

    rng = random.Random(seed)
    alphabet = [chr(0x4E00 + i) for i in range(vocab)]
    text = "".join(alphabet) + "".join(rng.choice(alphabet) for _ in range(n_chars))
    tokenizer = CharTokenizer.from_text(text)
    paths = {}
    for split in ("train", "validation"):
        source = folder / f"{split}.txt"
        source.write_text(text, encoding="utf-8")
        paths[split] = folder / f"{split}.bin"
        tokenize_to_file(source, tokenizer, paths[split])
    return paths


def measure_training_peak(model: dict, training: dict, vocab: int, folder: Path) -> tuple[int, int]:
    """(peak RSS, RSS after imports) in bytes of a fresh process that runs train_model."""
    tokens = _write_tokens(folder, vocab, 20_000)
    spec = {"model": {**model, "vocab_size": vocab + 1}, "training": {**TRAINING, **training},
            "train": str(tokens["train"]), "validation": str(tokens["validation"]), "out": str(folder / "run")}
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak, base = json.loads(proc.stdout.strip().splitlines()[-1])
    return peak, base


def _child(spec: dict) -> None:
    """Run in the fresh process: imports, then training; print peak and base RSS (bytes)."""
    from tga.train import train_model

    # getrusage's ru_maxrss can carry the forking parent's peak (a large pytest process)
    # into this process, so reset the high-water mark and read it from /proc instead.
    Path("/proc/self/clear_refs").write_text("5")
    base = process_memory_bytes("VmRSS")
    train_model(ModelConfig(**spec["model"]), TrainConfig(**spec["training"]), Path(spec["train"]),
                Path(spec["validation"]), Path(spec["out"]), show_progress=False)
    print(json.dumps([process_memory_bytes("VmHWM"), base]))


@pytest.mark.workflow  # a training run in a fresh process for each case
@pytest.mark.parametrize("case", list(CASES))
def test_training_memory_estimate_matches_measured_peak(tmp_path, case):
    model, training, vocab = CASES[case]
    peak, base = measure_training_peak(model, training, vocab, tmp_path)
    config = ModelConfig(**{**model, "vocab_size": vocab + 1})
    n_tokens = 2 * (20_000 + vocab)
    estimate = estimate_training(config, {**TRAINING, **training}, "cpu", n_tokens)
    estimated = estimate.host_bytes - PROCESS_BASE_BYTES["train"]
    measured = peak - base
    print(f"\n{case}: estimated {estimated / 2**20:.0f} MB, measured {measured / 2**20:.0f} MB "
          f"(ratio {estimated / measured:.2f}; parts {  {k: round(v / 2**20) for k, v in estimate.parts.items()} })")
    assert LOW * measured <= estimated <= HIGH * measured, (case, estimated, measured)
    largest = max((p for p in estimate.parts.items() if p[0] != "process"), key=lambda kv: kv[1])[0]
    assert case in largest, (case, estimate.parts)  # each case exercises the part it is named after


@pytest.mark.parametrize("overrides", [{}, {"position_encoding": "learned", "unigram_bias": True},
                                       {"norm": "layernorm", "bias": True, "activation": "gelu"},
                                       {"mlp": False}])
def test_parameter_count_is_the_models(overrides):
    from tga.resources import _parameters

    config = ModelConfig(vocab_size=1000, block_size=32, n_layer=2, n_head=2, n_embd=64, **overrides)
    assert _parameters(config) == sum(p.numel() for p in Transformer(config).parameters())


def test_a_typo_sized_batch_is_refused_with_one_line_naming_the_key():
    config = ModelConfig(vocab_size=200, block_size=64, n_layer=4, n_head=4, n_embd=64, dropout=0.0)
    estimate = estimate_training(config, {"batch_size": 100_000, "max_steps": 400}, "cpu")
    with pytest.raises(ResourceError) as info:
        check_fits(estimate, (24 * 2**30, "this machine"))
    message = str(info.value)
    assert "\n" not in message and "training.batch_size (100000)" in message and "24.0 GB" in message
    check_fits(estimate_training(config, {"batch_size": 16}, "cpu"), (24 * 2**30, "this machine"))  # fits


def test_a_long_window_warns_with_the_time_estimate():
    config = ModelConfig(vocab_size=200, block_size=100_000, n_layer=4, n_head=4, n_embd=64, dropout=0.0)
    estimate = estimate_training(config, {"batch_size": 1, "max_steps": 400}, "cpu", threads=1)
    warning = slow_step_warning(estimate)
    assert warning and "model.block_size" in warning and "400 steps" in warning
    small = estimate_training(ModelConfig(vocab_size=200, block_size=64, n_layer=2, n_head=2, n_embd=32),
                              {"batch_size": 4}, "cpu")
    assert slow_step_warning(small) is None


def test_scheduler_requests_carry_the_safety_factor():
    estimate = ResourceEstimate("train", "cpu", "fp32", host_bytes=1000 * 2**20, device_bytes=0, steps=100,
                                seconds_per_step=6.0)
    assert scheduler_resources(estimate) == {"mem_mb": 1500, "runtime": 30}


def test_available_memory_reads_the_machine_and_cgroup():
    have, where = available_memory("cpu")
    total_kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:")).split()[1])
    assert 0 < have <= total_kb * 1024 and "machine" in where


GPT2_SMALL = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0,
                         activation="gelu")


def test_micro_batches_set_the_activations_and_accumulate_to_the_global_batch():
    whole = estimate_training(GPT2_SMALL, {"batch_size": 16}, "cuda")
    micro = estimate_training(GPT2_SMALL, {"batch_size": 512, "micro_batch_size": 16}, "cuda")
    assert micro.accumulation == 32 and whole.accumulation == 1
    assert micro.parts["activations"] == whole.parts["activations"]  # one forward of 16 windows either way
    assert micro.tokens_per_step == 32 * whole.tokens_per_step
    assert micro.flops_per_step == pytest.approx(32 * whole.flops_per_step)
    # null micro_batch_size: the global batch split over the processes, no accumulation
    split = estimate_training(GPT2_SMALL, {"batch_size": 128}, "cuda", world_size=8)
    assert split.accumulation == 1 and split.parts["activations"] == whole.parts["activations"]


def test_ddp_adds_gradient_buckets_and_shares_the_work():
    one = estimate_training(GPT2_SMALL, {"batch_size": 512, "micro_batch_size": 16}, "cuda", world_size=1)
    eight = estimate_training(GPT2_SMALL, {"batch_size": 512, "micro_batch_size": 16}, "cuda", world_size=8)
    from tga.resources import _parameters  # equal to the model's count (test above)

    params = _parameters(GPT2_SMALL)
    assert one.parts["DDP gradient buckets"] == 0 and eight.parts["DDP gradient buckets"] == 4 * params
    assert eight.device_bytes - one.device_bytes == 4 * params
    assert eight.accumulation == 4 and eight.flops_per_step == pytest.approx(one.flops_per_step / 8)
    assert eight.tokens_per_second > 7 * one.tokens_per_second


def test_the_full_head_is_counted_where_training_takes_it():
    from tga.device import loss_head_choice

    training = {"batch_size": 16}
    chunked = estimate_training(GPT2_SMALL, training, "cuda")  # GPU memory unknown: the chunked head
    full = estimate_training(GPT2_SMALL, {**training, "loss_head": "full"}, "cuda")
    n_logits = 16 * 1024 * GPT2_SMALL.padded_vocab_size
    assert full.parts["logits"] == n_logits * 12 > 3 * chunked.parts["logits"]
    for memory in (80 * 2**30, 16 * 2**30):  # auto resolves as training resolves it for that GPU
        auto = estimate_training(GPT2_SMALL, training, "cuda", device_memory=memory)
        expected = full if loss_head_choice("auto", "cuda", n_logits, memory) == "full" else chunked
        assert auto.parts["logits"] == expected.parts["logits"], memory
    assert estimate_training(GPT2_SMALL, training, "cuda", device_memory=80 * 2**30).parts["logits"] == \
        full.parts["logits"]


def test_a_gpu_job_that_cannot_fit_names_the_micro_batch(monkeypatch):
    import tga.resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda device_type="cpu", index=None: (8 * 2**30, "the GPU (test)"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ResourceError) as info:
        resources.check_training_fits(GPT2_SMALL, {"batch_size": 512, "micro_batch_size": 64}, "cuda", warn=print)
    assert "training.micro_batch_size (64)" in str(info.value) and "8.0 GB" in str(info.value)
    with pytest.raises(ResourceError) as info:  # no micro-batch: the message suggests one
        resources.check_training_fits(GPT2_SMALL, {"batch_size": 64}, "cuda", warn=print)
    assert "training.batch_size (64)" in str(info.value) and "micro_batch_size" in str(info.value)


@pytest.mark.parametrize("batch, measured_ms", [(8, 9.56), (64, 13.0)])
def test_the_cuda_time_model_matches_the_h200_measurements(batch, measured_ms):
    """docs/benchmarks.md: tga's compiled bf16 step of the default model (llama-preln)
    on one H200 took 9.56 ms at batch 8 x 256 and 13.0 ms at 64 x 256; the estimate of
    a step (no validation) is within 2x of each."""
    default = ModelConfig(vocab_size=50257, block_size=256, n_layer=6, n_head=6, n_embd=384)
    estimate = estimate_training(default, {"batch_size": batch, "eval_batches": 0}, "cuda")
    assert 0.5 * measured_ms <= estimate.seconds_per_step * 1000 <= 2 * measured_ms


def test_a_datasets_corpus_and_test_windows_size_the_jobs():
    from tga.resources import HELD_OUT_DOCUMENT_TOKENS, _corpus_tokens, _prompt_shape, _test_tokens

    config = {"data": {"source": "hf", "token_budget": 1000, "validation_documents": 3, "test_documents": 5},
              "tokenizer": {"name": "gpt2"}}
    assert _corpus_tokens(config) == 1000 + 3 * HELD_OUT_DOCUMENT_TOKENS
    assert _test_tokens(config, 0) == 5 * HELD_OUT_DOCUMENT_TOKENS
    assert _prompt_shape({"test_windows": 256, "length": 1024, "seed": 0}) == (1024, 256)


def test_geometry_on_the_gpu_batches_its_forwards_on_the_device():
    from tga.resources import estimate_geometry

    cpu = estimate_geometry(GPT2_SMALL, 1024, n_prompts=256, device_type="cpu")
    one = estimate_geometry(GPT2_SMALL, 1024, n_prompts=256, device_type="cuda", batch_size=1)
    sixteen = estimate_geometry(GPT2_SMALL, 1024, n_prompts=256, device_type="cuda", batch_size=16)
    assert cpu.device_bytes == 0 and one.device_bytes > 0
    states = (GPT2_SMALL.n_layer + 2) * 1024 * 768 * 4  # one prompt's hidden states, fp32
    assert sixteen.parts["logits"] == 16 * one.parts["logits"]
    assert sixteen.device_bytes - one.device_bytes == 15 * (states + one.parts["logits"])
    assert one.host_bytes - one.parts["process"] < cpu.host_bytes - cpu.parts["process"]  # logits on the GPU
    assert sixteen.seconds < one.seconds < cpu.seconds


def test_the_scheduler_sizes_gpu_geometry_with_the_batch_the_job_takes():
    """geometry.batch_size null means 32 prompts per forward on a GPU (tga.geometry's
    resolve_batch_size) and 1 on a CPU: the workflow's estimate resolves it the same way."""
    from tga.prompt_windows import DEVICE_BATCH_SIZE
    from tga.resources import estimate_geometry, estimate_variant_jobs
    from snakemake.utils import validate

    from tga.schema import SCHEMA_PATH
    from tga.settings import merged_config, resolve_variant

    root = Path(__file__).resolve().parents[1]
    config = merged_config([root / "config" / "config.yaml", root / "config" / "recipes" / "gpt2-small.yaml"])
    validate(config, str(SCHEMA_PATH))
    config["geometry"] = {**config["geometry"], "batch_size": None, "device": "cuda"}
    resolved = resolve_variant(config, "llama-preln")
    job = estimate_variant_jobs(config, resolved, 50257, this_machine=False)["geometry"]
    model = ModelConfig.from_dict({**resolved["model"], "vocab_size": 50257})
    expected = estimate_geometry(model, 1024, 128, 2, "cuda", batch_size=DEVICE_BATCH_SIZE)
    assert job.device_bytes == expected.device_bytes
    assert job.device_bytes > estimate_geometry(model, 1024, 128, 2, "cuda", batch_size=1).device_bytes


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
