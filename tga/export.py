"""A trained tga model as a Hugging Face ``transformers`` folder that others can open.

``transformers``' ``AutoModelForCausalLM.from_pretrained(folder)`` (and through it
TransformerLens and nnsight) reads ``config.json`` and ``model.safetensors``; tga's
checkpoints are its own format. Where a variant's architecture *is* a transformers
class, the weights are renamed (and, for rotary models, reordered) so that the class
computes tga's logits; where it is not, one error names the setting and says why.

Which class, for Pre-LN with residuals, an MLP and no unigram_bias (docs/export.md
has the reasons):

- rmsnorm, swiglu, rope: ``LlamaForCausalLM`` (bias -> attention_bias, mlp_bias)
- rmsnorm, gelu or relu, rope: ``ArceeForCausalLM`` (Llama with an ungated MLP)
- layernorm, swiglu, rope, bias false: ``StableLmForCausalLM``
- layernorm, gelu or relu, rope: ``GPTNeoXForCausalLM`` (sequential residual)
- layernorm, gelu or relu, learned positions: ``GPT2LMHeadModel`` (exact GELU, "gelu")

Post-LN, no residual, no MLP, ``unigram_bias`` and the other combinations map onto no
class. ``scale_embeddings`` is folded into untied input embeddings (the output head
keeps the unscaled matrix), so such exports have ``tie_word_embeddings: false``.

RoPE: tga rotates adjacent channel pairs (2i, 2i+1) of each head (interleaved);
transformers' ``rotate_half`` rotates channels i and i + head_size/2. The query and key
rows (and biases) of every head are permuted [0, 2, 4, ..., 1, 3, 5, ...]: both sides
get the same permutation, so every q·k product, hence every logit, is unchanged.

Every export is checked before it is published (:func:`check_export`): the folder is
loaded back with ``AutoModelForCausalLM``; its rotary tables must equal tga's to float32
rounding and, in float64 with shared rotary tables, its logits must equal tga's to
:data:`MAPPING_TOLERANCE`; the float32 difference others will see is recorded. The
folder then appears whole (a temporary sibling renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tga.atomic import no_empty_folders_left, stale_temporaries, temporary_sibling
from tga.data import sha256_file
from tga.model import Transformer, load_checkpoint
from tga.schema import ModelConfig
from tga.tokenizers import (
    _GPT2_URLS,
    GPT2_ENCODER_JSON_SHA256,
    GPT2_VOCAB_BPE_SHA256,
    UNK_TOKEN,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "EXPORT_FORMAT",
    "LOGIT_TOLERANCE",
    "MAPPING_TOLERANCE",
    "METADATA_FILE",
    "ExportError",
    "check_export",
    "export_checkpoint",
    "export_model",
    "hf_architecture",
    "hf_state_dict",
    "max_logit_difference",
    "rope_half_split_order",
]

EXPORT_FORMAT = "tga-export-v1"
# Classes whose weights are named as Llama's (model.layers.N.self_attn.q_proj ...).
LLAMA_LAYOUT = ("LlamaForCausalLM", "ArceeForCausalLM", "StableLmForCausalLM")
METADATA_FILE = "tga.json"
# float32 logits of an exported tiny model against tga's (max absolute difference; the tests).
LOGIT_TOLERANCE = 1e-5
# The export's own check: float64 logits with shared rotary tables, relative to the largest.
# What remains there is the float32 rounding of the stored weights: none where they are
# copied (measured 1e-15), one rounding where scale_embeddings is folded in (measured
# 8.5e-8, 4 layers x 128); a wrong weight or layout is off by O(1).
MAPPING_TOLERANCE = 1e-6
# Tokens of the export's own logit check (a deterministic id sequence).
CHECK_TOKENS = 64


class ExportError(ValueError):
    """A model that cannot be exported (the message names the setting and why), or an
    export whose logits differ from tga's."""


# ----------------------------------------------------------------------- which class


def hf_architecture(config: ModelConfig) -> str:
    """The transformers class that computes exactly what ``config``'s model computes,
    or an :class:`ExportError` naming the first setting that no class has."""
    if config.norm_position == "post":
        raise ExportError(
            "norm_position='post' (Post-LN) cannot be exported: no transformers class normalizes after the "
            "residual sum, norm(x + f(x)); every decoder there is Pre-LN, x + f(norm(x))")
    if not config.residual:
        raise ExportError("residual=false cannot be exported: every transformers decoder adds the residual "
                          "connections this ablation removes")
    if not config.mlp:
        raise ExportError("mlp=false cannot be exported: every transformers decoder block has an MLP")
    if config.unigram_bias:
        raise ExportError(
            "unigram_bias=true cannot be exported: the learned per-token logit bias has no place in the "
            "bias-free output heads of Llama, Arcee, StableLM, GPT-NeoX and GPT-2, and a bias cannot be folded "
            "into the weights after the final norm; train with unigram_bias: false to export")
    key = (config.norm, config.activation == "swiglu", config.position_encoding)
    table = {
        ("rmsnorm", True, "rope"): "LlamaForCausalLM",
        ("rmsnorm", False, "rope"): "ArceeForCausalLM",
        ("layernorm", True, "rope"): "StableLmForCausalLM",
        ("layernorm", False, "rope"): "GPTNeoXForCausalLM",
        ("layernorm", False, "learned"): "GPT2LMHeadModel",
    }
    if table.get(key) == "StableLmForCausalLM" and config.bias:
        raise ExportError(
            "bias=true with norm='layernorm' and activation='swiglu' cannot be exported: the one transformers "
            "class with LayerNorm, SwiGLU and rotary positions, StableLM, has no bias on the attention output or "
            "the MLP; train with bias: false, or use norm: rmsnorm (Llama takes biases)")
    if key in table:
        return table[key]
    if config.position_encoding == "learned":
        raise ExportError(
            f"position_encoding='learned' with norm={config.norm!r} and activation={config.activation!r} cannot "
            "be exported: the only transformers decoder with a learned position table that tga matches is GPT-2 "
            "(layernorm with gelu or relu); use position_encoding: rope or that combination")
    raise AssertionError(f"unhandled architecture {key}")  # every rope combination is in the table


def _hf_config_values(config: ModelConfig, architecture: str, eos_token_id: int | None) -> dict[str, Any]:
    """The transformers config of ``architecture`` for ``config`` (its keyword arguments).

    Dropout is a training setting: the exported configs carry none (transformers' eval
    mode ignores it anyway); tga.json records tga's value."""
    tied = not config.scale_embeddings
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": tied, "bos_token_id": None,
              "eos_token_id": eos_token_id, "pad_token_id": None, "dtype": "float32"}
    act = "relu" if config.activation == "relu" else "gelu"  # transformers' "gelu" is the exact erf GELU
    rope = {"rope_type": "default", "rope_theta": float(config.rope_base)}
    shapes = {"hidden_size": config.n_embd, "intermediate_size": config.mlp_width,
              "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
              "max_position_embeddings": config.block_size, "attention_dropout": 0.0}
    whole_head_rope = {**rope, "partial_rotary_factor": 1.0}  # both default to rotating a quarter of each head
    if architecture in ("LlamaForCausalLM", "ArceeForCausalLM"):
        return {**common, **shapes, "num_key_value_heads": config.n_head,
                "hidden_act": "silu" if architecture == "LlamaForCausalLM" else act, "rms_norm_eps": config.norm_eps,
                "rope_parameters": rope, "attention_bias": config.bias, "mlp_bias": config.bias}
    if architecture == "StableLmForCausalLM":
        return {**common, **shapes, "num_key_value_heads": config.n_head, "hidden_act": "silu",
                "layer_norm_eps": config.norm_eps, "rope_parameters": whole_head_rope, "use_qkv_bias": False,
                "qk_layernorm": False, "use_parallel_residual": False, "hidden_dropout": 0.0}
    if architecture == "GPTNeoXForCausalLM":
        return {**common, **shapes, "hidden_act": act, "layer_norm_eps": config.norm_eps,
                "rope_parameters": whole_head_rope, "use_parallel_residual": False, "attention_bias": config.bias,
                "hidden_dropout": 0.0}
    return {**common, "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
            "n_inner": config.mlp_width, "n_positions": config.block_size, "activation_function": act,
            "layer_norm_epsilon": config.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


# ----------------------------------------------------------------------- weights


def rope_half_split_order(head_size: int) -> torch.Tensor:
    """The channel order that turns tga's interleaved rotary pairs (2i, 2i+1) into
    transformers' half-split pairs (i, i + head_size/2): [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.cat([torch.arange(0, head_size, 2), torch.arange(1, head_size, 2)])


def _per_head(t: torch.Tensor, n_head: int, order: torch.Tensor) -> torch.Tensor:
    """Rows (dim 0) of a query or key weight or bias reordered within every head."""
    return t.unflatten(0, (n_head, -1))[:, order].flatten(0, 1)


def hf_state_dict(model: Transformer, architecture: str) -> dict[str, torch.Tensor]:
    """tga's weights under ``architecture``'s names and layouts, in float32.

    Absent biases (``bias: false``) become zeros where the class always has one
    (GPT-2 everywhere, the LayerNorms of GPT-NeoX and StableLM, GPT-NeoX's MLP):
    adding zero is exact."""
    config = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    d, vocab, n_head = config.n_embd, config.vocab_size, config.n_head
    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return sd[name] if name in sd else torch.zeros(shape)

    def norms(p: str, h: str, attn_norm: str, mlp_norm: str) -> dict[str, torch.Tensor]:
        """Block ``p``'s two norms under their names at ``h``; LayerNorm biases only
        where the class has them (every class with LayerNorm; zero when bias: false)."""
        pairs = {f"{h}{attn_norm}": f"{p}attn_norm", f"{h}{mlp_norm}": f"{p}mlp_norm"}
        named = {f"{theirs}.weight": sd[f"{ours}.weight"] for theirs, ours in pairs.items()}
        if config.norm == "layernorm":
            named.update({f"{theirs}.bias": get(f"{ours}.bias", (d,)) for theirs, ours in pairs.items()})
        return named

    embedding = sd["token_embedding.weight"][:vocab]  # the padding rows never produce a logit
    scale = model.embedding_multiplier if config.scale_embeddings else 1.0
    order = rope_half_split_order(d // n_head) if config.position_encoding == "rope" else None
    out: dict[str, torch.Tensor] = {}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        qkv_w, qkv_b = sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias")
        (q, k, v), (qb, kb, vb) = qkv_w.split(d), (qkv_b.split(d) if qkv_b is not None else (None,) * 3)
        if order is not None:
            q, k = _per_head(q, n_head, order), _per_head(k, n_head, order)
            if qkv_b is not None:
                qb, kb = _per_head(qb, n_head, order), _per_head(kb, n_head, order)
        up_w, up_b = sd[p + "mlp.up.weight"], sd.get(p + "mlp.up.bias")
        layer: dict[str, torch.Tensor | None]
        if architecture in LLAMA_LAYOUT:
            h = f"model.layers.{i}."
            layer = {h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                     h + "self_attn.v_proj.weight": v, h + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"],
                     h + "self_attn.q_proj.bias": qb, h + "self_attn.k_proj.bias": kb, h + "self_attn.v_proj.bias": vb,
                     h + "self_attn.o_proj.bias": sd.get(p + "attn.proj.bias"),
                     h + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
                     h + "mlp.down_proj.bias": sd.get(p + "mlp.down.bias"),
                     **norms(p, h, "input_layernorm", "post_attention_layernorm")}
            if architecture != "ArceeForCausalLM":  # SwiGLU: silu(gate) * value, gate first in tga's fused matrix
                gate, value = up_w.chunk(2)
                layer.update({h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": value})
                if up_b is not None:
                    gate_b, value_b = up_b.chunk(2)
                    layer.update({h + "mlp.gate_proj.bias": gate_b, h + "mlp.up_proj.bias": value_b})
            else:
                layer.update({h + "mlp.up_proj.weight": up_w, h + "mlp.up_proj.bias": up_b})
        elif architecture == "GPTNeoXForCausalLM":
            h = f"gpt_neox.layers.{i}."
            # One fused matrix laid out head by head: [q_h, k_h, v_h] for each head h.
            fused = torch.stack([t.unflatten(0, (n_head, -1)) for t in (q, k, v)], dim=1).flatten(0, 2)
            layer = {h + "attention.query_key_value.weight": fused,
                     h + "attention.dense.weight": sd[p + "attn.proj.weight"],
                     h + "attention.dense.bias": sd.get(p + "attn.proj.bias"),
                     h + "mlp.dense_h_to_4h.weight": up_w,
                     h + "mlp.dense_h_to_4h.bias": get(p + "mlp.up.bias", (up_w.shape[0],)),
                     h + "mlp.dense_4h_to_h.weight": sd[p + "mlp.down.weight"],
                     h + "mlp.dense_4h_to_h.bias": get(p + "mlp.down.bias", (d,))}
            if qkv_b is not None:
                layer[h + "attention.query_key_value.bias"] = torch.stack(
                    [t.unflatten(0, (n_head, -1)) for t in (qb, kb, vb)], dim=1).flatten()
            layer.update(norms(p, h, "input_layernorm", "post_attention_layernorm"))
        else:  # GPT-2: Conv1D weights are (in, out), the transpose of nn.Linear's
            h = f"transformer.h.{i}."
            layer = {h + "attn.c_attn.weight": qkv_w.t(), h + "attn.c_attn.bias": get(p + "attn.qkv.bias", (3 * d,)),
                     h + "attn.c_proj.weight": sd[p + "attn.proj.weight"].t(),
                     h + "attn.c_proj.bias": get(p + "attn.proj.bias", (d,)),
                     h + "mlp.c_fc.weight": up_w.t(), h + "mlp.c_fc.bias": get(p + "mlp.up.bias", (up_w.shape[0],)),
                     h + "mlp.c_proj.weight": sd[p + "mlp.down.weight"].t(),
                     h + "mlp.c_proj.bias": get(p + "mlp.down.bias", (d,)), **norms(p, h, "ln_1", "ln_2")}
        out.update({name: t for name, t in layer.items() if t is not None})
    prefix = {**dict.fromkeys(LLAMA_LAYOUT, "model."), "GPTNeoXForCausalLM": "gpt_neox.",
              "GPT2LMHeadModel": "transformer."}[architecture]
    names = {**dict.fromkeys(LLAMA_LAYOUT, ("embed_tokens", "norm")),
             "GPTNeoXForCausalLM": ("embed_in", "final_layer_norm"), "GPT2LMHeadModel": ("wte", "ln_f")}[architecture]
    # scale_embeddings multiplies the input embedding by sqrt(d): folded into an untied input
    # matrix (x 1.0 is exact otherwise). The output head keeps the unscaled matrix.
    out[f"{prefix}{names[0]}.weight"] = embedding * scale
    out[f"{prefix}{names[1]}.weight"] = sd["final_norm.weight"]
    if config.norm == "layernorm":
        out[f"{prefix}{names[1]}.bias"] = get("final_norm.bias", (d,))
    if architecture == "GPT2LMHeadModel":
        out["transformer.wpe.weight"] = sd["position_embedding.weight"] * scale
    out["lm_head.weight"] = embedding
    return {name: t.contiguous() for name, t in out.items()}


def _build_hf_model(model: Transformer, architecture: str, eos_token_id: int | None) -> Any:
    """The transformers model holding tga's weights; a strict load, so a missing or
    misnamed weight is an error here, not a random one in the export."""
    import transformers

    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config").replace("LMHeadModel", "Config"))
    hf_config = config_class(**_hf_config_values(model.config, architecture, eos_token_id))
    hf_config.architectures = [architecture]
    hf_model = getattr(transformers, architecture)(hf_config)
    hf_model.load_state_dict(hf_state_dict(model, architecture), strict=True)
    return hf_model.eval()


# ----------------------------------------------------------------------- tokenizer


def _gpt2_files(tokenizer: GPT2Tokenizer) -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe: the files the tokenizer was built from, or
    tiktoken's cached copies of them (checked against the hashes tiktoken pins)."""
    if tokenizer.encoder_json and tokenizer.vocab_bpe and Path(tokenizer.vocab_bpe).is_file() \
            and Path(tokenizer.encoder_json).is_file():
        return Path(tokenizer.encoder_json), Path(tokenizer.vocab_bpe)
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")
    found = {}
    for url, want in zip(_GPT2_URLS, (GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)):
        path = Path(cache) / hashlib.sha1(url.encode()).hexdigest()
        if path.is_file() and sha256_file(path) == want:
            found[url.rsplit("/", 1)[1]] = path
    if len(found) < 2:
        raise ExportError(
            f"the GPT-2 tokenizer's files are neither where it was built from nor in tiktoken's cache ({cache}): "
            "give GPT-2's encoder.json and vocab.bpe (tga export --encoder-json FILE --vocab-bpe FILE)")
    return found["encoder.json"], found["vocab.bpe"]


def hf_tokenizer(tokenizer: Tokenizer, block_size: int) -> Any | None:
    """A transformers fast tokenizer giving tga's ids. GPT-2: ``GPT2Tokenizer`` from
    GPT-2's own encoder.json and vocab.bpe. Char: a BPE model without merges over the
    characters, so every character is one token and an unseen one is ``<unk>`` (id 0),
    as in tga. A transformers tokenizer wrapped for tga (``.hf``) is itself. Anything
    else: None (the export then says in tga.json that it holds no tokenizer files).
    ``block_size`` becomes ``model_max_length``."""
    from transformers import GPT2Tokenizer as HFGPT2Tokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, GPT2Tokenizer):
        encoder_json, vocab_bpe = _gpt2_files(tokenizer)
        vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
        lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # after the "#version" line
        return HFGPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=block_size)
    if isinstance(tokenizer, CharTokenizer):
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models

        vocab = {UNK_TOKEN: 0, **{c: i + 1 for i, c in enumerate(tokenizer.chars)}}
        rust = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
        rust.decoder = decoders.Fuse()  # characters join without spaces
        return PreTrainedTokenizerFast(tokenizer_object=rust, unk_token=UNK_TOKEN, model_max_length=block_size)
    wrapped = getattr(tokenizer, "hf", None)  # a transformers tokenizer behind tga's protocol (tga.pretrained)
    return wrapped if hasattr(wrapped, "save_pretrained") else None


# ----------------------------------------------------------------------- checks and files


def check_ids(config: ModelConfig) -> torch.Tensor:
    """A deterministic (1, T) id sequence spanning the vocabulary, for the logit check."""
    length = min(config.block_size, CHECK_TOKENS)
    return (torch.arange(length) * 7919 % config.vocab_size).unsqueeze(0)


@torch.no_grad()
def max_logit_difference(model: Transformer, hf_model: Any, ids: torch.Tensor) -> float:
    """Max |logit difference| between tga's model and a transformers model on ``ids``, in
    the models' current dtypes (eval mode)."""
    ours = model.eval()(ids).logits
    theirs = hf_model.eval()(input_ids=ids).logits
    if theirs.shape != ours.shape:
        raise ExportError(f"the exported model's logits have shape {tuple(theirs.shape)}, tga's {tuple(ours.shape)}")
    return float((ours - theirs).abs().max())


def rope_table_tolerance(block_size: int) -> float:
    """How far transformers' rotary cos/sin may lie from tga's: transformers computes the
    angles (position x frequency, up to ``block_size``) in float32, tga in float64, so
    the angle is off by a few units in the last place of a float32 number up to
    ``block_size``: 4 x block_size x 2^-23. A wrong rope_theta or layout is off by O(1)."""
    return 4 * block_size * 2.0**-23


@torch.no_grad()
def _hf_rotary_tables_in_tga_layout(hf_model: Any, model: Transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary cos and sin for positions 0..block_size-1, in tga's
    interleaved layout (the sine negated on each pair's first channel)."""
    positions = torch.arange(model.config.block_size).unsqueeze(0)
    cos, sin = hf_model.base_model.rotary_emb(torch.zeros(1, dtype=torch.float64), positions)
    half = cos.shape[-1] // 2
    cos, sin = (t[0, :, :half].repeat_interleave(2, dim=-1) for t in (cos, sin))
    sin[:, 0::2] *= -1
    return cos, sin


@contextmanager
def _rotary_tables(model: Transformer, cos: torch.Tensor, signed_sin: torch.Tensor) -> Iterator[None]:
    """tga's model with the given rotary tables, restored afterwards."""
    rotaries = [block.attn.rotary for block in model.blocks]
    saved = [(r.cos, r.signed_sin) for r in rotaries]
    try:
        for r in rotaries:
            r.cos, r.signed_sin = cos.to(r.cos.dtype), signed_sin.to(r.cos.dtype)
        yield
    finally:
        for r, (c, s) in zip(rotaries, saved):
            r.cos, r.signed_sin = c, s


@torch.no_grad()
def check_export(model: Transformer, hf_model: Any) -> dict[str, Any]:
    """Whether ``hf_model`` computes what tga's ``model`` computes; the figures, or an
    ExportError.

    1. Rotary models: transformers' cos/sin tables equal tga's within
       :func:`rope_table_tolerance` (rope_theta, the layout, the head size).
    2. The mapping, in float64 with those tables in tga's model too, where rounding
       cannot hide a wrong weight: logits within :data:`MAPPING_TOLERANCE` (relative
       to the largest logit).
    3. As others will run it, float32 with each side's own tables: the max difference
       is recorded (tests/test_export.py holds it to :data:`LOGIT_TOLERANCE` on tiny
       models; it grows with width, depth and position, docs/export.md).
    """
    ids = check_ids(model.config)
    result: dict[str, Any] = {"tokens": int(ids.shape[1])}
    rotary = model.config.position_encoding == "rope"
    model.float(), hf_model.float()
    if rotary:
        cos, signed_sin = _hf_rotary_tables_in_tga_layout(hf_model, model)
        ours = model.blocks[0].attn.rotary
        table_diff = max(float((cos - ours.cos.double()).abs().max()),
                         float((signed_sin - ours.signed_sin.double()).abs().max()))
        if not table_diff <= rope_table_tolerance(model.config.block_size):
            raise ExportError(f"the exported model's rotary tables differ from tga's by {table_diff:.3g} (> "
                              f"{rope_table_tolerance(model.config.block_size):.3g}): a bug in tga.export "
                              "(rope_theta or the rotary layout); nothing was written")
        result["rope_table_max_abs_difference"] = table_diff
    result["float32_max_abs_difference"] = max_logit_difference(model, hf_model, ids)
    try:
        model.double(), hf_model.double()
        with _rotary_tables(model, cos, signed_sin) if rotary else contextlib.nullcontext():
            scale = max(1.0, float(model(ids).logits.abs().max()))
            mapping = max_logit_difference(model, hf_model, ids) / scale
    finally:
        model.float(), hf_model.float()
    if not mapping <= MAPPING_TOLERANCE:
        raise ExportError(f"the exported model's logits differ from tga's by {mapping:.3g} of the largest logit "
                          f"in float64 (> {MAPPING_TOLERANCE:g}): a bug in tga.export; nothing was written")
    result["float64_relative_difference"] = mapping
    return result


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers' saving and loading of a one-file model (they
    would fill the CLI's output and the job logs); restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _tokenizer_files_note(tokenizer: Tokenizer | None, hf_tok: Any | None) -> str:
    """What the folder holds for AutoTokenizer, and why."""
    if tokenizer is None:
        return "none: no tokenizer was given to the export"
    if hf_tok is None:
        return (f"none: tga's {tokenizer.name!r} tokenizer has no transformers counterpart; the folder holds the "
                "model only, and tga.json's 'tokenizer' describes the ids it was trained with")
    return f"{type(hf_tok).__name__} giving the ids of tga's {tokenizer.name!r} tokenizer"


def _check_logits(model: Transformer, folder: Path) -> dict[str, Any]:
    """:func:`check_export` of ``folder`` loaded as others will load it."""
    from transformers import AutoModelForCausalLM

    return check_export(model, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place: a reader sees the old folder, none, or the
    new one whole, never a mix."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise ExportError(f"{out_dir} already exists: choose another output folder or overwrite it")
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def export_model(model: Transformer, out_dir: str | os.PathLike[str], tokenizer: Tokenizer | None = None,
                 metadata: dict[str, Any] | None = None, overwrite: bool = False,
                 verify: bool = True) -> dict[str, Any]:
    """Write ``model`` to ``out_dir`` as a transformers folder (config.json,
    model.safetensors, the tokenizer's files when ``tokenizer`` is given, tga.json) and
    return tga.json's content. ``verify`` loads the folder back with
    ``AutoModelForCausalLM`` and publishes it only if :func:`check_export` passes.
    ``model`` is put in float32 and eval mode on the CPU, in place. A failed export
    leaves no folder it created (``out_dir``'s missing parents included)."""
    architecture = hf_architecture(model.config)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists: choose another output folder or overwrite it")
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} ids but the model was trained with "
                          f"{model.config.vocab_size}: give the tokenizer the model was trained with")
    model = model.float().cpu().eval()
    hf_tok = hf_tokenizer(tokenizer, model.config.block_size) if tokenizer is not None else None
    eos = getattr(tokenizer, "eot_token", None)  # the id appended after each training document
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "tga_version": _tga_version(),
        "architecture": architecture,
        "model_config": asdict(model.config),
        "tied_embeddings": not model.config.scale_embeddings,
        "rope_layout": ("tga's interleaved pairs, permuted to transformers' half-split"
                        if model.config.position_encoding == "rope" else None),
        "tokenizer": tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else None,
        "tokenizer_files": _tokenizer_files_note(tokenizer, hf_tok),
        **(metadata or {}),
    }
    with no_empty_folders_left(out_dir.parent):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_temporaries(out_dir):  # left by a killed export
            shutil.rmtree(stale, ignore_errors=True)
        _write_folder(out_dir, overwrite, model, _build_hf_model(model, architecture, eos), hf_tok, info, verify)
    return info


def _write_folder(out_dir: Path, overwrite: bool, model: Transformer, hf_model: Any, hf_tok: Any | None,
                  info: dict[str, Any], verify: bool) -> None:
    """Save ``hf_model`` into a temporary sibling, check it against ``model`` (``verify``),
    add tga.json (``info``, with the check's figures) and rename it onto ``out_dir``."""
    tmp = temporary_sibling(out_dir)
    try:
        with _quiet_transformers():
            hf_model.save_pretrained(tmp)
            del hf_model  # the check loads the saved copy: one model fewer in memory
            if hf_tok is not None:
                hf_tok.save_pretrained(tmp)
            if verify:
                info["logit_check"] = _check_logits(model, tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
        for path in tmp.iterdir():  # safetensors writes 0600; the folder is for others to open
            path.chmod(0o644)
        tmp.chmod(0o755)
        _publish(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _tga_version() -> str:
    from tga import __version__

    return __version__


def export_checkpoint(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """:func:`export_model` of a tga checkpoint, recording where it came from (path,
    sha256, the training metadata saved in it) in tga.json. ``tokenizer``: a tokenizer,
    or the tokenizer JSON tga saved (the workflow's outputs/data/tokens/tokenizer.json)."""
    checkpoint = Path(checkpoint)
    model, extra = load_checkpoint(checkpoint, map_location="cpu")
    hf_architecture(model.config)  # an unexportable variant fails before the checkpoint is hashed
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    source = {"source_checkpoint": str(checkpoint), "source_sha256": sha256_file(checkpoint), "checkpoint_extra": extra}
    return export_model(model, out_dir, tokenizer, metadata=source, overwrite=overwrite)
