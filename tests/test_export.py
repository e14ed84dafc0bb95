"""``tga.export``: trained models as Hugging Face folders that ``transformers`` opens and
that compute tga's logits (to 1e-5, float32), the mutations that break that, the
variants that map onto no class, the tokenizers, and writing all or nothing."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

import tga
import tga.export
from tga.export import (LOGIT_TOLERANCE, MAPPING_TOLERANCE, METADATA_FILE, ExportError, export_checkpoint,
                        export_model, hf_architecture)
from tga.model import ModelConfig, Transformer, save_checkpoint
from tga.schema import defaults, load_schema
from tga.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer, gpt2_from_files, gpt2_from_tiktoken

# About 100 ids: letters, digits, punctuation, whitespace.
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()[]{}\n\t@#$%&*_+=<>/|~"))
CHAR_TOKENIZER = CharTokenizer(CHARS)
TEXT = "The lobster, Homarus gammarus, is 0.5 m long!\n\tIt lives in the sea ... (ÿ is unseen)"


@pytest.fixture(scope="module")
def hf() -> Any:
    """transformers, imported once for the module (its import takes seconds)."""
    return pytest.importorskip("transformers")


def tiny_model(**settings: Any) -> Transformer:
    """2 layers x 32 dims over CHAR_TOKENIZER's vocabulary, with weights far from init:
    at init (std 0.02) attention is almost uniform and norms are ones, where a wrong
    rotary layout or a misplaced norm weight barely moves the logits."""
    config = ModelConfig(vocab_size=CHAR_TOKENIZER.vocab_size, **{
        **defaults("model"), "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0, **settings})
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("norm.weight")
            p.copy_(torch.randn_like(p) * (0.15 if p.dim() > 1 else 0.2) + (1.0 if gain else 0.0))
    return model.eval()


def logits_and_states(model: Transformer, hf_model: Any, ids: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, max |hidden state difference|): transformers' states are
    the embedding, blocks 1..N-1 and the final norm's output (tga's n_layer + 2 states
    without block N, which transformers replaces by the normed one)."""
    with torch.no_grad():
        ours = model(ids, return_hidden_states=True)
        theirs = hf_model(input_ids=ids, output_hidden_states=True)
    n = model.config.n_layer
    states = max(float((a - b).abs().max()) for a, b in
                 zip([*ours.hidden_states[:n], ours.hidden_states[-1]], theirs.hidden_states))
    return float((ours.logits - theirs.logits).abs().max()), states


# settings, class, the config fields transformers must read back
CASES = {
    "llama-tied-rope500": ({"rope_base": 500.0}, "LlamaForCausalLM",
                           {"tie_word_embeddings": True, "rms_norm_eps": 1e-5, "intermediate_size": 88}),
    "llama-untied-bias": ({"scale_embeddings": True, "bias": True, "norm_eps": 1e-6, "mlp_hidden": 48},
                          "LlamaForCausalLM", {"tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                                               "intermediate_size": 48, "attention_bias": True}),
    "arcee-gelu": ({"activation": "gelu", "rope_base": 2000.0}, "ArceeForCausalLM", {"hidden_act": "gelu"}),
    "neox-layernorm-relu-bias": ({"norm": "layernorm", "activation": "relu", "bias": True, "rope_base": 300.0},
                                 "GPTNeoXForCausalLM", {"use_parallel_residual": False, "hidden_act": "relu"}),
    "stablelm-layernorm-swiglu": ({"norm": "layernorm", "rope_base": 700.0}, "StableLmForCausalLM",
                                  {"use_parallel_residual": False, "layer_norm_eps": 1e-5}),
    "gpt2-learned": ({"norm": "layernorm", "activation": "gelu", "position_encoding": "learned"},
                     "GPT2LMHeadModel", {"activation_function": "gelu", "n_positions": 32}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_opens_the_folder_and_computes_tgas_logits(hf: Any, tmp_path: Path, case: str) -> None:
    settings, architecture, fields = CASES[case]
    model = tiny_model(**settings)
    out = tmp_path / "hf"
    info = export_model(model, out, CHAR_TOKENIZER)  # with the export's own check, and the test's below
    assert info["logit_check"]["float64_relative_difference"] <= MAPPING_TOLERANCE
    loaded = hf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(loaded).__name__ == architecture
    for key, value in fields.items():
        assert getattr(loaded.config, key) == value, key
    if model.config.position_encoding == "rope":
        assert loaded.config.rope_parameters["rope_theta"] == model.config.rope_base
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    logit_diff, state_diff = logits_and_states(model, loaded, ids)
    assert logit_diff <= LOGIT_TOLERANCE and state_diff <= LOGIT_TOLERANCE, (logit_diff, state_diff)
    # the logits are not near zero, so the tolerance is a real constraint
    with torch.no_grad():
        assert float(model(ids).logits.std()) > 0.5
    tokenizer = hf.AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXT)["input_ids"] == CHAR_TOKENIZER.encode(TEXT)


def _rope_theta_left_at_default(original: Any) -> Any:
    def mutant(config: ModelConfig, architecture: str, eos: int | None) -> dict[str, Any]:
        values = original(config, architecture, eos)
        values["rope_parameters"] = {**values["rope_parameters"], "rope_theta": 10000.0}
        return values
    return mutant


def _gpt2_tanh_gelu(original: Any) -> Any:
    def mutant(config: ModelConfig, architecture: str, eos: int | None) -> dict[str, Any]:
        return {**original(config, architecture, eos), "activation_function": "gelu_new"}
    return mutant


MUTATIONS = {
    # q/k rows left in tga's interleaved order under transformers' half-split rotation
    "no q/k permutation": ({"rope_base": 500.0}, "rope_half_split_order", lambda original: torch.arange),
    "rope_theta not exported": ({"rope_base": 500.0}, "_hf_config_values", _rope_theta_left_at_default),
    "GPT-2's tanh GELU": ({"norm": "layernorm", "activation": "gelu", "position_encoding": "learned"},
                          "_hf_config_values", _gpt2_tanh_gelu),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_wrong_mapping_fails_the_logit_check(hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               mutation: str) -> None:
    settings, name, make_mutant = MUTATIONS[mutation]
    model = tiny_model(**settings)
    monkeypatch.setattr(tga.export, name, make_mutant(getattr(tga.export, name)))
    export_model(model, tmp_path / "unchecked", verify=False)
    loaded = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "unchecked", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    logit_diff, _ = logits_and_states(model, loaded, ids)
    assert logit_diff > 10 * LOGIT_TOLERANCE, logit_diff  # the test above would fail
    with pytest.raises(ExportError, match="differ from tga's"):  # and the export refuses to publish it
        export_model(model, tmp_path / "checked")
    assert not (tmp_path / "checked").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["unchecked"]


@pytest.mark.parametrize("settings, needles", [
    ({"norm_position": "post"}, ["norm_position='post'", "Post-LN", "after the residual sum"]),
    ({"unigram_bias": True}, ["unigram_bias=true", "logit bias", "unigram_bias: false"]),
    ({"residual": False}, ["residual=false"]),
    ({"mlp": False}, ["mlp=false"]),
    ({"position_encoding": "learned"}, ["position_encoding='learned'", "norm='rmsnorm'", "GPT-2"]),
    ({"norm": "layernorm", "bias": True}, ["bias=true", "norm='layernorm'", "activation='swiglu'", "StableLM"]),
])
def test_a_variant_no_class_computes_gets_one_error_naming_it(settings: dict, needles: list[str]) -> None:
    config = ModelConfig(vocab_size=10, **{**defaults("model"), "n_layer": 1, "n_head": 2, "n_embd": 8, **settings})
    with pytest.raises(ExportError) as error:
        hf_architecture(config)
    for needle in needles:
        assert needle in str(error.value)


def test_the_defaults_four_variants() -> None:
    """The study's defaults: both Pre-LN variants map, both Post-LN variants do not."""
    variants = load_schema()["properties"]["variants"]["default"]
    mapped = {}
    for name, settings in variants.items():
        config = ModelConfig(vocab_size=10, **{**defaults("model"), **settings})
        try:
            mapped[name] = hf_architecture(config)
        except ExportError as error:
            mapped[name] = "Post-LN" in str(error) and "error"
    assert mapped == {"llama-preln": "LlamaForCausalLM", "llama-postln": "error",
                      "standard-preln": "ArceeForCausalLM", "standard-postln": "error"}


def test_gpt2_tokenizer_opens_with_autotokenizer(hf: Any, tmp_path: Path, gpt2_files: dict[str, Path],
                                                 shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 BPE from the local files and from tiktoken's cache: AutoTokenizer gives tga's ids."""
    text = TEXT + " Ünïcødé — 日本語 's 've  spaces\n\n"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(shared_data_dir / "gpt2" / "tiktoken_cache"))
    for route, tokenizer in (("files", gpt2_from_files(**gpt2_files)), ("tiktoken", gpt2_from_tiktoken())):
        tga.export.hf_tokenizer(tokenizer, 1024).save_pretrained(tmp_path / route)
        loaded = hf.AutoTokenizer.from_pretrained(tmp_path / route)
        assert loaded(text)["input_ids"] == tokenizer.encode(text), route
        assert loaded.eos_token_id == tokenizer.eot_token == 50256
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    without_files = GPT2Tokenizer(tokenizer.encoding, source="tiktoken")
    with pytest.raises(ExportError, match="--encoder-json FILE --vocab-bpe FILE"):
        tga.export.hf_tokenizer(without_files, 1024)


class WordTokenizer(Tokenizer):
    """A tokenizer tga.export does not know: the folder holds the model alone."""

    name, vocab_size = "words", CHAR_TOKENIZER.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return {"type": "words"}


def test_a_tokenizer_without_counterpart_is_left_out_and_said(hf: Any, tmp_path: Path) -> None:
    info = export_model(tiny_model(), tmp_path / "hf", WordTokenizer())
    assert info["tokenizer_files"].startswith("none: tga's 'words' tokenizer has no transformers counterpart")
    assert info["tokenizer"] == {"type": "words"}
    assert not list((tmp_path / "hf").glob("tokenizer*"))
    assert type(hf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")).__name__ == "LlamaForCausalLM"


def test_export_writes_all_or_nothing(hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    def broken(*args: Any) -> None:
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(tga.export, "_check_logits", broken)
    with pytest.raises(RuntimeError, match="killed"):
        export_model(model, out, overwrite=True)
    with pytest.raises(RuntimeError, match="killed"):  # no folder it made is left, parents included
        export_model(model, tmp_path / "new" / "deeper" / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and [p.name for p in out.iterdir()] == ["mine.txt"]
    monkeypatch.undo()
    export_model(model, out, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert "mine.txt" not in names and {"config.json", "model.safetensors", METADATA_FILE} <= set(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary or old folder left
    assert all(p.stat().st_mode & 0o044 for p in out.iterdir())  # readable by others


def test_export_checkpoint_records_version_settings_and_source(hf: Any, tmp_path: Path) -> None:
    model = tiny_model(rope_base=500.0)
    checkpoint = tmp_path / "final.pt"
    save_checkpoint(checkpoint, model, {"step": 3, "seed": 1})
    CHAR_TOKENIZER.save(tmp_path / "tokenizer.json")
    info = export_checkpoint(checkpoint, tmp_path / "hf", tmp_path / "tokenizer.json")
    saved = json.loads((tmp_path / "hf" / METADATA_FILE).read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["source_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert saved["tga_version"] == tga.__version__ and saved["architecture"] == "LlamaForCausalLM"
    assert saved["model_config"] == asdict(model.config) and saved["checkpoint_extra"] == {"step": 3, "seed": 1}
    assert saved["tokenizer"]["chars"] == CHARS and saved["tokenizer_files"].startswith("TokenizersBackend giving")
    check = saved["logit_check"]
    assert check["float32_max_abs_difference"] <= LOGIT_TOLERANCE
    assert check["float64_relative_difference"] <= MAPPING_TOLERANCE
    assert check["rope_table_max_abs_difference"] <= tga.export.rope_table_tolerance(32)
    assert hf.AutoTokenizer.from_pretrained(tmp_path / "hf").decode(CHAR_TOKENIZER.encode("lobster")) == "lobster"
    assert os.path.getsize(tmp_path / "hf" / "model.safetensors") > 0


@pytest.mark.workflow
def test_the_export_rule_writes_the_folder(tiny_study: Path, tmp_path: Path) -> None:
    """Rule ``export`` (asked for by path, not in ``all``) on the tiny study's trained
    Llama-Pre-LN: the folder, tga.json naming the source, its benchmark. (Post-LN's error
    is the library's, tested above; one Snakemake job here keeps the suite's time.)"""
    from workflow_runs import copy_study, snakemake

    study = copy_study(tiny_study, tmp_path)
    snakemake(study, "outputs/export/llama-preln/seed0", cores=1)
    folder = study / "outputs" / "export" / "llama-preln" / "seed0"
    info = json.loads((folder / METADATA_FILE).read_text())
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["source_sha256"] == hashlib.sha256(
        (study / "outputs" / "models" / "llama-preln" / "seed0" / "final.pt").read_bytes()).hexdigest()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert (study / "outputs" / "benchmarks" / "export" / "llama-preln" / "seed0.tsv").is_file()
