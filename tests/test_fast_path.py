"""The GPU fast path, checked on the CPU: the compile and precision decisions, the
compiled training step (no graph breaks, the eager loss), and the fused chunked
output head and loss (equal to the plain path, never holding the full logits).

Compiled tests trace with the ``aot_eager`` backend: it runs dynamo and AOTAutograd
as Inductor would, without building C++ (minutes on a small CPU)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tga.device import DeviceError, Runtime, choose_precision, compile_decision
from tga.lm_head import chunked_cross_entropy
from tga.model import ModelConfig, Transformer
from tga.resume import TrainState, run_settings
from tga.schema import TrainConfig
from tga.train import TrainingStep, compile_for_training, make_optimizer, token_counts_and_relabeler

TINY = dict(vocab_size=101, block_size=12, n_layer=2, n_head=2, n_embd=32, dropout=0.0)  # vocab pads to 128
VOCAB, PADDED = 101, 128


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------- decisions


def test_compile_auto_compiles_on_cuda_only_and_true_false_force_it():
    assert compile_decision("auto", "cuda") is True
    assert compile_decision("auto", "cpu") is False
    assert compile_decision("auto", "mps") is False
    assert compile_decision(True, "cpu") is True and compile_decision(False, "cuda") is False


def test_compile_setting_takes_auto_and_the_old_booleans_from_configs_and_the_command_line():
    from tga.cli import _schema_flag
    from tga.settings import coerce_config_types

    assert TrainConfig().compile == "auto"
    assert TrainConfig(compile=True).compile is True and TrainConfig(compile=False).compile is False
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="yes")
    given = {"training": {"compile": "true"}, "variants": {"v": {"compile": "auto"}}}
    assert coerce_config_types(given) == {"training": {"compile": True}, "variants": {"v": {"compile": "auto"}}}
    parser = argparse.ArgumentParser()
    _schema_flag(parser, "training", "compile")
    assert parser.parse_args(["--compile", "false"]).compile is False
    assert parser.parse_args([]).compile == "auto"


def test_resume_fingerprint_stores_compile_resolved():
    """A state saved under the old default (compile: false) on a CPU resumes under auto."""
    model, runtime = ModelConfig(**TINY), Runtime.resolve("cpu")
    auto = run_settings(model, TrainConfig(compile="auto"), runtime, {}, {})
    assert auto == run_settings(model, TrainConfig(compile=False), runtime, {}, {})
    assert auto != run_settings(model, TrainConfig(compile=True), runtime, {}, {})
    assert auto["training"]["compile"] is False


def test_precision_follows_what_the_device_supports():
    assert choose_precision("cuda", True, "auto") == ("bf16", None)
    fallback = choose_precision("cuda", False, "auto")  # V100, T4
    assert fallback.precision == "fp32" and "no native bf16" in fallback.note
    for device_type in ("cpu", "mps"):
        assert choose_precision(device_type, True, "auto") == ("fp32", None)
        assert choose_precision(device_type, True, "bf16") == ("bf16", None)  # opt-in there
    assert choose_precision("cuda", False, "fp32") == ("fp32", None)
    with pytest.raises(DeviceError, match=r"precision='bf16'.*set precision: auto or fp32"):
        choose_precision("cuda", False, "bf16")


# --------------------------------------------------------------------------- the fused head


def head_inputs(n_tokens: int, dtype: torch.dtype, seed: int = 0):
    """Hidden states, a padded weight, a padded bias and targets with ignored positions."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, 16, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(PADDED, 16, dtype=dtype, generator=g).requires_grad_()
    bias = torch.randn(PADDED, dtype=dtype, generator=g).requires_grad_()
    targets = torch.randint(0, VOCAB, (n_tokens,), generator=g)
    targets[::4] = -100
    return hidden, weight, bias, targets


def plain_loss(hidden, weight, bias, targets):
    """The reference: full logits over the real vocabulary, then F.cross_entropy."""
    return F.cross_entropy(F.linear(hidden, weight[:VOCAB], bias[:VOCAB]), targets, ignore_index=-100)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 23, 64])
def test_fused_head_loss_and_gradients_equal_the_plain_path(chunk_tokens):
    """float64, to 1e-12. 23 tokens: chunks of 5 and 7 leave a short last chunk, 64 is
    one chunk. Every chunk's softmax touches every weight row, so a weight gradient
    that were overwritten instead of summed over chunks would fail here; and the loss
    is scaled by 2.5 before backward, which backward must pass on."""
    inputs = head_inputs(23, torch.float64)
    hidden, weight, bias, targets = inputs
    fused = chunked_cross_entropy(hidden, weight, bias, targets, VOCAB, chunk_tokens)
    reference = plain_loss(*inputs)
    assert torch.allclose(fused, reference, rtol=0, atol=1e-12)
    fused_grads = torch.autograd.grad(2.5 * fused, (hidden, weight, bias))
    reference_grads = torch.autograd.grad(2.5 * reference, (hidden, weight, bias))
    for name, a, b in zip(("hidden", "weight", "bias"), fused_grads, reference_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    assert torch.count_nonzero(fused_grads[1][VOCAB:]) == 0 and torch.count_nonzero(fused_grads[2][VOCAB:]) == 0


def test_fused_head_without_a_bias_and_with_every_target_ignored_behaves_as_cross_entropy():
    hidden, weight, _, targets = head_inputs(10, torch.float64)
    fused = chunked_cross_entropy(hidden, weight, None, targets, VOCAB, 3)
    assert torch.allclose(fused, F.cross_entropy(F.linear(hidden, weight[:VOCAB]), targets), atol=1e-12)
    ignored = torch.full_like(targets, -100)
    fused = chunked_cross_entropy(hidden, weight, None, ignored, VOCAB, 3)
    reference = F.cross_entropy(F.linear(hidden, weight[:VOCAB]), ignored)
    assert math.isnan(fused.item()) and math.isnan(reference.item())  # a mean over nothing
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    assert all(torch.count_nonzero(g) == 0 for g in fused_grads)  # as F.cross_entropy's: zero, not NaN
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(reference, (hidden, weight)))


def test_fused_head_under_bf16_autocast_matches_the_plain_path_and_keeps_fp32_gradients():
    """Both paths run their matmuls in bf16 and the softmax in fp32; they differ only by
    bf16 rounding of the matmul outputs (a relative 2^-8), so loss to 1e-2 absolute and
    gradients to 3% of their largest entry."""
    inputs = head_inputs(40, torch.float32)
    hidden, weight, bias, targets = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = chunked_cross_entropy(hidden, weight, bias, targets, VOCAB, 16)
        reference = plain_loss(*inputs).float()
    assert fused.dtype == torch.float32
    assert abs(fused.item() - reference.item()) < 1e-2
    fused_grads = torch.autograd.grad(fused, (hidden, weight, bias))
    reference_grads = torch.autograd.grad(reference, (hidden, weight, bias))
    for a, b in zip(fused_grads, reference_grads):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 0.03 * b.abs().max()


def saved_shapes(run) -> list[torch.Size]:
    """The shapes of every tensor autograd saves for backward while ``run`` runs."""
    shapes: list[torch.Size] = []

    def pack(tensor):
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return shapes


def test_training_forward_never_saves_the_full_logits():
    """The plain path saves a (tokens x vocab) tensor for backward (the positive control
    that shows the hook sees it); the fused path saves nothing with a vocabulary-sized
    dimension that is as large (its largest is the weight's gradient, 128 x 32 values,
    fewer than the 48 x 101 logits)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "unigram_bias": True}), loss_chunk_tokens=8)
    idx = torch.randint(0, VOCAB, (4, 12))
    n_tokens = idx.numel()

    def holds_logits(shape: torch.Size) -> bool:
        return (VOCAB in shape or PADDED in shape) and shape.numel() >= n_tokens * VOCAB

    assert any(holds_logits(s) for s in saved_shapes(lambda: model(idx, idx).loss))
    fused = saved_shapes(lambda: model(idx, idx, return_logits=False).loss)
    assert torch.Size([PADDED, TINY["n_embd"]]) in fused and not any(holds_logits(s) for s in fused)


def test_model_training_loss_equals_the_evaluation_loss_with_the_same_gradients():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "unigram_bias": True, "position_encoding": "learned"}),
                        loss_chunk_tokens=7)
    idx = torch.randint(0, VOCAB, (3, 12))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    eval_out = model(idx, targets)
    eval_grads = torch.autograd.grad(eval_out.loss, list(model.parameters()))
    train_out = model(idx, targets, return_logits=False)
    assert train_out.logits is None
    assert torch.allclose(train_out.loss, eval_out.loss, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad(train_out.loss, list(model.parameters())), eval_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="give targets"):
        model(idx, return_logits=False)


# --------------------------------------------------------------------------- the compiled step


@pytest.mark.parametrize("variant, precision", [
    (dict(norm_position="pre", norm="rmsnorm", activation="swiglu"), "bf16"),  # under autocast, as on CUDA
    (dict(norm_position="post", norm="layernorm", activation="gelu", unigram_bias=True,
          position_encoding="learned", dropout=0.1), "fp32"),
])
def test_training_forward_and_loss_trace_as_one_graph(variant, precision):
    model = Transformer(ModelConfig(**{**TINY, **variant}), loss_chunk_tokens=8).train()
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        explanation = torch._dynamo.explain(model)(idx, idx, return_logits=False)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_compiled_training_is_fullgraph_so_a_graph_break_fails_loudly():
    class Breaks(torch.nn.Module):
        def forward(self, x):
            torch._dynamo.graph_break()
            return x + 1

    compiled = compile_for_training(Breaks(), TrainConfig(compile=True), "cpu", backend="aot_eager")
    with pytest.raises(Exception, match="graph_break|Graph break|graph break"):
        compiled(torch.ones(2))


def pipeline_step(config: TrainConfig, loss_chunk_tokens: int = 8, **model_overrides) -> TrainingStep:
    """The pipeline's training step on a tiny seeded model and random tokens, compiled
    (aot_eager) where ``config.compile`` says so on a CPU. The traced graph holds one
    piece per loss chunk: a larger ``loss_chunk_tokens`` traces faster."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **model_overrides}), loss_chunk_tokens=loss_chunk_tokens)
    data = torch.randint(0, VOCAB, (500,), dtype=torch.int32)
    _, relabel = token_counts_and_relabeler(data, VOCAB, config)
    forward = compile_for_training(model, config, "cpu", backend="aot_eager")
    return TrainingStep(model, forward, make_optimizer(model, config, torch.device("cpu")), data,
                        torch.Generator().manual_seed(1), relabel, config, TINY["block_size"],
                        torch.autocast("cpu", enabled=False))


def step_losses(compile_setting: bool | str, steps: int = 3) -> list[float]:
    """Losses of the pipeline's training step from one seed, compiled (aot_eager) or not."""
    config = TrainConfig(batch_size=2, compile=compile_setting, learning_rate=1e-3, warmup_steps=1, device="cpu")
    step = pipeline_step(config, unigram_bias=True)
    assert (step.forward is step.model) == (compile_setting in ("auto", False))
    state, losses = TrainState().on(torch.device("cpu")), []
    for i in range(steps):
        before = state.loss_sum.item()
        step(state, i)
        losses.append(state.loss_sum.item() - before)
    assert state.step == steps and state.first_bad_step.item() == -1
    return losses


def test_compiled_training_step_gives_the_eager_losses():
    """Three optimizer steps (the later losses see the compiled backward's updates) agree
    to 1e-5: fp32, reordered sums only. ``auto`` on a CPU is eager."""
    eager = step_losses("auto")
    compiled = step_losses(True)
    assert all(math.isfinite(x) for x in eager)
    assert compiled == pytest.approx(eager, abs=1e-5)


def test_training_step_records_the_first_nan_step():
    step = pipeline_step(TrainConfig(batch_size=2, device="cpu"))
    state = TrainState().on(torch.device("cpu"))
    step(state, 0)
    with torch.no_grad():
        step.model.final_norm.weight.fill_(float("nan"))
    step(state, 1)
    step(state, 2)
    assert state.first_bad_step.item() == 2 and state.steps_since_log == 3


# --------------------------------------------------------------------------- per-device choices (issue 22)


def test_compile_mode_auto_uses_cuda_graphs_for_small_batches_on_cuda_only():
    from tga.device import CUDA_GRAPH_MAX_TOKENS, compile_mode_choice

    assert compile_mode_choice("auto", "cuda", 8 * 256) == "reduce-overhead"
    assert compile_mode_choice("auto", "cuda", CUDA_GRAPH_MAX_TOKENS) == "reduce-overhead"  # batch 64 x 256
    assert compile_mode_choice("auto", "cuda", CUDA_GRAPH_MAX_TOKENS + 1) == "default"
    assert compile_mode_choice("auto", "cpu", 8 * 256) == "default"
    assert compile_mode_choice("auto", "mps", 8 * 256) == "default"
    assert compile_mode_choice("max-autotune", "cpu", 10) == "max-autotune"  # a setting is used as given


def test_loss_head_auto_is_full_on_cuda_when_the_logits_fit_and_chunked_elsewhere():
    from tga.device import FULL_HEAD_BYTES_PER_LOGIT, loss_head_choice

    h200, logits_64 = 141 * 2**30, 64 * 256 * 50304
    assert loss_head_choice("auto", "cuda", logits_64, h200) == "full"
    limit = 4 * FULL_HEAD_BYTES_PER_LOGIT * logits_64  # exactly a quarter of this memory
    assert loss_head_choice("auto", "cuda", logits_64, limit) == "full"
    assert loss_head_choice("auto", "cuda", logits_64, limit - 4) == "chunked"
    assert loss_head_choice("auto", "cpu", 10, h200) == "chunked"
    assert loss_head_choice("auto", "mps", 10, h200) == "chunked"
    assert loss_head_choice("full", "cpu", 10, 0) == "full" and loss_head_choice("chunked", "cuda", 10, h200) == "chunked"


def test_adamw_is_fused_on_cuda_and_torchs_default_elsewhere():
    from tga.device import optimizer_options

    assert optimizer_options("cuda") == {"fused": True}
    assert optimizer_options("cpu") == {} and optimizer_options("mps") == {}
    model = Transformer(ModelConfig(**TINY))
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert not optimizer.defaults.get("fused")


@pytest.mark.parametrize("key, value", [("compile_mode", "fast"), ("loss_head", "fused"), ("loss_head", True)])
def test_a_bad_compile_mode_or_loss_head_is_one_error_naming_the_key_and_the_choices(key, value):
    from tga.schema import TrainConfigError

    with pytest.raises(TrainConfigError, match=rf"training setting {key}=.*(auto|chunked)") as error:
        TrainConfig.from_dict({key: value})
    assert error.value.args[0].count("\n") == 0
    assert TrainConfig().compile_mode == "auto" and TrainConfig().loss_head == "auto"
    with pytest.raises(ValueError, match="loss_head='fused' must be chunked or full"):
        Transformer(ModelConfig(**TINY), loss_head="fused")


def test_full_loss_head_gives_the_chunked_heads_loss_and_gradients():
    """Same parameters, fp32: the paths differ only in the order of their sums (1e-5);
    the full head returns no logits either (the training call asks for none)."""
    config = ModelConfig(**{**TINY, "unigram_bias": True})
    torch.manual_seed(0)
    chunked = Transformer(config, loss_chunk_tokens=7)
    full = Transformer(config, loss_head="full")
    full.load_state_dict(chunked.state_dict())
    idx = torch.randint(0, VOCAB, (3, 12))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    a, b = chunked(idx, targets, return_logits=False), full(idx, targets, return_logits=False)
    assert b.logits is None
    assert torch.allclose(a.loss, b.loss, rtol=0, atol=1e-5)
    for ga, gb in zip(torch.autograd.grad(a.loss, list(chunked.parameters())),
                      torch.autograd.grad(b.loss, list(full.parameters()))):
        assert torch.allclose(ga, gb, rtol=0, atol=1e-5)


def test_training_builds_the_head_and_optimizer_the_device_choices_name(monkeypatch):
    import tga.train as train

    counts = torch.ones(VOCAB, dtype=torch.long)
    model, optimizer, _ = train.new_training_parts(ModelConfig(**TINY), TrainConfig(loss_head="auto"),
                                                   torch.device("cpu"), counts)
    assert model.loss_head == "chunked"
    model, _, _ = train.new_training_parts(ModelConfig(**TINY), TrainConfig(loss_head="full"), torch.device("cpu"),
                                           counts)
    assert model.loss_head == "full"
    seen = {}

    def choice(setting, device_type, n_logits, memory):
        seen.update(setting=setting, device_type=device_type, n_logits=n_logits)
        return "full"

    monkeypatch.setattr(train, "loss_head_choice", choice)
    model, _, _ = train.new_training_parts(ModelConfig(**TINY), TrainConfig(batch_size=3), torch.device("cpu"), counts)
    assert model.loss_head == "full" and seen == {"setting": "auto", "device_type": "cpu", "n_logits": 3 * 12 * PADDED}


def test_compiled_step_gets_the_chosen_mode_for_the_batchs_tokens(monkeypatch):
    """What ``torch.compile`` is called with (Inductor's modes cannot run on this CPU)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    model = Transformer(ModelConfig(**TINY))
    compile_for_training(model, TrainConfig(batch_size=8, compile=True), "cuda")
    compile_for_training(model, TrainConfig(batch_size=8, compile=True), "cpu")
    compile_for_training(model, TrainConfig(batch_size=8, compile=True, compile_mode="max-autotune"), "cuda")
    assert [c["mode"] for c in calls] == ["reduce-overhead", "default", "max-autotune"]
    assert all(c["fullgraph"] and c["dynamic"] is False for c in calls)
    assert compile_for_training(model, TrainConfig(batch_size=8), "cpu") is model  # compile: auto, eager on a CPU


# --------------------------------------------------------------------------- validation through the compiled graph


def train_and_validate(compile_setting: bool | str, steps: int = 3, **model_overrides) -> tuple[list[float], float]:
    """Losses of ``steps`` pipeline steps, then the validation loss through what the
    training loop validates with (the compiled graph when compiled)."""
    from tga.evaluate import mean_loss_over_windows
    from tga.train import evaluation_model

    config = TrainConfig(batch_size=2, compile=compile_setting, learning_rate=1e-3, warmup_steps=1, device="cpu")
    step = pipeline_step(config, unigram_bias=True, **model_overrides)
    state, losses = TrainState().on(torch.device("cpu")), []
    for i in range(steps):
        before = state.loss_sum.item()
        step(state, i)
        losses.append(state.loss_sum.item() - before)
    evaluate = evaluation_model(step.model, step.forward)
    assert (evaluate is step.model) == (step.forward is step.model)
    step.model.eval()
    val = mean_loss_over_windows(evaluate, torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(5)),
                                 TINY["block_size"], 2, max_windows=6)
    return losses, val


def test_validation_through_the_compiled_graph_gives_the_eager_loss():
    """aot_eager traces what Inductor compiles; fp32, reordered sums only: 1e-5."""
    eager_losses, eager_val = train_and_validate("auto")
    compiled_losses, compiled_val = train_and_validate(True)
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert math.isfinite(eager_val) and compiled_val == pytest.approx(eager_val, abs=1e-5)


@pytest.mark.parametrize("batch_size", [2, 50])  # 50 windows of 13 need more than the 500 tokens, as sampling does
def test_warming_the_compiled_graphs_leaves_the_run_as_it_was(batch_size):
    """The warm-up (held under the compile lock) runs a forward and backward with dropout
    on, and a validation batch: afterwards the RNG state, the parameters and the
    gradients are as before, so the first real step draws the same dropout masks."""
    from tga.train import evaluation_model, warm_compiled_graphs

    config = TrainConfig(batch_size=batch_size, compile=True, device="cpu")
    step = pipeline_step(config, loss_chunk_tokens=256, dropout=0.2)  # the warm-up, not the chunking, is tested
    runtime, val_tokens = Runtime.resolve("cpu"), torch.randint(0, VOCAB, (100,))
    rng, params = torch.get_rng_state(), [p.detach().clone() for p in step.model.parameters()]
    warm_compiled_graphs(step, evaluation_model(step.model, step.forward), val_tokens, runtime)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(params, step.model.parameters()))
    assert all(p.grad is None for p in step.model.parameters()) and step.model.training


# --------------------------------------------------------------------------- the shared compile cache


def test_compile_cache_is_set_for_inductor_and_aotautograd(tmp_path, monkeypatch):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from tga.device import use_compile_cache

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    folder = use_compile_cache(tmp_path / "cache" / "torch-compile")
    assert folder.is_dir() and cache_dir() == str(folder)  # where Inductor puts its files, Triton's under it
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    assert inductor_config.fx_graph_cache is True and functorch_config.enable_autograd_cache is True


def test_compile_lock_lets_one_holder_in_at_a_time(tmp_path):
    """A second opener of the same lock (as another job's process would be) cannot take
    it while it is held, and can once it is let go; another key is not blocked."""
    import fcntl

    from tga.device import compile_key, compile_lock

    key = compile_key(model={"n_layer": 2}, batch=8)
    assert key == compile_key(batch=8, model={"n_layer": 2}) and key != compile_key(model={"n_layer": 2}, batch=64)

    def can_take(name: str) -> bool:
        with open(tmp_path / "locks" / f"{name}.lock", "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(other, fcntl.LOCK_UN)
            return True

    with compile_lock(tmp_path, key):
        (tmp_path / "locks" / "other.lock").touch()
        assert not can_take(key) and can_take("other")
    assert can_take(key)


def test_a_compiled_training_job_uses_the_cache_warms_under_the_lock_and_trains_as_eager(tmp_path, monkeypatch):
    """train_model with a compile cache, compiled (aot_eager standing in for Inductor):
    the cache folder is set, the warm-up ran under the graph's lock, and the run's
    log (losses and validation through the compiled graph) equals the eager run's."""
    import csv

    import tga.device
    import tga.train as train
    from tga.data import tokenize_to_file
    from tga.tokenizers import CharTokenizer

    text = "the cat sat on the mat. the dog sat on the log. a bird flew over the old barn. " * 30
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text[:600])
    tokenizer = CharTokenizer.from_text(text)
    tokens = []
    for split in ("train", "valid"):
        tokenize_to_file(tmp_path / f"{split}.txt", tokenizer, tmp_path / f"{split}.bin")
        tokens.append(tmp_path / f"{split}.bin")
    real_compile, real_lock, locked = train.compile_for_training, tga.device.compile_lock, []
    monkeypatch.setattr(train, "compile_for_training",
                        lambda model, config, device_type: real_compile(model, config, device_type, backend="aot_eager"))

    def lock(directory, key):
        locked.append((Path(directory), key))
        return real_lock(directory, key)

    monkeypatch.setattr(train, "compile_lock", lock)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = ModelConfig(vocab_size=1, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    logs = {}
    for compiled in (False, True):
        config = TrainConfig(max_steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=2, eval_interval=6,
                             eval_batches=2, checkpoint_interval=12, device="cpu", threads=1, compile=compiled)
        out = tmp_path / f"run-{compiled}"
        train.train_model(model, config, *tokens, out, show_progress=False, compile_cache=tmp_path / "cache")
        assert (tmp_path / "cache").exists() == compiled  # the eager run, first, leaves it alone
        logs[compiled] = list(csv.DictReader(open(out / "train_log.csv")))
    cache = (tmp_path / "cache").resolve()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    assert sorted(p.name for p in cache.iterdir()) == ["locks"]  # aot_eager writes no kernels
    assert len(locked) == 1 and locked[0][0] == cache and (cache / "locks" / f"{locked[0][1]}.lock").is_file()
    assert [r["step"] for r in logs[True]] == [r["step"] for r in logs[False]] == ["0", "6", "12"]
    for eager, compiled in zip(logs[False], logs[True]):
        for column in ("train_loss", "val_loss"):
            if eager[column]:
                assert float(compiled[column]) == pytest.approx(float(eager[column]), abs=1e-4), column


CACHE_PROBE = """
import sys
from pathlib import Path
import torch
from tga.device import use_compile_cache
use_compile_cache(Path(sys.argv[1]))
from torch._dynamo.utils import counters
step = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="inductor", fullgraph=True)
step(torch.ones(8))
print(counters["inductor"]["fxgraph_cache_hit"], counters["aot_autograd"]["autograd_cache_hit"])
"""


@pytest.mark.workflow  # two fresh processes compile with Inductor
def test_a_second_process_loads_the_compiled_graph_from_the_cache(tmp_path):
    """Two fresh processes compile the same function with Inductor (C++ on this CPU,
    about a minute in all): the first misses both caches, the second hits both."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    hits = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path / "cache")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        hits.append(done.stdout.split())
    assert hits == [["0", "0"], ["1", "1"]]
