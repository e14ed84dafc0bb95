"""A small decoder-only transformer whose normalization placement, norm and MLP
activation are switches, so that variants differ in exactly those choices.

The layout follows nanoGPT (tied input/output embeddings, causal attention through
``scaled_dot_product_attention``), with rotary position embeddings by default
(``position_encoding: learned`` gives GPT-2's table). The forward pass can return the
residual stream at every depth for the geometry analysis, and each block's sums before
its norms (Post-LN's x^{post,2}, x^{post,5}). ``init``, ``activation: relu`` and
``mlp_hidden`` express the setting Xiong et al. (2020) analyse (docs/science.md).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tga.atomic import atomic_write_bytes
from tga.lm_head import IGNORE_INDEX, chunked_cross_entropy
# The config is torch-free so that the workflow reads settings without torch.
from tga.schema import LOSS_CHUNK_TOKENS, ModelConfig, ModelConfigError

CHECKPOINT_FORMAT = "tga-checkpoint-v1"
# Model keys added after checkpoints were first written, with the behaviour those older
# checkpoints were trained with; a later default must not silently change their meaning.
KEYS_ADDED_LATER = {"unigram_bias": False, "position_encoding": "learned", "init": "gpt2", "mlp_hidden": None}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or belongs to another architecture."""


class BlockSums(NamedTuple):
    """A block's residual sums before any norm (Xiong et al. 2020's notation).

    Post-LN: ``attention`` = x^{post,2} = x + attn(x), ``mlp`` = x^{post,5} =
    x^{post,3} + mlp(x^{post,3}), each the input of the norm that follows it.
    Pre-LN: the residual stream itself after each sublayer (x^{pre,3} and the block's
    output), which is never normalized. Without residual connections, the sublayer
    output alone. ``mlp`` is None when the model has no MLP.
    """

    attention: torch.Tensor
    mlp: torch.Tensor | None


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # None when the forward pass was asked for the loss alone
    loss: torch.Tensor | None
    hidden_states: list[torch.Tensor] | None
    prenorm_sums: list[BlockSums] | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 even under bf16 autocast, as LLaMA does.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, as in LLaMA): rotates each query and
    key pair of channels by an angle proportional to the position, so attention scores
    depend on relative offsets and one learned "look k tokens back" pattern serves every
    position (learned absolute embeddings must learn it position by position)."""

    def __init__(self, head_size: int, block_size: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)
        # Each pair's angle for both of its channels, the sine negated on the first: the
        # rotation of (a, b) is then (a, b)·cos + (b, a)·signed_sin, whole-tensor products
        # that give bit for bit what (a cos − b sin, a sin + b cos) gives, at half the cost
        # of slicing the halves and stacking them back (forward and backward).
        cos = angles.cos().repeat_interleave(2, dim=-1)
        signed_sin = angles.sin().repeat_interleave(2, dim=-1)
        signed_sin[:, 0::2] *= -1
        # Not persistent: derived from the config, so checkpoints stay weights only.
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("signed_sin", signed_sin.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.size(-2)
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (a, b) -> (b, a) in every pair
        return x * self.cos[:seq].to(x.dtype) + swapped * self.signed_sin[:seq].to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        head_size = config.n_embd // config.n_head
        self.rotary = (
            RotaryEmbedding(head_size, config.block_size, config.rope_base)
            if config.position_encoding == "rope"
            else None
        )
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.qkv.fused_parts = 3  # W^Q, W^K, W^V in one matmul; Xavier init treats them apart
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (rotated), keys (rotated) and values, each (batch, head, seq, head_size)."""
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, dim // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self._heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, seq, dim)
        return self.resid_dropout(self.proj(y))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The causal attention weights (batch, head, seq, seq) this layer applies to
        ``x``, without dropout. The fused kernel in ``forward`` never materializes
        them; analyses need them to say how far attention is from uniform."""
        q, k, _ = self._heads(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        seq = x.size(1)
        future = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.activation
        hidden = config.mlp_width
        # SwiGLU's gate and value projections are one matmul, split afterwards.
        n_in = 2 * hidden if self.activation == "swiglu" else hidden
        self.up = nn.Linear(config.n_embd, n_in, bias=config.bias)
        self.up.fused_parts = 2 if self.activation == "swiglu" else 1
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.down.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h)
        return self.dropout(self.down(h))


class Block(nn.Module):
    """One transformer block; ``norm_position`` decides where the norms sit.

    Pre-LN:  x + f(norm(x))      (the residual stream itself is never normalized)
    Post-LN: norm(x + f(x))      (the residual stream is renormalized after every sublayer)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre = config.norm_position == "pre"
        self.residual = config.residual
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config) if config.mlp else None
        self.mlp_norm = make_norm(config) if config.mlp else None

    def _sublayer(self, x: torch.Tensor, f: nn.Module, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the sum before any norm): Pre-LN's output is that sum; Post-LN
        normalizes it."""
        if self.pre:
            update = f(norm(x))
            out = x + update if self.residual else update
            return out, out
        total = x + f(x) if self.residual else f(x)
        return norm(total), total

    def forward_with_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, BlockSums]:
        """The block's output and its pre-norm sums (see :class:`BlockSums`)."""
        x, after_attention = self._sublayer(x, self.attn, self.attn_norm)
        after_mlp = None
        if self.mlp is not None:
            x, after_mlp = self._sublayer(x, self.mlp, self.mlp_norm)
        return x, BlockSums(after_attention, after_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_sums(x)[0]


class Transformer(nn.Module):
    """``loss_head``: how the training loss (``return_logits=False``) is computed,
    ``chunked`` (the fused output head and loss of :mod:`tga.lm_head`, in chunks of
    ``loss_chunk_tokens``) or ``full`` (the logits, then ``F.cross_entropy``, for a
    compiler to fuse; :func:`tga.device.loss_head_choice`). Execution choices, not part
    of the architecture, so neither is in the config or the checkpoint."""

    def __init__(self, config: ModelConfig, loss_chunk_tokens: int = LOSS_CHUNK_TOKENS,
                 loss_head: str = "chunked") -> None:
        super().__init__()
        if loss_head not in ("chunked", "full"):
            raise ValueError(f"loss_head={loss_head!r} must be chunked or full")
        self.config = config
        self.loss_chunk_tokens = loss_chunk_tokens
        self.loss_head = loss_head
        self.token_embedding = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.position_embedding = (
            nn.Embedding(config.block_size, config.n_embd) if config.position_encoding == "learned" else None
        )
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.embedding_multiplier = math.sqrt(config.n_embd)
        # A learned per-token logit bias. Without it the only way to predict the unigram
        # distribution is one shared hidden direction, and Post-LN at a high learning rate
        # collapses every token onto it (rank 1) and stays on the unigram-loss plateau.
        self.logit_bias = nn.Parameter(torch.zeros(config.padded_vocab_size)) if config.unigram_bias else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """``init: gpt2``: std 0.02 everywhere, and residual projections shrink by
        1/sqrt(2*n_layer) so the stream's variance at init does not grow with depth.

        ``init: xavier`` (Xiong et al. 2020, who analyse it without that shrinking):
        every weight matrix ~ N(0, 2/(fan_in + fan_out)). Fused layers count as their
        parts: the qkv projection is three d x d matrices (std 1/sqrt(d) each, not
        sqrt(2/4d)), SwiGLU's up projection is two d x h matrices. Embeddings (token
        and learned position) ~ N(0, 1/d): the tied output head then gives logits of
        unit variance from the final norm's output (squared norm d), and with
        ``scale_embeddings: true`` the input is unit variance per coordinate
        (E||x_0||^2 = d), as Lemma 2 and Vaswani et al. assume. Biases start at zero
        and norm gains at one under both schemes."""
        config = self.config
        if isinstance(module, nn.Linear):
            if config.init == "xavier":
                fan_out, fan_in = module.weight.shape
                fan_out //= getattr(module, "fused_parts", 1)
                std = math.sqrt(2.0 / (fan_in + fan_out))
            else:
                std = 0.02
                if getattr(module, "is_residual_projection", False):
                    std = 0.02 / math.sqrt(2 * config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            std = 1.0 / math.sqrt(config.n_embd) if config.init == "xavier" else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)

    @torch.no_grad()
    def init_logit_bias(self, token_counts: torch.Tensor) -> None:
        """Start the logit bias at the log unigram frequencies (add-one smoothed) of the
        training tokens, so the untrained model already predicts the token prior and the
        blocks only have to learn what context adds to it."""
        if self.logit_bias is None:
            return
        vocab = self.config.vocab_size
        if token_counts.numel() < vocab:
            raise ValueError(f"token_counts has {token_counts.numel()} entries, expected vocab_size={vocab}")
        counts = token_counts.detach().cpu().double()[:vocab] + 1.0
        self.logit_bias.zero_()
        self.logit_bias[:vocab] = torch.log(counts / counts.sum()).to(self.logit_bias.device, self.logit_bias.dtype)

    def num_parameters(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.token_embedding.weight.numel()
            if self.position_embedding is not None:
                n -= self.position_embedding.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        return_hidden_states: bool = False,
        return_prenorm_sums: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Logits over the real vocabulary; mean loss over targets != -100; and, when
        asked, the residual stream: embedding, each block, final norm (n_layer + 2),
        and each block's sums before its norms (:class:`BlockSums`, n_layer), which
        is where Post-LN's stream can be measured before a norm fixes its scale.

        ``return_logits=False`` (training) computes the loss through the fused,
        chunked head (:mod:`tga.lm_head`), which never holds the full logits, and
        returns no logits; without targets (the geometry: hidden states only) it skips
        the head. Otherwise (evaluation) the logits are computed in full and the loss
        is F.cross_entropy over them, the exact reference."""
        _, seq = idx.shape
        if seq > self.config.block_size:
            raise ValueError(f"sequence of {seq} tokens exceeds block_size={self.config.block_size}")
        if not return_logits and targets is None and not return_hidden_states:
            raise ValueError("return_logits=False computes only the loss or the hidden states: give targets, "
                             "or return_hidden_states=True")
        x = self.token_embedding(idx)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(seq, device=idx.device))
        if self.config.scale_embeddings:
            # O(1) inputs from the small tied embeddings (Vaswani et al. 2017; Gemma).
            x = x * self.embedding_multiplier
        x = self.embedding_dropout(x)
        hidden = [x] if return_hidden_states else None
        sums: list[BlockSums] | None = [] if return_prenorm_sums else None
        for block in self.blocks:
            x, block_sums = block.forward_with_sums(x)
            if hidden is not None:
                hidden.append(x)
            if sums is not None:
                sums.append(block_sums)
        x = self.final_norm(x)
        if hidden is not None:
            hidden.append(x)
        if not return_logits and targets is None:  # hidden states only: no head
            return ModelOutput(None, None, hidden, sums)
        vocab = self.config.vocab_size
        if not return_logits and self.loss_head == "chunked":
            loss = chunked_cross_entropy(x, self.token_embedding.weight, self.logit_bias, targets, vocab,
                                         self.loss_chunk_tokens)
            return ModelOutput(None, loss, hidden, sums)
        # The padding rows exist only for matmul speed and can never be predicted:
        # slicing them off is exact, where filling their logits with -inf made
        # backward clone the logits' gradient.
        bias = None if self.logit_bias is None else self.logit_bias[:vocab]
        logits = F.linear(x, self.token_embedding.weight[:vocab], bias)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, vocab).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits if return_logits else None, loss, hidden, sums)


def save_checkpoint(path: Path, model: Transformer, extra: dict[str, Any] | None = None) -> None:
    """Write atomically so an interrupted job never leaves a truncated checkpoint."""
    raw = getattr(model, "_orig_mod", model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": asdict(raw.config),
        "state_dict": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
        "extra": extra or {},
    }
    # Serialized in memory: torch names the archive after the file, so saving to a
    # temporary name directly would make identical weights differ byte for byte.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(
    path: Path,
    map_location: str | torch.device = "cpu",
    expected_config: ModelConfig | None = None,
) -> tuple[Transformer, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing anything else.

    The model comes back in eval mode: checkpoints are read for evaluation and
    analysis, and with dropout on by default a forgotten ``.eval()`` would make every
    measurement noisy. Training builds its own model and resumes from state dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: rerun the training job that makes it")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "delete it and rerun the training job"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a tga checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
            "give a checkpoint written by tga's training"
        )
    try:
        config = ModelConfig.from_dict({**KEYS_ADDED_LATER, **payload["model_config"]})
    except ModelConfigError as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {exc}") from exc
    if expected_config is not None and config != expected_config:
        diffs = {
            f.name: (getattr(config, f.name), getattr(expected_config, f.name))
            for f in fields(ModelConfig)
            if getattr(config, f.name) != getattr(expected_config, f.name)
        }
        raise CheckpointError(
            f"checkpoint {path} belongs to another architecture: "
            + ", ".join(f"{k}={a!r} (expected {b!r})" for k, (a, b) in diffs.items())
        )
    model = Transformer(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {exc}") from exc
    return model.to(map_location).eval(), payload.get("extra", {})
