"""Training loop: AdamW, warmup + cosine, clipping, periodic validation and checkpoints.

The loop keeps every per-step quantity on the device and only synchronises with the
host at log/eval intervals, so on a GPU the step rate is bound by the arithmetic.
With a ``resume_dir`` it is resumable (:mod:`tga.resume`). A run ends ``ok`` or
``diverged`` (:mod:`tga.status`); both leave a complete set of files, so a workflow
can treat divergence as a result rather than as a failed job. ``run_checkpoint`` finds
a run's checkpoint from its folder and ``clear_run`` removes what a run wrote. Given
``ranks`` (:mod:`tga.distributed`), one run spans several processes with DDP; with
``micro_batch_size`` its global batch accumulates over several forward passes.
"""

from __future__ import annotations

import csv
import math
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from tga.atomic import atomic_write, stale_temporaries
from tga.data import RareTokenRelabeler, load_token_file, read_token_metadata, sample_batch, tokens_to_tensor
from tga.device import (Runtime, compile_decision, compile_key, compile_lock, compile_mode_choice,
                        device_memory_bytes, loss_head_choice, optimizer_options, use_compile_cache)
from tga.distributed import (SINGLE, Ranks, accumulation_steps, all_ranks_agree, data_parallel, end_process_group,
                             gather_to_main, gradient_sync, mean_over_ranks, rank_seed, rank_slice,
                             start_process_group, sum_over_ranks, unwrap_data_parallel)
from tga.evaluate import mean_loss_over_windows, summed_loss_over_windows
from tga.model import CheckpointError, ModelConfig, Transformer, save_checkpoint
from tga.progress import progress as progress_display
from tga.resources import check_training_fits
from tga.resume import ResumeStore, TrainState, restore_optimizer, run_settings, say
# The config is torch-free so that the workflow reads settings without torch.
from tga.schema import TrainConfig, TrainConfigError, checkpoint_steps
from tga.status import DIVERGED, OK, STATUS_FILE, write_status

LOG_COLUMNS = ("step", "lr", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "elapsed_s")
# The files train_model writes into its folder, besides checkpoints/step*.pt.
RUN_FILES = ("init.pt", "final.pt", "train_log.csv", STATUS_FILE)


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, unusable data)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN/inf. Raised after every file is written (``status.json``
    says ``diverged``), so a caller that treats divergence as a result may catch it."""

    def __init__(self, message: str, run_name: str, seed: int, step: int, last_logged_step: int) -> None:
        super().__init__(message)
        self.run_name = run_name
        self.seed = seed
        self.step = step
        self.last_logged_step = last_logged_step


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = peak * config.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def optimizer_param_groups(model: nn.Module, weight_decay: float, token_eps: float) -> list[dict[str, Any]]:
    """Decay only matmul weights: norms' gains, biases and embeddings are left alone.

    The token embedding and logit bias get their own Adam ``eps``. Tokens the training
    split rarely or never holds receive only tiny "push this logit down" gradients,
    which Adam rescales to full-size steps until they fall below ``eps``; with 1e-8
    that crushes the probabilities of test-only tokens, with 1e-6 it stops near the
    mass such tokens really have.
    """
    embedding = getattr(model, "token_embedding", None)
    candidates = (getattr(embedding, "weight", None), getattr(model, "logit_bias", None))
    token_params = {id(p) for p in candidates if isinstance(p, nn.Parameter)}
    decay, no_decay, tokens = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if id(param) in token_params:
                tokens.append(param)
            elif isinstance(module, nn.Linear) and name == "weight":
                decay.append(param)
            else:
                no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": tokens, "weight_decay": 0.0, "eps": token_eps},
    ]


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = optimizer_param_groups(model, config.weight_decay, config.token_adam_eps)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             **optimizer_options(device.type))


def load_tokens_to_device(path: Path, device: torch.device) -> torch.Tensor:
    """The whole token file as int32 on the device, so batches are gathered there."""
    return tokens_to_tensor(load_token_file(path), device)


def compile_for_training(model: nn.Module, config: TrainConfig, device_type: str,
                         backend: str = "inductor") -> nn.Module:
    """The module the training step calls: ``model`` itself, or, where
    :func:`tga.device.compile_decision` says so, its ``torch.compile`` wrapper.

    ``fullgraph=True``: a graph break (a Python construct dynamo cannot trace) is an
    error at the first step instead of a silent fall back to slow eager pieces.
    ``dynamic=False``: every training batch has the same shape, so shapes are
    specialised (a second shape, as in a benchmark of two batch sizes, recompiles
    rather than switching to a slower dynamic-shape graph). The mode is
    :func:`tga.device.compile_mode_choice`'s for the batch's tokens (CUDA graphs for
    small batches on CUDA). ``backend`` is for tests, which trace with ``aot_eager``
    instead of building Inductor's C++ (a mode is Inductor's, so it is not passed)."""
    if not compile_decision(config.compile, device_type):
        return model
    block_size = getattr(getattr(model, "config", None), "block_size", 1)
    mode = compile_mode_choice(config.compile_mode, device_type, config.batch_size * block_size)
    options: dict[str, Any] = {"mode": mode} if backend == "inductor" else {}
    return torch.compile(model, fullgraph=True, dynamic=False, backend=backend, **options)


class CompiledEvaluation(nn.Module):
    """The compiled training model, called for evaluation (under inference mode it
    compiles a second graph): each call starts a new CUDA-graph step, because the
    training step's explicit step marks turn off the automatic ones, and a replay
    without one would find the last call's outputs still counted as alive. What a
    call returns is valid until the next call (the evaluation loop reads its loss at
    once). Parameters are the training model's, so evaluation code finds the device."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs)


def evaluation_model(model: nn.Module, forward: nn.Module) -> nn.Module:
    """What validation calls: the compiled graph when training is compiled (so that the
    validation passes run compiled, and through CUDA graphs where training does), else
    ``model``."""
    return model if forward is model else CompiledEvaluation(forward)


def warm_compiled_graphs(run_step: "TrainingStep", evaluate: nn.Module, val_data: torch.Tensor,
                         runtime: Runtime) -> None:
    """Compile (or load from the cache) the training and evaluation graphs before the
    first step, by calling both once on shapes and strides the loop uses: a forward
    and backward on the first training windows, and a validation pass over one batch.
    Nothing of the run changes: the gradients are dropped, no optimizer steps, and the
    RNG states (dropout draws from them) are put back, so the trajectory is the one
    without this. It exists to be held under :func:`tga.device.compile_lock`. It calls
    the compiled module, not its DDP wrapper: no collective runs while ranks take
    turns at the lock."""
    model, batch, block = run_step.model, run_step.micro_batch, run_step.block_size
    forward = unwrap_data_parallel(run_step.forward)
    rng = runtime.rng_states()
    data = run_step.train_data
    windows = data[torch.arange(block + 1, device=data.device).expand(batch, -1)].long()  # sample_batch's layout
    torch.compiler.cudagraph_mark_step_begin()
    with run_step.amp:
        loss = forward(windows[:, :-1], windows[:, 1:], return_logits=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    mean_loss_over_windows(evaluate, val_data, block, batch, run_step.amp, max_windows=batch)
    model.train()
    runtime.set_rng_states(rng)


def train_step(
    forward_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: Any,
    grad_clip: float,
    accumulation: int = 1,
) -> torch.Tensor:
    """One optimizer step; returns the (mean) loss without synchronising with the host.
    ``forward_model`` may be the compiled or DDP wrapper of ``model``. The loss comes
    from the model's training head (``return_logits=False``: chunked or full, see
    :func:`tga.device.loss_head_choice`).

    With ``accumulation`` > 1 the windows are cut into that many equal micro-batches;
    each micro loss is divided by ``accumulation`` before its backward pass, so the
    summed gradient is the mean loss's over all windows, and a DDP wrapper all-reduces
    only on the last (``no_sync`` before)."""
    total = None
    for index, (x_micro, y_micro) in enumerate(zip(x.chunk(accumulation), y.chunk(accumulation))):
        if forward_model is not model:
            torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph replays may reuse buffers
        with gradient_sync(forward_model, index == accumulation - 1):
            with amp:
                loss = forward_model(x_micro, y_micro, return_logits=False).loss
            (loss if accumulation == 1 else loss / accumulation).backward()
        loss = loss.detach()
        total = loss if total is None else total + loss
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total if accumulation == 1 else total / accumulation


@dataclass
class TrainingStep:
    """The body of one iteration of the training loop, written once so that the
    training rule runs it and ``tga.bench`` times exactly it: the learning rate of the
    schedule, a batch drawn on the device, rare-token relabeling (where configured),
    the optimizer step, and the on-device bookkeeping (loss sum, first NaN/inf step).
    Nothing in it waits for the host; the loop syncs only when it logs.

    In a distributed job every rank draws the same global batch and trains on its own
    slice (:func:`tga.distributed.rank_slice`); the recorded loss is the mean over the
    ranks, so each rank's bookkeeping, divergence included, is the same."""

    model: Transformer
    forward: nn.Module  # ``model`` or its compiled wrapper (:func:`compile_for_training`)
    optimizer: torch.optim.Optimizer
    train_data: torch.Tensor
    generator: torch.Generator
    relabel: RareTokenRelabeler
    config: TrainConfig
    block_size: int
    amp: Any
    ranks: Ranks = SINGLE
    accumulation: int = 1  # forward/backward passes per optimizer step in each process

    @property
    def micro_batch(self) -> int:
        """Windows per forward pass."""
        return self.config.batch_size // (self.ranks.world_size * self.accumulation)

    def __call__(self, state: TrainState, step: int) -> float:
        """Run optimizer step ``step`` (0-based) and record it in ``state``; returns its
        learning rate."""
        lr = learning_rate_at(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(self.train_data, self.config.batch_size, self.block_size, self.generator)
        x, y = self.relabel(*batch, self.generator)
        x, y = rank_slice(x, self.ranks), rank_slice(y, self.ranks)
        loss = train_step(self.forward, self.model, self.optimizer, x, y, self.amp, self.config.grad_clip,
                          self.accumulation)
        loss = mean_over_ranks(loss, self.ranks)
        bad = (state.first_bad_step < 0) & ~torch.isfinite(loss)
        state.first_bad_step = torch.where(bad, torch.full_like(state.first_bad_step, step + 1), state.first_bad_step)
        state.loss_sum += loss
        state.steps_since_log += 1
        state.step = step + 1
        return lr


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_COLUMNS})

    atomic_write(path, write)


def _row(step: int, lr: float, train_loss: float | None, val_loss: float, tokens_per_s: float | None,
         elapsed_s: float) -> dict[str, Any]:
    """One line of ``train_log.csv``, formatted once so a resumed log equals an uninterrupted one."""
    def fmt(value: float | None) -> str | None:
        return None if value is None else f"{value:.6g}"

    return {"step": step, "lr": fmt(lr), "train_loss": fmt(train_loss), "val_loss": fmt(val_loss),
            "val_ppl": fmt(math.exp(val_loss)), "tokens_per_s": fmt(tokens_per_s), "elapsed_s": fmt(elapsed_s)}


def _token_metadata(model_config: ModelConfig, train_tokens: Path, val_tokens: Path) -> tuple[ModelConfig, dict, dict]:
    """Both splits' sidecars, checked against each other, and the model config with the
    tokenizer's vocabulary (a config never has to repeat what the tokenizer decided)."""
    meta, val_meta = read_token_metadata(train_tokens), read_token_metadata(val_tokens)
    if val_meta["vocab_size"] != meta["vocab_size"]:
        raise TrainingError(
            f"{val_tokens} was tokenized with vocab_size={val_meta['vocab_size']} but {train_tokens} with "
            f"{meta['vocab_size']}: tokenize both splits with the same tokenizer"
        )
    model_config = ModelConfig.from_dict({**asdict(model_config), "vocab_size": int(meta["vocab_size"])})
    if meta["n_tokens"] <= model_config.block_size:
        raise TrainingError(
            f"{train_tokens} holds {meta['n_tokens']} tokens, fewer than block_size+1="
            f"{model_config.block_size + 1}: give more training text or a smaller block_size"
        )
    return model_config, meta, val_meta


def _prepare(out_dir: Path) -> Path:
    """``checkpoints/`` (a declared output even when nothing is kept), no status (it
    describes an ended run only), no temporary files of a killed run."""
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out_dir / STATUS_FILE).unlink(missing_ok=True)
    for stale in (*stale_temporaries(out_dir / "init.pt"), *stale_temporaries(out_dir / "final.pt")):
        stale.unlink()
    return out_dir


def token_counts_and_relabeler(train_data: torch.Tensor, vocab_size: int,
                               train_config: TrainConfig) -> tuple[torch.Tensor, RareTokenRelabeler]:
    """The training split's token counts (the logit bias's prior) and the relabeler of
    its rare tokens."""
    counts = torch.bincount(train_data.long(), minlength=vocab_size)
    relabel = RareTokenRelabeler(counts, vocab_size, train_config.rare_relabel_max_count,
                                 train_config.rare_relabel_probability)
    return counts, relabel


Built = tuple[Transformer, torch.optim.AdamW, torch.Generator]


def new_training_parts(model_config: ModelConfig, train_config: TrainConfig, device: torch.device,
                       token_counts: torch.Tensor) -> Built:
    """A seeded model (logit bias at the token prior), its optimizer and the batch
    generator. Draws from the global RNG exactly as an uninterrupted run does."""
    torch.manual_seed(train_config.seed)
    n_logits = train_config.batch_size * model_config.block_size * model_config.padded_vocab_size
    head = loss_head_choice(train_config.loss_head, device.type, n_logits, device_memory_bytes(device))
    model = Transformer(model_config, loss_head=head).to(device)
    model.init_logit_bias(token_counts)
    generator = torch.Generator(device=device).manual_seed(train_config.seed + 1)
    return model, make_optimizer(model, train_config, device), generator


def _start(build: Callable[[], Built], store: ResumeStore | None, runtime: Runtime,
           ranks: Ranks = SINGLE) -> tuple[Built, TrainState | None]:
    """A fresh model, optimizer and batch generator, restored from the store's state
    when it holds a usable one; one that fails to restore is dropped for a fresh start.
    In a distributed job rank 0 judges the state (and alone clears a bad one); the
    others read the same file, and all resume only if every rank restored it."""
    built = build()
    state = None
    if store is not None:
        state = store.load() if ranks.main else None
        if all_ranks_agree(state is not None or not ranks.main, ranks, runtime.device) and not ranks.main:
            state = store.read()
    if not all_ranks_agree(state is not None, ranks, runtime.device):
        return built, None
    model, optimizer, generator = built
    problem = None
    try:
        model.load_state_dict(state.model)
        restore_optimizer(optimizer, state.optimizer)
        generator.set_state(state.generator)
        runtime.set_rng_states(rank_rng_states(state.rng, ranks))  # last: everything above may still fail
    except Exception as exc:
        problem = f"it cannot be restored ({type(exc).__name__}: {str(exc)[:200]})"
    if all_ranks_agree(problem is None, ranks, runtime.device):
        return built, state
    if ranks.main:
        store.discard(problem or "another rank could not restore it")
    return build(), None


def rank_rng_states(saved: dict[str, Any], ranks: Ranks) -> dict[str, Any]:
    """This rank's RNG states from a resume state (a distributed job saves every
    rank's under ``ranks``, for dropout draws differ between ranks)."""
    return saved["ranks"][ranks.rank] if ranks.distributed else saved


def train_model(
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_tokens: Path,
    val_tokens: Path,
    out_dir: Path,
    run_name: str = "model",
    show_progress: bool = True,
    resume_dir: Path | None = None,
    compile_cache: Path | None = None,
    ranks: Ranks = SINGLE,
) -> dict[str, Any]:
    """Train one variant with one seed; writes ``init.pt``, ``checkpoints/step*.pt``,
    ``train_log.csv``, ``final.pt`` and, last, ``status.json`` under ``out_dir``.

    A NaN/inf loss (seen at the next log or checkpoint step) ends the run ``diverged``
    (see :func:`_finish`) and raises :class:`TrainingDiverged`. With ``resume_dir``
    the run continues from a saved state of the same settings (:mod:`tga.resume`).
    With ``compile_cache`` a compiled step's graphs are kept in and loaded from that
    folder, and jobs compiling the same graph take turns (:func:`warm_compiled_graphs`);
    an eager run leaves it alone. With ``ranks`` of a torchrun-started job (see
    :mod:`tga.distributed`) this process joins the job's process group for the run:
    it trains on its slice of each global batch and only rank 0 writes files.
    """
    if not ranks.distributed:
        return _train(model_config, train_config, train_tokens, val_tokens, Path(out_dir), run_name, show_progress,
                      resume_dir, compile_cache, ranks, train_config.device)
    device = start_process_group(ranks, train_config.device)
    try:
        return _train(model_config, train_config, train_tokens, val_tokens, Path(out_dir), run_name,
                      show_progress and ranks.main, resume_dir, compile_cache, ranks, device)
    except BaseException as exc:
        # The traceback keeps _train's locals, DDP's reducer among them, and the reducer
        # holds the process group: freed only after destroy_process_group, the group's
        # destructor joins its gloo threads while holding the GIL they wait for (a hang seen
        # in tests/test_distributed.py). Free them now, while the group is still registered.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        end_process_group()


def forward_settings(train_config: TrainConfig, micro_batch: int, accumulation: int, ranks: Ranks) -> TrainConfig:
    """The settings of one forward pass (what memory, the loss head and the compiler
    see): ``micro_batch`` windows. ``compile_mode: auto`` leaves CUDA graphs out when
    gradients accumulate or ranks all-reduce, where replays would overwrite buffers
    that the next micro-step or DDP's hooks still read."""
    if micro_batch == train_config.batch_size:
        return train_config
    mode = train_config.compile_mode
    if mode == "auto" and (accumulation > 1 or ranks.distributed):
        mode = "default"
    return replace(train_config, batch_size=micro_batch, micro_batch_size=None, compile_mode=mode)


def _train(model_config: ModelConfig, train_config: TrainConfig, train_tokens: Path, val_tokens: Path, out_dir: Path,
           run_name: str, show_progress: bool, resume_dir: Path | None, compile_cache: Path | None, ranks: Ranks,
           device: str) -> dict[str, Any]:
    """:func:`train_model` in one process of ``ranks``, on ``device``."""
    if ranks.main:
        _prepare(out_dir)
    model_config, meta, val_meta = _token_metadata(model_config, train_tokens, val_tokens)
    rt = Runtime.resolve(device, train_config.precision, train_config.threads)
    seed, bs, block = train_config.seed, train_config.batch_size, model_config.block_size
    accumulation = accumulation_steps(bs, train_config.micro_batch_size, ranks.world_size)
    micro_batch = bs // (ranks.world_size * accumulation)
    per_forward = forward_settings(train_config, micro_batch, accumulation, ranks)
    n_tokens = int(meta["n_tokens"]) + int(val_meta["n_tokens"])
    # memory of one micro-batch (and DDP's buckets), time of this process's share of a step
    per_forward_batch = replace(train_config, micro_batch_size=micro_batch) if ranks.distributed else train_config
    check_training_fits(model_config, per_forward_batch, rt.device.type, n_tokens,
                        say if ranks.main else lambda _: None, world_size=ranks.world_size)
    keep = set(checkpoint_steps(train_config))
    settings = run_settings(model_config, train_config, rt, meta, val_meta, ranks.world_size)
    store = None if resume_dir is None else ResumeStore(resume_dir, settings, keep)
    train_data, val_data = load_tokens_to_device(train_tokens, rt.device), load_tokens_to_device(val_tokens, rt.device)
    counts, relabel = token_counts_and_relabeler(train_data, model_config.vocab_size, train_config)

    def build() -> Built:
        """Seeded init, saved as ``init.pt``; in a distributed job each rank then draws
        its dropout masks from its own seed."""
        built = new_training_parts(model_config, per_forward, rt.device, counts)
        if ranks.main:
            save_checkpoint(out_dir / "init.pt", built[0], {"step": 0, "seed": seed, "run": run_name})
        if ranks.distributed:
            torch.manual_seed(rank_seed(seed, ranks.rank))
        return built

    def validate() -> float:
        """Eval mode and no sampling: validation draws from no RNG, so it cannot make a
        resumed run's random stream differ from an uninterrupted one's. The ranks of a
        distributed job score every world_size-th window each and add up."""
        model.eval()
        windows = train_config.eval_batches * bs
        if ranks.distributed:
            total, count = summed_loss_over_windows(evaluate, val_data, block, micro_batch, rt.amp, windows,
                                                    shard=(ranks.rank, ranks.world_size))
            total, count = sum_over_ranks([total, count], ranks, rt.device)
            loss = total / count
        else:
            loss = mean_loss_over_windows(evaluate, val_data, block, micro_batch, rt.amp, max_windows=windows)
        model.train()
        return loss

    (model, optimizer, generator), state = _start(build, store, rt, ranks)
    compiled = compile_for_training(model, per_forward, rt.device.type)
    run_step = TrainingStep(model, data_parallel(compiled, ranks, rt.device), optimizer, train_data, generator,
                            relabel, train_config, block, rt.amp, ranks, accumulation)
    evaluate = evaluation_model(model, compiled)
    if compile_cache is not None and compiled is not model:
        key = compile_key(model=asdict(model_config), batch=micro_batch, device=rt.device.type,
                          precision=rt.precision, mode=per_forward.compile_mode, head=model.loss_head)
        with compile_lock(use_compile_cache(compile_cache), key):
            warm_compiled_graphs(run_step, evaluate, val_data, rt)
    log_path = out_dir / "train_log.csv"
    if state is None:
        state = TrainState(last_val_loss=validate())
        state.rows.append(_row(0, learning_rate_at(0, train_config), None, state.last_val_loss, None, 0.0))
    elif ranks.main:
        store.restore_checkpoints(state, out_dir / "checkpoints")
        _write_log(log_path, state.rows)
        say(f"resuming {run_name} from step {state.step} of {train_config.max_steps} (state in {store.path})")
    state.on(rt.device)
    start = time.perf_counter() - state.elapsed_s
    last_time, timed_steps, diverged_at = time.perf_counter(), 0, None  # timed: steps since this process last logged
    model.train()
    progress = progress_display(total=train_config.max_steps, initial=state.step, desc=run_name, unit="steps",
                                enabled=show_progress)
    for step in range(state.step, train_config.max_steps):
        lr = run_step(state, step)
        done = state.step
        timed_steps += 1
        progress.update(1)

        at_eval = done % train_config.eval_interval == 0 or done == train_config.max_steps
        if (at_eval or done in keep) and state.first_bad_step.item() >= 0:  # both sync anyway; keep no NaN model
            diverged_at = int(state.first_bad_step.item())
            break
        if at_eval:
            now = time.perf_counter()
            train_loss = state.loss_sum.item() / state.steps_since_log
            state.last_val_loss = validate()
            tokens_per_s = timed_steps * bs * block / max(now - last_time, 1e-9)
            state.rows.append(_row(done, lr, train_loss, state.last_val_loss, tokens_per_s, now - start))
            if ranks.main:
                _write_log(log_path, state.rows)
            progress.set_postfix(train_loss=f"{train_loss:.3f}", val_ppl=f"{math.exp(state.last_val_loss):.1f}")
            state.loss_sum.zero_()
            state.steps_since_log = timed_steps = 0
            state.last_logged_step = done
            last_time = time.perf_counter()
        if done in keep:
            checkpoint = out_dir / "checkpoints" / f"step{done:06d}.pt"
            if ranks.main:
                save_checkpoint(checkpoint, model, {"step": done, "seed": seed, "run": run_name})
            if store is not None:
                rng = gather_to_main(rt.rng_states(), ranks)  # every rank takes part
                if ranks.main:
                    state.elapsed_s = time.perf_counter() - start
                    store.save(state, checkpoint, model, optimizer, generator, rt,
                               rng={**rng[0], "ranks": rng} if ranks.distributed else None)
    progress.close()
    return _finish(out_dir, model, state, diverged_at, run_name, seed, store, write=ranks.main)


def _finish(out_dir: Path, model: nn.Module, state: TrainState, diverged_at: int | None, run_name: str, seed: int,
            store: ResumeStore | None, write: bool = True) -> dict[str, Any]:
    """``final.pt``, then ``status.json`` (its presence means the run ended), then the
    resume state goes: an ended run, ok or diverged, is never resumed. A diverged
    run's ``final.pt`` holds the model as it stopped, its metadata says ``diverged``
    and where: every file a workflow declares exists, and none pretends to be trained.
    Only with ``write`` (rank 0 of a distributed job) are files written."""
    log_path = out_dir / "train_log.csv"
    if write:
        _write_log(log_path, state.rows)
    if diverged_at is None:
        summary = {"step": state.step, "seed": seed, "run": run_name, "final_val_loss": float(state.last_val_loss),
                   "final_val_ppl": math.exp(state.last_val_loss)}
        if write:
            save_checkpoint(out_dir / "final.pt", model, summary)
            write_status(out_dir / STATUS_FILE, OK, **summary)
    else:
        summary = {"step": diverged_at, "seed": seed, "run": run_name, "last_logged_step": state.last_logged_step,
                   "message": f"training of {run_name} diverged: the loss became NaN/inf at step {diverged_at} "
                              f"(seed {seed}); lower learning_rate or raise warmup_steps. The log up to step "
                              f"{state.last_logged_step} is in {log_path}"}
        if write:
            save_checkpoint(out_dir / "final.pt", model, {**summary, "status": DIVERGED})
            write_status(out_dir / STATUS_FILE, DIVERGED, **summary)
    if store is not None and write:
        store.clear()
    if diverged_at is not None:
        raise TrainingDiverged(summary["message"], run_name, seed, diverged_at, state.last_logged_step)
    return summary


def train_from_settings(
    settings: dict[str, dict[str, Any]],
    seed: int,
    threads: int,
    train_tokens: Path,
    val_tokens: Path,
    out_dir: Path,
    run_name: str = "model",
    resume_dir: Path | None = None,
    show_progress: bool = True,
    compile_cache: Path | None = None,
    ranks: Ranks = SINGLE,
) -> dict[str, Any]:
    """Train from a resolved variant (``{"model": {...}, "training": {...}}``, as
    :func:`tga.settings.resolve_variant` makes it); see :func:`train_model`."""
    model_config = ModelConfig.from_dict({"vocab_size": 1, **settings["model"]})
    train_config = TrainConfig.from_dict({**settings["training"], "seed": seed, "threads": threads})
    return train_model(model_config, train_config, Path(train_tokens), Path(val_tokens), Path(out_dir), run_name,
                       show_progress=show_progress, resume_dir=resume_dir, compile_cache=compile_cache, ranks=ranks)


def run_checkpoint(path: Path) -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` for a run folder (its ``final.pt``) or for a
    checkpoint file (its folder; a kept ``checkpoints/step*.pt``'s run folder)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "final.pt").is_file():
            raise CheckpointError(f"{path} has no final.pt: train it first, or give a checkpoint file")
        return path / "final.pt", path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a model folder (with final.pt) or a checkpoint file")
    return path, path.parent.parent if path.parent.name == "checkpoints" else path.parent


def clear_run(out_dir: Path) -> None:
    """Remove the files :func:`train_model` writes into ``out_dir`` (not the folders), so
    that a new run there never mixes with an old one's checkpoints."""
    out_dir = Path(out_dir)
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for old in (out_dir / "checkpoints").glob("step*.pt"):
        old.unlink()
