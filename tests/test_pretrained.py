"""Pretrained Hugging Face models (tga/pretrained.py, workflow/rules/pretrained.smk), offline:
tiny random-weight models built from transformers configs, saved into local folders and
into a hand-made Hugging Face cache (revisions are refs there, as on the hub)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from tga.pretrained import HFCausalLM, analyze_pretrained  # noqa: E402
from tga.pretrained_entries import (  # noqa: E402
    PretrainedError,
    check_pretrained,
    evolution_revisions,
    final_revision,
    revision_step,
)
from workflow_runs import copy_workflow, run_snakemake  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = 50257  # GPT-2's vocabulary: every tiny model is read with the GPT-2 tokenizer
TINY = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64)
FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2),
    "openai-gpt": lambda: transformers.OpenAIGPTConfig(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**TINY),
    "llama": lambda: transformers.LlamaConfig(**TINY),
}
CACHED_ID = "tga-test/tiny-neox"


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


def save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cache_revision(hf_home: Path, repo_id: str, revision: str, folder: Path) -> None:
    """A revision as huggingface_hub stores it: refs/<revision> holds a commit, whose
    snapshot folder holds the files."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = f"{abs(hash((repo_id, revision))):040x}"[:40]
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_files):
    # GPT-2's encoder.json is the tokenizer's vocab.json, its vocab.bpe the merges.txt
    return transformers.GPT2Tokenizer(vocab=str(gpt2_files["encoder_json"]), merges=str(gpt2_files["vocab_bpe"]))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, gpt2_tokenizer) -> dict[str, Path]:
    """Local folders of the four families, and an HF cache holding tiny-neox at step0 and step10."""
    root = tmp_path_factory.mktemp("zoo")
    folders = {family: save(tiny_model(family), gpt2_tokenizer, root / family) for family in FAMILIES}
    hf_home = root / "hf"
    for seed, revision in enumerate(["step0", "step10"]):
        snapshot = save(tiny_model("gpt_neox", seed), gpt2_tokenizer, root / f"neox-{revision}")
        cache_revision(hf_home, CACHED_ID, revision, snapshot)
    return {**folders, "hf_home": hf_home, "root": root}


@pytest.fixture
def offline_cache(zoo, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(zoo["hf_home"] / "hub"))
    return zoo


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_mapping_matches_the_models_own_hidden_states(family):
    """embedding = hidden_states[0]; block i = the output of the i-th block module (a
    hook on the block itself, not transformers' list); final_norm = hidden_states[-1],
    which is the final norm applied to block N (GPT-1: no final norm, block N again)."""
    model = tiny_model(family)
    blocks = getattr(model.base_model, "h", None) or model.base_model.layers
    outputs: list[torch.Tensor] = []
    for block in blocks:
        block.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, (tuple, list)) else out))
    ids = torch.randint(0, V, (1, 9))
    with torch.inference_mode():
        own = model(ids, output_hidden_states=True).hidden_states
        outputs.clear()
        ours = HFCausalLM(model, 64, family)(ids, return_hidden_states=True).hidden_states
    assert len(own) == 3 and len(ours) == 4 and len(outputs) == 2
    assert torch.equal(ours[0], own[0].float())
    for i in (1, 2):
        assert torch.equal(ours[i], outputs[i - 1].float()), f"block{i}"
    assert torch.equal(ours[-1], own[-1].float())
    if family == "openai-gpt":
        assert torch.equal(ours[-1], ours[-2])  # Post-LN without a final norm
    else:
        norm = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm", "llama": "norm"}[family]
        with torch.inference_mode():
            assert torch.allclose(getattr(model.base_model, norm)(outputs[-1]).float(), ours[-1], atol=1e-6)
        assert not torch.allclose(ours[-1], ours[-2])


def test_revision_steps_order_the_evolution():
    assert revision_step("step143000") == 143000
    assert revision_step("stage1-step1000-tokens4B") == 1000
    assert revision_step("main") is None and revision_step(None) is None
    stages = evolution_revisions({"revisions": ["step1000", "step0", "step143000"]})
    assert stages == {"step0": "step0", "step1000": "step1000", "step143000": "step143000"}
    assert final_revision({"revisions": ["step143000", "step0"]}) == "step143000"
    assert final_revision({"revision": "main"}) == "main" and final_revision({}) is None


def config_with(entries: dict, variants: tuple[str, ...] = ("tiny",)) -> dict:
    return {"pretrained": entries, "variants": {v: {} for v in variants}, "geometry": {"heatmap_layers": [0, -1]}}


def test_bad_entries_are_named_before_any_job(offline_cache, tmp_path):
    zoo = offline_cache
    cases = {
        "unknown model id when offline": ({"model": "no-such-org/no-such-model"}, "is not in the Hugging Face cache"),
        "missing local folder": ({"model": str(tmp_path / "missing")}, "does not exist"),
        "missing revision": ({"model": CACHED_ID, "revisions": ["step0", "step99"]}, "revision 'step99'"),
        "revision without a step": ({"model": CACHED_ID, "revisions": ["step0", "main"]}, "names no training step"),
        "heatmap layer": ({"model": str(zoo["gpt2"])}, None),
    }
    bert = tmp_path / "bert"
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    cases["not a causal LM"] = ({"model": str(bert)}, "is not a causal language model (BertForMaskedLM)")
    for what, (entry, message) in cases.items():
        config = config_with({"m1": entry})
        if message is None:
            config["geometry"]["heatmap_layers"] = [7]
            message = "layer 7 is out of range for its 2 blocks"
        with pytest.raises(PretrainedError, match="^pretrained.m1") as error:
            check_pretrained(config)
        assert message in str(error.value), what
    with pytest.raises(PretrainedError, match="also a variant"):
        check_pretrained(config_with({"tiny": {"model": str(zoo["gpt2"])}}))
    check_pretrained(config_with({"ok": {"model": CACHED_ID, "revisions": ["step0", "step10"]},
                                  "local": {"model": str(zoo["llama"])}}))


def test_tokenizer_without_the_needed_tokens_is_named(zoo, tmp_path):
    """A word-level tokenizer that knows none of the prompt's words maps it to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "a": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    folder = save(tiny_model("llama"), tokenizer, tmp_path / "llama-words")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The lobster is a species of clawed lobster.\n")
    entry = {"model": str(folder), "revision": None, "revisions": None, "dtype": "auto", "device": "cpu",
             "block_size": None}
    settings = {"heatmap_layers": [0, -1], "exclude_first_token": False, "knn_k": 2}
    with pytest.raises(PretrainedError, match=r"^pretrained.words: the tokenizer has no tokens for parts of the text"):
        analyze_pretrained(entry, "words", {"trained": None}, prompts, tmp_path / "out", settings)


WORKFLOW = {
    "data": {"source": "text", "train": "resources/wikitext-2-sample/train.txt",
             "validation": "resources/wikitext-2-sample/validation.txt",
             "test": "test.txt", "label": "pretrained test run"},  # written by the test: 4 KB
    "tokenizer": {"name": "char"},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 32, "dropout": 0.0},
    "training": {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_interval": 2, "eval_batches": 1,
                 "checkpoint_interval": 2, "device": "cpu"},
    "seeds": [0],
    "variants": {"tiny": {}},
    "comparisons": [["gpt2", "tiny"], ["llama", "gpt1"]],
    "evaluation": {"batch_size": 8, "device": "cpu"},
    "geometry": {"prompts": "prompts.txt", "heatmap_layers": [0, -1], "knn_k": 2},
    "resources": {"train_threads": 1, "train_gpus": 0},
}


TARGETS = [
    *(f"outputs/figures/{name}/pretrained/{figure}" for name in ("gpt2", "gpt1", "neox", "llama")
      for figure in ("geometry_layers.png", "similarity_heatmaps.png")),
    *(f"outputs/evolution/neox/pretrained/{figure}"
      for figure in ("metrics_by_step.png", "heatmaps_before_after.png", "similarity_change.png")),
    "outputs/compare/perplexity.png", "outputs/compare/similarity_by_layer.png", "outputs/compare/difference.png",
]


@pytest.mark.workflow
def test_workflow_measures_pretrained_models_beside_a_variant(zoo, tmp_path):
    """The done criterion: GPT-2, GPT-1, GPT-NeoX (two revisions, from the HF cache,
    offline) and Llama in `pretrained:` get geometry, figures, perplexity, an evolution
    series and comparisons with a trained variant, in one `snakemake --cores 2`."""
    copy_workflow(tmp_path)
    # the sample's test split up to the first line end after 4,000 characters: five models
    # score it, four of them over GPT-2's 50257 tokens
    test_text = (ROOT / "resources/wikitext-2-sample/test.txt").read_text(encoding="utf-8")
    (tmp_path / "test.txt").write_text(test_text[:test_text.index("\n", 4000) + 1], encoding="utf-8")
    (tmp_path / "prompts.txt").write_text("The lobster is a species of clawed lobster found in the sea.\n"
                                          "It may grow to a length of 60 cm and a mass of six kilograms.\n")
    config = dict(WORKFLOW, pretrained={
        "gpt2": {"model": str(zoo["gpt2"])},
        "gpt1": {"model": str(zoo["openai-gpt"]), "dtype": "float32"},
        "neox": {"model": CACHED_ID, "revisions": ["step10", "step0"]},
        "llama": {"model": str(zoo["llama"]), "block_size": 32},
    })
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HOME": str(zoo["hf_home"]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = run_snakemake(
        # the pretrained entries' outputs and the comparisons (not the variant's own figures: time)
        [*TARGETS, "--cores", "2", "--replace-workflow-config",
         "--configfile", "run.yaml"],  # targets first: --configfile takes every word after it
        tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "outputs"
    for name in ("gpt2", "gpt1", "neox", "llama"):
        for figure in ("geometry_layers.png", "similarity_heatmaps.png"):
            assert (out / "figures" / name / "pretrained" / figure).stat().st_size > 10_000
        summary = pd.read_csv(out / "geometry" / name / "pretrained" / "summary.csv")
        assert list(summary["layer_name"].unique()) == ["embedding", "block1", "block2", "final_norm"]
        assert set(summary["stage"]) == {"trained"}
        assert "mean_logit_freq_corr" in set(summary["metric"])
    for figure in ("metrics_by_step.png", "heatmaps_before_after.png", "similarity_change.png"):
        assert (out / "evolution" / "neox" / "pretrained" / figure).stat().st_size > 10_000
    evolution = pd.read_csv(out / "evolution" / "neox" / "pretrained" / "summary.csv")
    assert evolution.drop_duplicates("stage")[["stage", "step"]].values.tolist() == [["step0", 0], ["step10", 10]]
    cosine = evolution[(evolution["metric"] == "mean_cosine") & (evolution["layer_name"] == "block2")]
    assert cosine["mean"].nunique() == 2  # two revisions, two different models
    trained = pd.read_csv(out / "geometry" / "neox" / "pretrained" / "summary.csv")
    last = evolution[evolution["stage"] == "step10"].drop(columns=["stage", "step"]).reset_index(drop=True)
    assert trained.drop(columns=["stage", "step"]).equals(last)  # the entry's model is its last revision

    table = pd.read_csv(out / "compare" / "perplexity.csv")
    rows = table.set_index("variant")
    assert set(rows.index) == {"tiny", "gpt2", "gpt1", "neox", "llama"}
    text_bytes = len((tmp_path / "test.txt").read_bytes())
    assert (rows["n_bytes"] == text_bytes).all()  # one split, one byte count, any tokenizer
    assert rows.loc["gpt2", "tokenizer"] != rows.loc["tiny", "tokenizer"]
    assert rows.loc["llama", "block_size"] == 32 and rows.loc["gpt2", "block_size"] == 64
    # random weights over GPT-2's 50257 tokens: close to a uniform guess, far from a perfect one
    assert 20_000 < rows.loc["gpt2", "token_ppl"] < 200_000
    differences = pd.read_csv(out / "compare" / "difference.csv")
    assert set(differences["comparison"]) == {"gpt2 - tiny", "llama - gpt1"}
    assert differences.loc[differences["comparison"] == "llama - gpt1", "mean_diff"].notna().any()
    assert (out / "compare" / "similarity_by_layer.png").is_file() and (out / "compare" / "difference.png").is_file()
    with __import__("numpy").load(out / "geometry" / "gpt2" / "pretrained" / "similarity.npz") as npz:
        assert [str(t) for t in npz["tokens/prompt0"][:3]] == ["The", " lobster", " is"]
    perplexity = json.loads((out / "eval" / "neox" / "pretrained" / "perplexity.json").read_text())
    assert perplexity["revision"] == "step10" and perplexity["model"] == CACHED_ID
