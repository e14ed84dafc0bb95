"""The GPU fast path, checked on the CPU: the compile and precision decisions, the
compiled training step (no graph breaks, the eager loss), and the fused chunked
output head and loss (equal to the plain path, never holding the full logits).

Compiled tests trace with the ``aot_eager`` backend: it runs dynamo and AOTAutograd
as Inductor would, without building C++ (minutes on a small CPU)."""

from __future__ import annotations

import argparse
import math

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


def pipeline_step(config: TrainConfig, **model_overrides) -> TrainingStep:
    """The pipeline's training step on a tiny seeded model and random tokens, compiled
    (aot_eager) where ``config.compile`` says so on a CPU."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **model_overrides}), loss_chunk_tokens=8)
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
