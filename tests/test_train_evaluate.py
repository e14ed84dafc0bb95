"""Training loop and perplexity evaluation on tiny synthetic corpora."""

import csv
import math

import numpy as np
import pytest
import torch

from tga.data import tokenize_to_file
from tga.evaluate import evaluate_checkpoint, perplexity_metrics, summed_loss_over_windows
from tga.model import CheckpointError, ModelConfig, Transformer, load_checkpoint, save_checkpoint
from tga.tokenizers import CharTokenizer
from tga.train import (
    LOG_COLUMNS,
    TrainConfig,
    TrainConfigError,
    TrainingError,
    checkpoint_steps,
    clear_run,
    learning_rate_at,
    make_optimizer,
    optimizer_param_groups,
    run_checkpoint,
    train_model,
)

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40
MODEL = ModelConfig(vocab_size=1, block_size=16, n_layer=2, n_head=2, n_embd=32, norm_position="post")


@pytest.fixture()
def token_files(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "valid.txt").write_text(TEXT[:400])
    tokenizer = CharTokenizer.from_text(TEXT)
    tokenize_to_file(tmp_path / "train.txt", tokenizer, tmp_path / "train.bin")
    tokenize_to_file(tmp_path / "valid.txt", tokenizer, tmp_path / "valid.bin")
    return tmp_path / "train.bin", tmp_path / "valid.bin"


def small_config(**overrides) -> TrainConfig:
    values = dict(max_steps=30, batch_size=4, learning_rate=3e-3, warmup_steps=5, eval_interval=10,
                  eval_batches=2, checkpoint_interval=10, checkpoint_spacing="linear", device="cpu", threads=1)
    return TrainConfig(**{**values, **overrides})


def test_training_learns_logs_and_checkpoints(token_files, tmp_path):
    train, valid = token_files
    out = tmp_path / "run"
    summary = train_model(MODEL, small_config(), train, valid, out, show_progress=False)
    with open(out / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == LOG_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.3  # from the unigram prior
    assert math.isclose(float(rows[-1]["val_ppl"]), math.exp(float(rows[-1]["val_loss"])), rel_tol=1e-4)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows[1:])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step000010.pt", "step000020.pt", "step000030.pt"]
    init, extra_init = load_checkpoint(out / "init.pt")
    final, extra_final = load_checkpoint(out / "final.pt")
    assert extra_init["step"] == 0 and extra_final["step"] == 30
    assert final.config.vocab_size == CharTokenizer.from_text(TEXT).vocab_size
    assert not torch.equal(init.blocks[0].attn.qkv.weight, final.blocks[0].attn.qkv.weight)
    assert summary["final_val_ppl"] == pytest.approx(float(rows[-1]["val_ppl"]), rel=1e-4)


def test_training_starts_the_logit_bias_at_the_training_tokens_prior(token_files, tmp_path):
    train, valid = token_files
    with_bias = ModelConfig(**{**MODEL.__dict__, "unigram_bias": True})  # opt-in (small-data recipe)
    train_model(with_bias, small_config(max_steps=1, warmup_steps=1, eval_interval=1, checkpoint_interval=1), train,
                valid, tmp_path / "run", show_progress=False)
    init, _ = load_checkpoint(tmp_path / "run" / "init.pt")
    vocab = init.config.vocab_size
    tokens = torch.from_numpy(np.fromfile(train, dtype=np.uint16).astype(np.int64))
    counts = torch.bincount(tokens, minlength=vocab).double() + 1.0
    assert torch.allclose(init.logit_bias[:vocab].double(), (counts / counts.sum()).log(), atol=1e-5)


def test_cpu_training_is_reproducible_for_a_seed(token_files, tmp_path):
    train, valid = token_files
    config = small_config(max_steps=12)
    dropout_model = ModelConfig(**{**MODEL.__dict__, "dropout": 0.1})
    for name in ("a", "b", "c"):
        seed = 1 if name == "c" else 0
        train_model(dropout_model, TrainConfig(**{**config.__dict__, "seed": seed}), train, valid,
                    tmp_path / name, show_progress=False)
    a = load_checkpoint(tmp_path / "a" / "final.pt")[0].state_dict()
    b = load_checkpoint(tmp_path / "b" / "final.pt")[0].state_dict()
    c = load_checkpoint(tmp_path / "c" / "final.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_rare_relabeling_changes_training_and_stays_reproducible(token_files, tmp_path):
    train, valid = token_files
    counts = np.bincount(np.fromfile(train, dtype=np.uint16))
    max_count = int(np.median(counts[counts > 0]))  # about half the characters are "rare"
    runs = {"off": small_config(max_steps=6, rare_relabel_probability=0.0), "a": None, "b": None}
    runs["a"] = runs["b"] = small_config(max_steps=6, rare_relabel_probability=1.0, rare_relabel_max_count=max_count)
    for name, config in runs.items():
        train_model(MODEL, config, train, valid, tmp_path / name, show_progress=False)
    off, a, b = (load_checkpoint(tmp_path / name / "final.pt")[0].state_dict() for name in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["token_embedding.weight"], off["token_embedding.weight"])


def test_divergence_stops_with_variant_seed_and_step(token_files, tmp_path):
    train, valid = token_files
    with pytest.raises(TrainingError, match=r"llama-postln/seed3 diverged: .* at step \d+ \(seed 3\)"):
        train_model(MODEL, small_config(learning_rate=1e6, grad_clip=0.0, seed=3), train, valid,
                    tmp_path / "run", run_name="llama-postln/seed3", show_progress=False)
    with open(tmp_path / "run" / "train_log.csv") as handle:
        assert list(csv.DictReader(handle))[0]["step"] == "0"


def test_a_run_folder_is_found_from_its_checkpoints_and_cleared(token_files, tmp_path):
    train, valid = token_files
    run = tmp_path / "run"
    train_model(MODEL, small_config(max_steps=4, warmup_steps=1, checkpoint_interval=2, eval_interval=2), train, valid, run,
                show_progress=False)
    assert run_checkpoint(run) == (run / "final.pt", run)
    step = run / "checkpoints" / "step000002.pt"
    assert run_checkpoint(step) == (step, run) and run_checkpoint(run / "init.pt") == (run / "init.pt", run)
    with pytest.raises(CheckpointError, match="does not exist"):
        run_checkpoint(tmp_path / "nope")
    (run / "tokenizer.json").write_text("{}")
    clear_run(run)
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "tokenizer.json"]  # only the run's files go
    with pytest.raises(CheckpointError, match="has no final.pt"):
        run_checkpoint(run)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    config = TrainConfig(max_steps=110, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert learning_rate_at(0, config) == pytest.approx(0.1)
    assert learning_rate_at(9, config) == pytest.approx(1.0)
    assert learning_rate_at(10, config) == pytest.approx(1.0)
    assert learning_rate_at(60, config) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert learning_rate_at(110, config) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_or_embeddings():
    model = Transformer(ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16,
                                    norm="layernorm", bias=True, unigram_bias=True))
    decay, no_decay, tokens = optimizer_param_groups(model, 0.1, token_eps=1e-6)
    decayed = {id(p) for p in decay["params"]}
    for name, param in model.named_parameters():
        should_decay = name.endswith("weight") and param.dim() == 2 and "embedding" not in name
        assert (id(param) in decayed) == should_decay, name
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # Only the tied token embedding and the logit bias get the larger Adam eps.
    assert {id(p) for p in tokens["params"]} == {id(model.token_embedding.weight), id(model.logit_bias)}
    assert tokens["weight_decay"] == 0.0 and tokens["eps"] == 1e-6
    optimizer = make_optimizer(model, TrainConfig(token_adam_eps=1e-5), torch.device("cpu"))
    assert [group["eps"] for group in optimizer.param_groups] == [1e-8, 1e-8, 1e-5]


def test_checkpoint_steps_and_bad_training_settings():
    assert checkpoint_steps(TrainConfig(max_steps=1000, checkpoint_interval=200, checkpoint_spacing="linear")) == [
        200, 400, 600, 800, 1000]
    assert checkpoint_steps(TrainConfig(max_steps=1000)) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # log, the default
    with pytest.raises(TrainConfigError, match="warmup_steps=20"):
        TrainConfig(max_steps=10, warmup_steps=20)
    with pytest.raises(TrainConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TrainConfigError, match=r"rare_relabel_probability=1.5 must be <= 1"):
        TrainConfig(rare_relabel_probability=1.5)
    with pytest.raises(TrainConfigError, match="rare_relabel_max_count=-1 must be >= 0"):
        TrainConfig(rare_relabel_max_count=-1)
    with pytest.raises(TrainConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"lr": 1.0})


def test_uniform_model_has_perplexity_equal_to_vocabulary_size(tmp_path):
    text = "".join(chr(ord("A") + i % 37) for i in range(203))
    (tmp_path / "t.txt").write_text(text)
    tokenizer = CharTokenizer.from_text(text)  # 37 distinct characters + <unk> = 38
    assert tokenizer.vocab_size == 38
    model = Transformer(ModelConfig(vocab_size=38, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.token_embedding.weight.zero_()  # tied head: every logit is 0
    path = tmp_path / "uniform.pt"
    save_checkpoint(path, model)
    tokenize_to_file(tmp_path / "t.txt", tokenizer, tmp_path / "t.bin")
    result = evaluate_checkpoint(path, tmp_path / "t.bin", tmp_path / "ppl.json", device="cpu")
    assert result["token_ppl"] == pytest.approx(38.0, rel=1e-5)
    assert result["n_tokens_scored"] == 202  # every token but the first, exactly once
    assert result["bits_per_byte"] == pytest.approx(202 * math.log2(38) / 203, rel=1e-5)


def test_window_scoring_counts_each_target_once_with_a_partial_last_window():
    model = Transformer(ModelConfig(vocab_size=11, block_size=4, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.token_embedding.weight.zero_()
    tokens = torch.arange(10, dtype=torch.int32) % 11
    total, count = summed_loss_over_windows(model, tokens, block_size=4, batch_size=2)
    assert count == 9
    assert total == pytest.approx(9 * math.log(11), rel=1e-6)


class MeanTargetLoss(torch.nn.Module):
    """Scores a window by the mean id of its targets, so a sum reveals which windows were read."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, y):
        real = y != -100
        return type("Out", (), {"loss": (y * real).sum() / real.sum()})()


def test_a_validation_subset_is_spread_over_the_whole_split():
    tokens = torch.arange(41, dtype=torch.int32)  # 10 windows of 4; window k predicts 4k+1 .. 4k+4
    total, count = summed_loss_over_windows(MeanTargetLoss(), tokens, block_size=4, batch_size=2, max_windows=3)
    assert count == 12
    assert total == pytest.approx(4 * ((0 + 4 + 9) * 4 + 3 * 2.5))  # windows 0, 4 and 9, not 0, 1 and 2


def test_perplexity_metrics_by_hand():
    metrics = perplexity_metrics(total_nats=20.0, n_scored=10, n_bytes=40, n_words=5)
    assert metrics["token_ppl"] == pytest.approx(math.exp(2.0))
    assert metrics["bits_per_byte"] == pytest.approx(20.0 / math.log(2) / 40)
    assert metrics["word_ppl"] == pytest.approx(math.exp(4.0))
