"""Pretrained Hugging Face causal LMs measured exactly like tga's own models.

A ``pretrained:`` config entry names a hub model id or a local folder, an optional
revision or list of revisions, a dtype and a device. Each entry is loaded with
``transformers`` (``AutoModelForCausalLM``, ``AutoTokenizer``) and wrapped in
:class:`HFCausalLM`, which speaks tga's model interface (``config.n_layer``,
``config.block_size``, ``forward(idx, targets, return_hidden_states)``,
``token_embedding``), so the geometry is :func:`tga.geometry.analyze_model` and the
perplexity is :func:`tga.evaluate.summed_loss_over_windows`: one implementation of
each metric and of the evaluation protocol for trained and pretrained models alike.

**Layer mapping.** ``transformers`` returns ``n_layer + 1`` hidden states: the
embedding output, then the input of every block after the first, and last the *final
norm's output* (GPT-2 ``ln_f``, GPT-NeoX ``final_layer_norm``, Llama ``norm``), so the
last block's own output is not among them. tga's layers are ``embedding``,
``block1..N`` and ``final_norm``: block N is taken as the final norm's input (a forward
hook), and the norm's output is checked to be the model's own last hidden state, so a
family laid out otherwise is refused instead of mislabelled. GPT-1 (``openai-gpt``,
Post-LN) has no final norm: every block already ends with one and the head reads the
last block, so ``final_norm`` is the last block's output again (README, "Pretrained
models").

The config-time side of an entry (its revisions, where its files are, the checks made
before any job runs) is :mod:`tga.pretrained_entries`. This module imports neither
torch nor transformers at import time either: the workflow's rule files import it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tga.pretrained_entries import PretrainedError, final_revision, is_local_path, n_layer_of, revision_step

if TYPE_CHECKING:
    import pandas as pd
    import torch

__all__ = [
    "FINAL_NORM",
    "map_hidden_states",
    "HFCausalLM",
    "HFTokenizer",
    "load_pretrained",
    "analyze_pretrained",
    "evaluate_pretrained",
]

FINAL_NORM: dict[str, str | None] = {
    "gpt2": "ln_f",
    "gpt_neo": "ln_f",
    "gptj": "ln_f",
    "gpt_neox": "final_layer_norm",
    "llama": "norm",
    "mistral": "norm",
    "qwen2": "norm",
    "gemma": "norm",
    "olmo": "norm",
    "openai-gpt": None,
}
"""Model type -> attribute of the base model holding the final norm (None: there is none).
Types not listed are tried with these attribute names; the layout check in
:func:`map_hidden_states` refuses one that does not fit."""

CONTEXT_CAP = 4096
"""Default longest window (tokens) for perplexity and prompts: a model's own context up
to this; rope models advertise up to 128k positions, where one window's logits alone
would take tens of GB. Set an entry's ``block_size`` to go further or to match the
trained variants' context."""

LOGITS_BYTES = 1 << 30
"""Largest logits tensor one forward of the perplexity pass may produce; batches are
split into micro-batches below it (a 4096-token window of a 32k vocabulary in bf16 is
0.25 GB)."""


# ---------------------------------------------------------------- loading (torch, transformers)


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (fp16 where bf16 is missing), fp16 on MPS, fp32 on CPU (bf16
    matmuls pay only on some CPUs; tga.device.resolved_precision says the same)."""
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def map_hidden_states(
    hidden_states: Sequence[torch.Tensor], final_norm_io: tuple[torch.Tensor, torch.Tensor] | None, n_layer: int,
    what: str = "the model",
) -> list[torch.Tensor]:
    """tga's ``n_layer + 2`` states (embedding, block1..N, final_norm) from a transformers
    forward's ``n_layer + 1`` ``hidden_states`` and the final norm's (input, output).

    transformers' last hidden state is the final norm's output, so block N is the norm's
    input; without a final norm (``final_norm_io`` None, GPT-1) the last block's output is
    also ``final_norm``. Refuses a layout that differs (a norm output that is not the last
    hidden state), which would otherwise put a wrong name on a layer.
    """
    import torch

    if len(hidden_states) != n_layer + 1:
        raise PretrainedError(
            f"{what} returned {len(hidden_states)} hidden states for {n_layer} blocks; expected embedding + "
            f"{n_layer} ({n_layer + 1})"
        )
    if final_norm_io is None:
        return [*hidden_states, hidden_states[-1]]
    norm_in, norm_out = final_norm_io
    if norm_out.shape != hidden_states[-1].shape or not torch.equal(norm_out, hidden_states[-1]):
        raise PretrainedError(
            f"{what}: the final norm's output is not the last hidden state, so its hidden-state layout is not "
            "the one tga maps (embedding, blocks, final norm); this model family is not supported"
        )
    return [*hidden_states[:-1], norm_in, norm_out]


class HFCausalLM:
    """A transformers causal LM behind tga's model interface.

    It is what :func:`tga.geometry.analyze_model` and
    :func:`tga.evaluate.summed_loss_over_windows` call on tga's own ``Transformer``:
    ``config`` (``n_layer``, ``block_size``, ``vocab_size`` = output-embedding rows),
    ``forward(idx, targets=None, return_hidden_states=False)``, ``token_embedding``
    (the output embedding, whose logits the frequency correlation reads), ``logit_bias``,
    ``parameters()``, ``eval/train/to``. Hidden states are handed back on the CPU in
    float32, one prompt at a time, so a large model's GPU holds only its weights and one
    forward's activations, never every layer of every prompt.
    """

    def __init__(self, model: Any, block_size: int, name: str) -> None:
        from types import SimpleNamespace

        self.hf = model
        self.name = name
        hf_config = model.config
        n_layer = n_layer_of(hf_config.to_dict())
        if n_layer is None:
            raise PretrainedError(f"pretrained.{name}: its config gives no number of layers")
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise PretrainedError(f"pretrained.{name}: {type(model).__name__} has no output embedding (LM head)")
        self.config = SimpleNamespace(n_layer=n_layer, block_size=int(block_size), vocab_size=int(head.weight.shape[0]))
        self.model_type = str(hf_config.model_type)
        self._norm_io: tuple[Any, Any] | None = None
        self._norm = self._final_norm_module()
        if self._norm is not None:
            self._norm.register_forward_hook(self._keep_norm_io, with_kwargs=True)
        self.training = False

    def _final_norm_module(self) -> Any:
        base = self.hf.base_model
        if self.model_type in FINAL_NORM:
            attribute = FINAL_NORM[self.model_type]
            return None if attribute is None else getattr(base, attribute)
        for attribute in ("ln_f", "final_layer_norm", "norm", "final_norm"):
            if hasattr(base, attribute):
                return getattr(base, attribute)
        raise PretrainedError(
            f"pretrained.{self.name}: model type {self.model_type!r} has no final norm tga knows where to find; "
            f"known types: {sorted(FINAL_NORM)}"
        )

    def _keep_norm_io(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        given = args[0] if args else next(iter(kwargs.values()))
        self._norm_io = (given, output[0] if isinstance(output, tuple) else output)

    # the parts of torch.nn.Module's interface tga's analysis uses
    def parameters(self) -> Any:
        return self.hf.parameters()

    def eval(self) -> HFCausalLM:
        self.hf.eval()
        self.training = False
        return self

    def train(self, mode: bool = True) -> HFCausalLM:
        self.hf.train(mode)
        self.training = mode
        return self

    def to(self, device: Any) -> HFCausalLM:
        self.hf.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        """The output embedding (``lm_head``; tied or not), on the CPU in float32 where the
        hidden states are: the logits of the mean vector are read through it."""
        import torch

        weight = self.hf.get_output_embeddings().weight.detach().to("cpu", torch.float32)
        return torch.nn.Embedding.from_pretrained(weight, freeze=True)

    @property
    def logit_bias(self) -> torch.Tensor | None:
        import torch

        bias = getattr(self.hf.get_output_embeddings(), "bias", None)
        return None if bias is None else bias.detach().to("cpu", torch.float32)

    def hidden_states(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """tga's layers for a batch of token ids, ``n_layer + 2`` tensors ``(B, T, d)``,
        on the CPU in float32 (:func:`map_hidden_states`)."""
        import torch

        self._norm_io = None
        out = self.hf.base_model(input_ids=idx, output_hidden_states=True, use_cache=False)
        mapped = map_hidden_states(
            out.hidden_states, self._norm_io if self._norm is not None else None, self.config.n_layer,
            what=f"pretrained.{self.name} ({self.model_type})",
        )
        self._norm_io = None
        return [h.to("cpu", torch.float32) for h in mapped]

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                 return_hidden_states: bool = False, return_logits: bool = True) -> Any:
        return self.forward(idx, targets, return_hidden_states, return_logits)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                return_hidden_states: bool = False, return_logits: bool = True) -> Any:
        """tga's ``ModelOutput``: the hidden states when asked for (no logits, whatever
        ``return_logits`` says: the geometry never reads them), or the mean NLL of ``targets`` (-100 = not scored),
        computed in float32 over micro-batches whose logits stay under
        :data:`LOGITS_BYTES`; ``logits`` is then None (only the loss is used)."""
        import torch
        import torch.nn.functional as F

        from tga.model import ModelOutput

        if return_hidden_states:
            return ModelOutput(logits=None, loss=None, hidden_states=self.hidden_states(idx))
        if targets is None:
            raise PretrainedError(f"pretrained.{self.name}: forward needs targets or return_hidden_states")
        batch, t = idx.shape
        element = torch.finfo(next(self.hf.parameters()).dtype).bits // 8
        rows = max(1, LOGITS_BYTES // max(1, t * self.config.vocab_size * element))
        total = torch.zeros((), dtype=torch.float64, device=idx.device)
        for start in range(0, batch, rows):
            logits = self.hf(input_ids=idx[start : start + rows], use_cache=False).logits
            y = targets[start : start + rows]
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                     reduction="sum").double()
        count = int((targets != -100).sum())
        return ModelOutput(logits=None, loss=total / max(count, 1), hidden_states=None)


class HFTokenizer:
    """A transformers tokenizer behind tga's ``Tokenizer`` protocol (``name``,
    ``vocab_size``, ``encode``, ``decode``); ``encode`` adds the special tokens the model
    was trained with (Llama's BOS), as the model's own pipeline would."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.hf = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        bos = tokenizer.bos_token_id
        probe = self.encode("a")
        #: Whether ``encode`` puts the BOS token first (Llama's tokenizers do, GPT-2's does
        #: not although it has one): ``geometry.exclude_first_token: auto`` drops it then.
        self.adds_bos = bos is not None and bool(probe) and probe[0] == bos

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True, verbose=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(ids))


def check_tokenizer(tokenizer: HFTokenizer, ids: Sequence[Sequence[int]], texts: Sequence[str], vocab_size: int,
                    name: str) -> None:
    """The tokenizer has the tokens the model and the text need: every id it gives is a
    row of the model's embedding, and no text is mapped to its unknown token (a
    tokenizer without tokens for this text measures ``<unk>`` instead of the text)."""
    where = f"pretrained.{name}"
    top = max((max(seq) for seq in ids if seq), default=-1)
    if top >= vocab_size:
        raise PretrainedError(
            f"{where}: the tokenizer gives id {top} but the model's embedding has {vocab_size} rows: the tokenizer "
            "does not belong to this model"
        )
    unk = tokenizer.hf.unk_token_id
    if unk is None:
        return
    for seq, text in zip(ids, texts):
        n_unk = sum(1 for t in seq if t == unk)
        if n_unk:
            raise PretrainedError(
                f"{where}: the tokenizer has no tokens for parts of the text: {n_unk} of {len(seq)} tokens of "
                f"{text[:40]!r} are its unknown token {tokenizer.hf.unk_token!r}; use the model's own tokenizer"
            )


def load_pretrained(entry: Mapping[str, Any], name: str, revision: str | None) -> tuple[HFCausalLM, HFTokenizer]:
    """The entry's model at ``revision`` on its device (tga.device.job_device, as
    training chooses) in its dtype, and its tokenizer; transformers' cache, HF_HOME and
    HF_HUB_OFFLINE apply. Every failure is one PretrainedError naming the entry."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tga.device import job_device
    from tga.tokenizers import TokenizerError, load_hf_tokenizer

    model_id = str(entry["model"])
    source = str(Path(model_id).expanduser()) if is_local_path(model_id) else model_id
    where = f"pretrained.{name} ({model_id}" + (f" at revision {revision})" if revision else ")")
    if is_local_path(model_id) and not Path(source).is_dir():
        raise PretrainedError(f"pretrained.{name}: local model folder {model_id!r} does not exist")
    device = job_device(str(entry["device"]))
    try:
        hf_config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise PretrainedError(f"{where}: cannot load its config: {str(exc).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=_torch_dtype(str(entry["dtype"]), device))
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise PretrainedError(
                f"{where}: {type(hf_config).__name__} ({hf_config.model_type}) is not a causal language model: "
                "give a decoder-only model (AutoModelForCausalLM)"
            ) from None
        raise PretrainedError(f"{where}: cannot load the model: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise PretrainedError(f"{where}: cannot load the model: {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = load_hf_tokenizer(source, revision, where=where, key=f"pretrained.{name}.model")
    except TokenizerError as exc:
        raise PretrainedError(str(exc)) from None
    context = _n_positions(hf_config)
    block_size = entry.get("block_size") or min(context or CONTEXT_CAP, CONTEXT_CAP)
    if context is not None and block_size > context:
        raise PretrainedError(f"pretrained.{name}.block_size: {block_size} is beyond the model's context of {context}")
    model.eval().to(device)
    return HFCausalLM(model, block_size, name), HFTokenizer(tokenizer, model_id)


def _n_positions(hf_config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------- the jobs


def analyze_pretrained(
    entry: Mapping[str, Any],
    name: str,
    stages: Mapping[str, str | None],
    prompts_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
    train_text: str | os.PathLike[str] | None = None,
    threads: int = 0,
) -> pd.DataFrame:
    """Geometry of an entry at each ``{stage: revision}`` over the prompts, written as tga
    writes its own (``metrics.csv``, ``summary.csv``, ``similarity.npz``, ``prompts.csv``,
    docs/design.md); returns the summary. The step column is the step a revision names
    (0 when it names none). ``train_text`` (the training split's text) is encoded with the
    model's tokenizer for the logit-frequency correlation. Every stage must tokenize the
    prompts alike (one model's revisions)."""
    import numpy as np
    import pandas as pd
    import torch

    from tga.atomic import atomic_write
    from tga.geometry import (
        analyze_model,
        encode_prompts,
        layer_names,
        load_prompts,
        prompt_table,
        resolve_exclude_first_token,
        summarize_metrics,
    )
    from tga.progress import progress

    if threads > 0:
        torch.set_num_threads(threads)
    prompts = load_prompts(prompts_path)
    frames, mats, ids_ref, info_ref, counts, n_layer = [], {}, None, [], None, 0
    tokenizer: HFTokenizer | None = None
    for stage, revision in progress(stages.items(), desc=f"{name}: revisions", unit="revisions",
                                    enabled=len(stages) > 1):
        model, tokenizer = load_pretrained(entry, name, revision)
        ids, info = encode_prompts(prompts, tokenizer, model.config.block_size, truncate=True)
        check_tokenizer(tokenizer, ids, prompts, model.config.vocab_size, name)
        if ids_ref is None:
            ids_ref, info_ref, n_layer = ids, info, model.config.n_layer
            if train_text is not None:
                train_ids = tokenizer.encode(Path(train_text).read_text(encoding="utf-8"))
                counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=model.config.vocab_size)
        elif ids != ids_ref or model.config.n_layer != n_layer:
            raise PretrainedError(f"pretrained.{name}: revision {revision!r} tokenizes the prompts differently "
                                  "or has another depth than the first; an evolution series is one model's revisions")
        df, m = analyze_model(
            model, ids, stage, revision_step(revision) or 0, list(settings["heatmap_layers"]),
            exclude_first_token=settings["exclude_first_token"], adds_bos=tokenizer.adds_bos, knn_k=int(settings["knn_k"]),
            device=model.device, token_counts=None if counts is None else counts.astype(np.float64),
            progress_label=f"{name} {stage}: prompts",
        )
        frames.append(df)
        mats.update(m)
        del model
    assert ids_ref is not None and tokenizer is not None
    excluded = resolve_exclude_first_token(settings["exclude_first_token"], tokenizer.adds_bos)
    start = 1 if excluded else 0
    for i, ids in enumerate(ids_ref):
        mats[f"tokens/prompt{i}"] = np.array([tokenizer.decode([t]) for t in ids[start:]], dtype=np.str_)
    mats["layer_names"] = np.array(layer_names(n_layer), dtype=np.str_)
    metrics = pd.concat(frames, ignore_index=True)
    summary = summarize_metrics(metrics)
    table = prompt_table(prompts, info_ref, excluded)
    out = Path(out_dir)
    for file, frame in (("metrics.csv", metrics), ("summary.csv", summary), ("prompts.csv", table)):
        atomic_write(out / file, lambda p, frame=frame: frame.to_csv(p, index=False))
    atomic_write(out / "similarity.npz", lambda p: np.savez_compressed(open(p, "wb"), **mats))
    return summary


def evaluate_pretrained(
    entry: Mapping[str, Any],
    name: str,
    text_path: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    batch_size: int,
    threads: int = 0,
) -> dict[str, Any]:
    """Test perplexity of an entry by tga's protocol (non-overlapping windows of its
    ``block_size``, tga.evaluate), on the split's text encoded with the model's own
    tokenizer; bits per byte and word perplexity over the text's UTF-8 bytes and words,
    so they compare across tokenizers. Written as tga's perplexity JSON (seed 0: one
    published model)."""
    import numpy as np
    import torch

    from tga.atomic import atomic_write_text
    from tga.data import tokens_to_tensor
    from tga.evaluate import perplexity_metrics, summed_loss_over_windows

    if threads > 0:
        torch.set_num_threads(threads)
    revision = final_revision(entry)
    model, tokenizer = load_pretrained(entry, name, revision)
    raw = Path(text_path).read_bytes()
    text = raw.decode("utf-8")
    ids = tokenizer.encode(text)
    check_tokenizer(tokenizer, [ids], [text], model.config.vocab_size, name)
    if len(ids) < 2:
        raise PretrainedError(f"pretrained.{name}: {text_path} encodes to {len(ids)} token(s); nothing to predict")
    tokens = tokens_to_tensor(np.asarray(ids, dtype=np.int64))
    total, count = summed_loss_over_windows(model, tokens, model.config.block_size, batch_size,
                                            progress_label=f"{name}: perplexity")
    n_bytes, n_words = len(raw), len(text.split())
    result: dict[str, Any] = {
        "variant": name, "seed": 0, "split": "test", "model": str(entry["model"]), "revision": revision,
        "tokenizer": tokenizer.name, "n_tokens_scored": count, "n_bytes": n_bytes, "n_words": n_words,
        "block_size": model.config.block_size,
    }
    result.update(perplexity_metrics(total, count, n_bytes, n_words))
    atomic_write_text(out_json, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
