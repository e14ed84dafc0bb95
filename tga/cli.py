"""``tga``: the seed study's command-line workflow.

    tga download  -> <data-dir>/{train,validation,test}.txt
    tga train     -> <output-dir>/<model-name>/{init.pt,final.pt,train_log.csv,checkpoints/,tokenizer.json}
    tga evaluate  -> perplexity JSON (token ppl, bits/byte, word ppl)
    tga analyze   -> geometry metrics.csv/summary.csv/prompts.csv/similarity.npz + figures
    tga evolve    -> train with frequent checkpoints, then the geometry of every checkpoint

Each subcommand is argument parsing plus calls into the library functions the Snakemake
pipeline uses, so a CLI run and a pipeline run write the same files. Bad input ends
with one ``tga: error: ...`` line on stderr and exit code 2, found before anything is
written (only a run that fails mid-training, e.g. by diverging, keeps what it wrote).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from tga.data import SPLITS, DataError, load_token_file, prepare_corpus, read_token_metadata, tokenize_to_file
from tga.device import DeviceError, resolve_device
from tga.evaluate import evaluate_checkpoint
from tga.geometry import (
    analyze_checkpoints,
    analyze_model,
    encode_prompts,
    load_prompts,
    resolve_layer_indices,
)
from tga.metrics import GeometryError
from tga.model import CheckpointError, Transformer, load_checkpoint
from tga.resources import ResourceError
from tga.settings import ConfigError, check_file
from tga.tokenizers import VALID_TOKENIZERS, Tokenizer, TokenizerError, create_tokenizer, load_tokenizer
from tga.schema import ModelConfig, SettingError, TrainConfig, defaults, key_specs
from tga.train import TrainingError, train_model

__all__ = ["CLIError", "build_parser", "main"]

TOKENIZER_CHOICES = ("tiktoken", "bpe", "char")
# Keys of a GPT-2 tokenizer JSON that say how it was built, not which ids it gives
# (every route is hash-checked to give the same ids), so they do not block reuse.
_TOKENIZER_ROUTE_KEYS = ("source", "encoder_json", "vocab_bpe")
_DESCRIPTION = """\
Train small LLaMA-style transformer variants (Pre-LN/Post-LN, RMSNorm/LayerNorm,
SwiGLU/GELU) and measure the geometry of their token representations.

  download  -> <data-dir>/{train,validation,test}.txt
  train     -> <output-dir>/<model-name>/ (init.pt, final.pt, train_log.csv, checkpoints/, tokenizer.json)
  evaluate  -> perplexity JSON (token ppl, bits/byte, word ppl)
  analyze   -> geometry CSV/NPZ files and figures, init vs trained
  evolve    -> train, then the geometry at init and at every checkpoint"""
_EPILOG = """\
example (offline, tiny, character tokenizer):
  tga download --data-dir data --text-train train.txt --text-validation valid.txt --text-test test.txt
  tga train --tokenizer char --n-layer 2 --n-head 2 --n-embd 64 --block-size 64 --max-steps 200 --model-name tiny
  tga evaluate --model models/tiny
  tga analyze --trained-model models/tiny --prompts config/prompts.txt --output-dir geometry/tiny
run `tga COMMAND --help` for the flags of each command."""


class CLIError(ValueError):
    """Bad command-line input that the CLI itself detects; the message names the flag and the fix."""


class _UsageError(Exception):
    """argparse's complaint, turned into one line instead of usage text plus exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (on/off switches,
    defaults computed at run time, which the help text explains)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if switch or action.default is None:
            return action.help
        return super()._get_help_string(action)


class _TopHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help keeps the layout of its command table and example."""


_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    DataError,
    TokenizerError,
    GeometryError,
    CheckpointError,
    SettingError,
    ConfigError,
    TrainingError,
    DeviceError,
    ResourceError,
)


# --------------------------------------------------------------------------- parser


def _add_data_dir(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data-dir", type=Path, default=Path("data"), metavar="DIR",
                   help=f"folder of train.txt, validation.txt and test.txt; {what}")


def _add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=TOKENIZER_CHOICES, default="tiktoken",
                   help="tiktoken: GPT-2 BPE through tiktoken (downloads once, or reads TIKTOKEN_CACHE_DIR); "
                        "bpe: the same GPT-2 BPE built from local --encoder-json/--vocab-bpe files; "
                        "char: one id per character of the training split")
    g.add_argument("--encoder-json", type=Path, default=None,
                   help="GPT-2's encoder.json, for --tokenizer bpe")
    g.add_argument("--vocab-bpe", type=Path, default=None,
                   help="GPT-2's vocab.bpe, for --tokenizer bpe")


_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"integer": int, "number": float, "string": str}


def _schema_flag(g: Any, section: str, key: str, flag: str | None = None, **overrides: Any) -> argparse.Action:
    """One flag for a config key, with the type, choices, default and help the schema
    (tga/config.schema.yaml) gives it; booleans get --KEY/--no-KEY."""
    spec = key_specs(section)[key]
    types = [spec["type"]] if isinstance(spec.get("type"), str) else list(spec.get("type", []))
    kwargs: dict[str, Any] = {"dest": key, "default": spec["default"],
                              "help": spec.get("description", key.replace("_", " ")).replace("%", "%%")}
    if "enum" in spec:
        kwargs["choices"] = spec["enum"]
    elif "boolean" in types:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = next(_FLAG_TYPES[t] for t in types if t in _FLAG_TYPES)
    kwargs.update(overrides)
    return g.add_argument(flag or f"--{key.replace('_', '-')}", **kwargs)


def _add_settings(p: argparse.ArgumentParser, evolve: bool) -> None:
    """Every model and training key of the workflow as a flag, plus the seed study's
    shorthands --pre-ln/--post-ln and --use-swiglu. ``evolve`` names the step count
    --iterations and derives the intervals from it."""
    g = p.add_argument_group("model architecture (defaults: the workflow's, from tga/config.schema.yaml)")
    pos = g.add_mutually_exclusive_group()
    act = g.add_mutually_exclusive_group()
    for key in key_specs("model"):
        _schema_flag({"norm_position": pos, "activation": act}.get(key, g), "model", key)
    pos.add_argument("--pre-ln", dest="norm_position", action="store_const", const="pre",
                     help="Pre-LN blocks, x + f(norm(x)) (LLaMA/GPT-2 style): --norm-position pre")
    pos.add_argument("--post-ln", dest="norm_position", action="store_const", const="post",
                     help="Post-LN blocks, norm(x + f(x)) (original Transformer): --norm-position post")
    act.add_argument("--use-swiglu", dest="activation", action="store_const", const="swiglu",
                     help="SwiGLU MLP (LLaMA): --activation swiglu")
    g = p.add_argument_group("training (defaults: the workflow's, from tga/config.schema.yaml)")
    overrides: dict[str, dict[str, Any]] = {"warmup_steps": {
        "default": None, "help": f"linear warmup steps; default: {defaults('training')['warmup_steps']}, "
                                 "or all steps when there are fewer"}}
    if evolve:
        overrides["max_steps"] = {"help": "optimizer steps", "flag": "--iterations"}
        overrides["checkpoint_interval"] = {"default": None, "help": "keep a checkpoint every this many steps; "
                                            "default: a fifth of --iterations"}
        overrides["eval_interval"] = {"default": None,
                                      "help": "validate every this many steps; default: the checkpoint interval"}
    flags = {}
    for key in key_specs("training"):
        action = _schema_flag(g, "training", key, **overrides.get(key, {}))
        flags[key] = action.option_strings[0]
    g.add_argument("--seed", type=int, default=TrainConfig().seed, help="seed of the initialization and the batch order")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a model already in the run folder (otherwise it is an error)")
    p.set_defaults(flags=flags)


def _add_geometry_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("geometry analysis")
    g.add_argument("--prompts", type=Path, required=True,
                   help="text file, one prompt per line ('#' lines are comments); prompts longer than the "
                        "block size are truncated (noted on stderr and in prompts.csv)")
    g.add_argument("--layers", type=int, nargs="+", default=None,
                   help="hidden states stored as similarity heatmaps: 0 = embedding, i = block i, "
                        "-1 = after the final norm; default: 0, the middle block and -1 (0 3 -1 for 6 layers)")
    _schema_flag(g, "geometry", "exclude_first_token", action="store_true")
    _schema_flag(g, "geometry", "knn_k")
    _schema_flag(g, "geometry", "device", "--analysis-device", dest="analysis_device")


def build_parser() -> argparse.ArgumentParser:
    """The ``tga`` parser; exposed so tests can inspect every subcommand's flags."""
    parser = _Parser(prog="tga", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_TopHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, func: Callable[[argparse.Namespace], int], summary: str, description: str) -> _Parser:
        p = sub.add_parser(name, help=summary, description=description, formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("download", _cmd_download, "write the train/validation/test text splits",
                "Write train.txt, validation.txt and test.txt into --data-dir: WikiText-2 raw (downloaded, or "
                "unpacked from --archive, checked against the original sha256), or your own three text "
                "files (--text-train/--text-validation/--text-test).")
    _add_data_dir(p, "written here (created if needed)")
    p.add_argument("--archive", type=Path, default=None,
                   help="local wikitext-2-raw-v1.zip to unpack instead of downloading")
    p.add_argument("--text-train", type=Path, default=None, help="your own training text (UTF-8) instead of WikiText-2")
    p.add_argument("--text-validation", type=Path, default=None, help="your own validation text (with --text-train)")
    p.add_argument("--text-test", type=Path, default=None, help="your own test text (with --text-train)")

    p = command("train", _cmd_train, "train one model variant",
                "Tokenize the splits once (token files are kept in <data-dir>/tokens/<tokenizer>/ and reused "
                "while the tokenizer and the text are unchanged), then train one variant and write "
                "init.pt, final.pt, train_log.csv, checkpoints/ and tokenizer.json to "
                "<output-dir>/<model-name>/.")
    _add_data_dir(p, "where `tga download` wrote them")
    _add_tokenizer_args(p)
    _add_settings(p, evolve=False)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=Path("models"), help="folder of the model folders")
    g.add_argument("--model-name", default=None,
                   help="name of the model folder; default: <pre|post>ln-<norm>-<swiglu|gelu>-seed<seed>")

    p = command("evaluate", _cmd_evaluate, "perplexity of a trained model on one split",
                "Score every token of a split once (non-overlapping windows) and write token perplexity, "
                "bits per byte and word perplexity as JSON.")
    p.add_argument("--model", type=Path, required=True,
                   help="a model folder (its final.pt is used) or a checkpoint file")
    _add_data_dir(p, "the split is tokenized with the model's tokenizer")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split to score")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer JSON the model was trained with; default: tokenizer.json in the model folder")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON to write; default: <checkpoint stem>_perplexity_<split>.json next to the checkpoint")
    _schema_flag(p, "evaluation", "batch_size")
    _schema_flag(p, "evaluation", "device")

    p = command("analyze", _cmd_analyze, "token geometry of a model at init and after training",
                "Run the prompts through the model at initialization and after training and measure the "
                "token geometry at every depth; write metrics.csv, summary.csv, prompts.csv, similarity.npz, "
                "geometry_layers.png and similarity_heatmaps.png to --output-dir.")
    p.add_argument("--trained-model", type=Path, required=True,
                   help="a model folder (its final.pt is used) or a checkpoint file")
    p.add_argument("--init-model", type=Path, default=None,
                   help="checkpoint at initialization; default: init.pt in the trained model's folder, if present")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer JSON, or a name (tiktoken, bpe, gpt2, char); default: tokenizer.json in the "
                        "model folder")
    p.add_argument("--encoder-json", type=Path, default=None, help="GPT-2's encoder.json, for --tokenizer bpe")
    p.add_argument("--vocab-bpe", type=Path, default=None, help="GPT-2's vocab.bpe, for --tokenizer bpe")
    _add_data_dir(p, "only read for --tokenizer char (its vocabulary comes from train.txt)")
    p.add_argument("--output-dir", type=Path, required=True, help="folder for the geometry files and figures")
    _add_geometry_args(p)

    p = command("evolve", _cmd_evolve, "how the geometry evolves during training",
                "The model-evolution experiment: train one variant with a checkpoint every "
                "--checkpoint-interval steps, then measure the token geometry at initialization and at every "
                "checkpoint (stages init, step<N>). The model goes to <output-dir>/model/, the geometry files "
                "and figures to <output-dir>/.")
    p.add_argument("--output-dir", type=Path, required=True, help="folder for the model, geometry files and figures")
    _add_data_dir(p, "where `tga download` wrote them")
    _add_tokenizer_args(p)
    _add_settings(p, evolve=True)
    _add_geometry_args(p)
    return parser


# --------------------------------------------------------------------------- shared steps


def _note(message: str) -> None:
    print(f"tga: note: {message}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    """Library messages may span lines (the download's list of tried sources)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def _require_splits(data_dir: Path, splits: Sequence[str]) -> None:
    """Name the missing split and the command that makes it, before anything runs."""
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise CLIError(f"--data-dir {data_dir} {what}: run `tga download --data-dir {data_dir}` first, "
                       "or point --data-dir at the folder download wrote")
    for split in splits:
        if not (data_dir / f"{split}.txt").is_file():
            raise CLIError(f"{data_dir / f'{split}.txt'} not found: run `tga download --data-dir {data_dir}` "
                           "first, or point --data-dir at the folder download wrote")


def _check_tokenizer_flags(name: str, encoder_json: Path | None, vocab_bpe: Path | None) -> None:
    given = [flag for flag, v in (("--encoder-json", encoder_json), ("--vocab-bpe", vocab_bpe)) if v is not None]
    if name in ("bpe", "gpt2") and given and len(given) < 2:
        missing = "--vocab-bpe" if given[0] == "--encoder-json" else "--encoder-json"
        raise CLIError(f"{given[0]} is given but {missing} is not: --tokenizer {name} needs both GPT-2 files")
    if name == "bpe" and not given:
        raise CLIError("--tokenizer bpe builds GPT-2 BPE from local files: give --encoder-json and --vocab-bpe "
                       "(GPT-2's encoder.json and vocab.bpe), or use --tokenizer tiktoken")
    if name not in ("bpe", "gpt2") and given:
        raise CLIError(f"{given[0]} is only used by --tokenizer bpe (got --tokenizer {name})")
    for flag, path in (("--encoder-json", encoder_json), ("--vocab-bpe", vocab_bpe)):
        if path is not None:
            check_file(path, flag, "give the GPT-2 BPE file")


def _build_tokenizer(name: str, data_dir: Path, encoder_json: Path | None, vocab_bpe: Path | None) -> Tokenizer:
    _check_tokenizer_flags(name, encoder_json, vocab_bpe)
    try:
        return create_tokenizer(name, data_dir / "train.txt", encoder_json, vocab_bpe)
    except TokenizerError as exc:
        if name != "tiktoken":
            raise
        # The library's hint names the pipeline's config keys; say the flags too.
        raise CLIError(f"--tokenizer tiktoken: {exc} On the command line that is --tokenizer bpe "
                       "--encoder-json FILE --vocab-bpe FILE.") from None


def _tokenizer_identity(description: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in description.items() if k not in _TOKENIZER_ROUTE_KEYS}


def _same_tokenizer(stamp: Path, tokenizer: Tokenizer) -> bool:
    try:
        saved = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and _tokenizer_identity(saved) == _tokenizer_identity(tokenizer.to_dict())


def _token_file_is_current(path: Path, text: Path, tokenizer: Tokenizer) -> bool:
    """The token file encodes this text, unchanged since, with a tokenizer of this vocabulary."""
    try:
        meta = read_token_metadata(path)
        load_token_file(path)  # size against the sidecar: catches truncated files
    except DataError:
        return False
    stat = text.stat()
    return (
        meta["tokenizer"] == tokenizer.name
        and int(meta["vocab_size"]) == tokenizer.vocab_size
        and Path(meta["source"]) == text
        and int(meta["n_bytes"]) == stat.st_size
        and path.stat().st_mtime >= stat.st_mtime
    )


def _token_files(tokenizer: Tokenizer, data_dir: Path, splits: Sequence[str]) -> dict[str, Path]:
    """Each split encoded once into ``<data-dir>/tokens/<tokenizer.name>/<split>.bin``.

    The folder's ``tokenizer.json`` names the tokenizer its files were made with. When
    it is another one (a char vocabulary from other text...), every split file there is
    removed first, so ids of two tokenizers never mix; the stamp is written only after
    the splits, so files without a stamp are never trusted. ``bpe`` and ``tiktoken``
    share the folder ``gpt2``: both give the same (hash-checked) ids.
    """
    tok_dir = data_dir / "tokens" / tokenizer.name
    stamp = tok_dir / "tokenizer.json"
    if not _same_tokenizer(stamp, tokenizer):
        stamp.unlink(missing_ok=True)
        for split in SPLITS:
            for suffix in (".bin", ".json"):
                (tok_dir / f"{split}{suffix}").unlink(missing_ok=True)
    files: dict[str, Path] = {}
    for split in splits:
        text = (data_dir / f"{split}.txt").resolve()
        path = tok_dir / f"{split}.bin"
        if _token_file_is_current(path, text, tokenizer):
            print(f"reusing {path} (tokenizer {tokenizer.name}, unchanged text)")
        else:
            meta = tokenize_to_file(text, tokenizer, path)
            print(f"tokenized {text} -> {path} ({meta['n_tokens']:,} tokens, vocab {meta['vocab_size']:,})")
        files[split] = path
    if not stamp.is_file():
        tokenizer.save(stamp)
    return files


def _settings(args: argparse.Namespace, **derived: Any) -> tuple[ModelConfig, TrainConfig]:
    """The model and training settings the flags give, checked now, before any data
    work, by the same dataclasses (and schema) as the workflow's; a bad one names its
    flag. ``vocab_size`` is set once the tokenizer is known."""
    values = {**vars(args), **derived}
    if values["warmup_steps"] is None:
        values["warmup_steps"] = min(defaults("training")["warmup_steps"], values["max_steps"])
    try:
        model = ModelConfig(vocab_size=1, **{k: values[k] for k in key_specs("model")})
        training = TrainConfig(seed=args.seed, **{k: values[k] for k in key_specs("training")})
    except SettingError as exc:
        flag = {**args.flags, "seed": "--seed"}.get(exc.key, f"--{exc.key.replace('_', '-')}")
        raise CLIError(f"{exc} (set by {flag})") from None
    _check_device(training.device)
    return model, training


def _check_device(name: str, flag: str = "--device") -> None:
    """A missing GPU is bad input too: say so before anything is written."""
    try:
        resolve_device(name)
    except DeviceError as exc:
        raise CLIError(f"{flag}: {exc}") from None


def _load_prompts(path: Path) -> list[str]:
    check_file(path, "--prompts", "give a text file with one prompt per line", utf8=True)
    try:
        return load_prompts(path)
    except GeometryError as exc:
        raise CLIError(f"--prompts: {exc}") from None


@contextmanager
def _no_empty_leftover(folder: Path) -> Iterator[None]:
    """A failed command must not leave behind the empty folders it created (``folder``,
    any missing parents, and empty folders made inside it, such as checkpoints/)."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        inside = sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True) if created else []
        for path in [*inside, *created]:  # deepest first
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


def _prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if (run_dir / "final.pt").exists() or (run_dir / "init.pt").exists():
        if not overwrite:
            raise CLIError(f"{run_dir} already holds a model: pick another --model-name or --output-dir, "
                           "or pass --overwrite to replace it")


def _clear_run_dir(run_dir: Path) -> None:
    """With --overwrite: drop the old run's files, so no stale checkpoint is mixed in."""
    for name in ("final.pt", "init.pt", "train_log.csv", "tokenizer.json"):
        (run_dir / name).unlink(missing_ok=True)
    for old in (run_dir / "checkpoints").glob("step*.pt"):
        old.unlink()


def _train_run(model_cfg: ModelConfig, train_cfg: TrainConfig, tokenizer: Tokenizer, tokens: dict[str, Path],
               run_dir: Path, overwrite: bool) -> dict[str, Any]:
    """Train into ``run_dir``; if it fails before the first checkpoint, leave nothing behind."""
    if overwrite:
        _clear_run_dir(run_dir)
    with _no_empty_leftover(run_dir):
        try:
            tokenizer.save(run_dir / "tokenizer.json")
            return train_model(model_cfg, train_cfg, tokens["train"], tokens["validation"], run_dir,
                               run_name=run_dir.name, show_progress=sys.stderr.isatty())
        except BaseException:
            if not (run_dir / "init.pt").exists():
                (run_dir / "tokenizer.json").unlink(missing_ok=True)
            raise


def _resolve_checkpoint(path: Path, flag: str) -> tuple[Path, Path]:
    """(checkpoint file, run folder) for a model folder or a checkpoint file."""
    if path.is_dir():
        ckpt = path / "final.pt"
        if not ckpt.is_file():
            raise CLIError(f"{flag} {path} has no final.pt: train it first (`tga train`), or give a checkpoint file")
        return ckpt, path
    if not path.exists():
        raise CLIError(f"{flag} {path} does not exist: give a model folder (with final.pt) or a checkpoint file")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, run_dir


def _load(path: Path, flag: str, expected: ModelConfig | None = None) -> tuple[Transformer, dict[str, Any]]:
    try:
        return load_checkpoint(path, map_location="cpu", expected_config=expected)
    except CheckpointError as exc:
        raise CheckpointError(f"{flag}: {exc}") from None


def _resolve_tokenizer(value: str | None, run_dir: Path, data_dir: Path, config: ModelConfig, ckpt: Path,
                       encoder_json: Path | None = None, vocab_bpe: Path | None = None) -> Tokenizer:
    """``--tokenizer``: a JSON file, a tokenizer name, or (None) the run folder's
    tokenizer.json; refused when its vocabulary cannot be the model's."""
    if value is None:
        saved = run_dir / "tokenizer.json"
        if not saved.is_file():
            raise CLIError(f"no tokenizer.json in {run_dir}: pass --tokenizer with the tokenizer JSON the model "
                           "was trained with (for a pipeline model: the tokenizer.json under outputs/data/tokens/)")
        tokenizer, source = load_tokenizer(saved), str(saved)
    elif value.lower() in VALID_TOKENIZERS and not Path(value).is_file():
        if value.lower() == "char":
            _require_splits(data_dir, ["train"])
        tokenizer, source = _build_tokenizer(value.lower(), data_dir, encoder_json, vocab_bpe), f"--tokenizer {value}"
    elif Path(value).is_dir():
        raise CLIError(f"--tokenizer {value!r} is a directory: give the tokenizer JSON file or a tokenizer name")
    elif encoder_json is not None or vocab_bpe is not None:
        tokenizer, source = load_tokenizer(value, encoder_json, vocab_bpe), f"--tokenizer {value}"
    else:
        tokenizer, source = load_tokenizer(value), f"--tokenizer {value}"
    if tokenizer.vocab_size != config.vocab_size:
        raise CLIError(f"{source} gives {tokenizer.vocab_size} ids but {ckpt} was trained with "
                       f"{config.vocab_size}: give (--tokenizer) the tokenizer the model was trained with")
    return tokenizer


def _heatmap_layers(layers: Sequence[int] | None, n_layer: int) -> list[int]:
    if layers is None:
        layers = [0, (n_layer + 1) // 2, -1]
    try:
        return resolve_layer_indices(layers, n_layer + 2)
    except GeometryError as exc:
        raise CLIError(f"--layers: {exc}") from None


def _model_title(name: str, config: ModelConfig) -> str:
    return (f"{name}: {config.norm_position}-LN, {config.norm}, {config.activation}, "
            f"{config.n_layer} layers x {config.n_embd} dims")


@contextmanager
def _truncation_noted(prompts: Path, out_dir: Path) -> Iterator[None]:
    """Around an analysis: instead of the library's warning, one note naming the prompts
    that were cut to the block size, read from the prompts.csv it wrote."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"prompts .* were truncated")
        yield
    table = pd.read_csv(out_dir / "prompts.csv")
    cut = table[table["truncated"].astype(bool)]
    if len(cut):
        _note(f"prompt(s) {', '.join(str(i) for i in cut['prompt'])} of {prompts} are longer than the block "
              f"size and were truncated to their first {int(cut['n_tokens_input'].max())} tokens "
              f"(see {out_dir / 'prompts.csv'})")


# --------------------------------------------------------------------------- commands


def _cmd_download(args: argparse.Namespace) -> int:
    texts = {"--text-train": args.text_train, "--text-validation": args.text_validation,
             "--text-test": args.text_test}
    given = {flag: p for flag, p in texts.items() if p is not None}
    if given:
        if args.archive is not None:
            raise CLIError("--archive and --text-train/--text-validation/--text-test are alternatives: give one")
        missing = [flag for flag in texts if flag not in given]
        if missing:
            raise CLIError(f"{', '.join(missing)} missing: your own corpus needs --text-train, --text-validation "
                           "and --text-test")
        for flag, p in given.items():
            check_file(p, flag, "give a UTF-8 text file")
        data = {"source": "text", "train": args.text_train, "validation": args.text_validation,
                "test": args.text_test}
    else:
        if args.archive is not None:
            check_file(args.archive, "--archive", "give wikitext-2-raw-v1.zip")
        data = {"source": "wikitext2", "archive": args.archive}
    with _no_empty_leftover(args.data_dir):
        prepare_corpus(data, args.data_dir)
    for split in SPLITS:
        path = args.data_dir / f"{split}.txt"
        print(f"{path}: {path.stat().st_size:,} bytes")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    model_cfg, train_cfg = _settings(args)
    name = args.model_name or (f"{model_cfg.norm_position}ln-{model_cfg.norm}-{model_cfg.activation}"
                               f"-seed{train_cfg.seed}")
    run_dir = args.output_dir / name
    _prepare_run_dir(run_dir, args.overwrite)
    _require_splits(args.data_dir, SPLITS)
    tokenizer = _build_tokenizer(args.tokenizer, args.data_dir, args.encoder_json, args.vocab_bpe)
    tokens = _token_files(tokenizer, args.data_dir, SPLITS)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    summary = _train_run(model_cfg, train_cfg, tokenizer, tokens, run_dir, args.overwrite)
    print(f"trained {name}: {summary['step']} steps, validation loss {summary['final_val_loss']:.4f} "
          f"(ppl {summary['final_val_ppl']:.2f}) -> {run_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _check_device(args.device)
    ckpt, run_dir = _resolve_checkpoint(args.model, "--model")
    model, extra = _load(ckpt, "--model")
    tokenizer = _resolve_tokenizer(args.tokenizer, run_dir, args.data_dir, model.config, ckpt)
    del model
    _require_splits(args.data_dir, [args.split])
    tokens = _token_files(tokenizer, args.data_dir, [args.split])[args.split]
    out = args.output or ckpt.with_name(f"{ckpt.stem}_perplexity_{args.split}.json")
    if out.is_dir():
        raise CLIError(f"--output {str(out)!r} is a directory: give the path of the JSON file to write")
    labels = {"variant": run_dir.name, "seed": extra.get("seed"), "split": args.split, "checkpoint": str(ckpt)}
    result = evaluate_checkpoint(ckpt, tokens, out, labels=labels, batch_size=args.batch_size,
                                 device=args.device)
    print(f"{ckpt} on {args.split}: token ppl {result['token_ppl']:.3f}, {result['bits_per_byte']:.4f} bits/byte, "
          f"word ppl {result['word_ppl']:.2f} ({result['n_tokens_scored']:,} tokens) -> {out}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    _check_device(args.analysis_device, "--analysis-device")
    prompts = _load_prompts(args.prompts)
    ckpt, run_dir = _resolve_checkpoint(args.trained_model, "--trained-model")
    model, _ = _load(ckpt, "--trained-model")
    config = model.config
    del model
    stages: dict[str, Path] = {}
    init = args.init_model
    if init is None and (run_dir / "init.pt").is_file():
        init = run_dir / "init.pt"
    if init is not None:
        check_file(init, "--init-model", "give the run's init.pt")
        _load(init, "--init-model", expected=config)  # another architecture is an error
        stages["init"] = init
    else:
        _note(f"no init.pt in {run_dir} and no --init-model: analysing the trained model only")
    stages["trained"] = ckpt
    layers = _heatmap_layers(args.layers, config.n_layer)
    tokenizer = _resolve_tokenizer(args.tokenizer, run_dir, args.data_dir, config, ckpt, args.encoder_json,
                                   args.vocab_bpe)
    with _truncation_noted(args.prompts, args.output_dir):
        analyze_checkpoints(stages, args.prompts, tokenizer, args.output_dir, heatmap_layers=layers,
                            exclude_first_token=args.exclude_first_token, knn_k=args.knn_k,
                            device=resolve_device(args.analysis_device))
    _figures(args.output_dir, _model_title(run_dir.name, config),
             f"{len(prompts)} prompts from {args.prompts}; checkpoint {ckpt}")
    print(f"geometry of {', '.join(stages)} -> {args.output_dir}")
    return 0


def _figures(out_dir: Path, title: str, data_label: str) -> None:
    from tga.plots import plot_geometry_layers, plot_similarity_heatmaps

    plot_geometry_layers(pd.read_csv(out_dir / "summary.csv"), out_dir / "geometry_layers.png", title, data_label)
    plot_similarity_heatmaps(out_dir / "similarity.npz", out_dir / "similarity_heatmaps.png", title, data_label)


def _cmd_evolve(args: argparse.Namespace) -> int:
    from tga.evolution import analyze_evolution, evolution_stages, evolution_steps

    _check_device(args.analysis_device, "--analysis-device")
    prompts = _load_prompts(args.prompts)
    interval = max(1, args.max_steps // 5) if args.checkpoint_interval is None else args.checkpoint_interval
    model_cfg, train_cfg = _settings(args, checkpoint_interval=interval,
                                     eval_interval=max(1, interval) if args.eval_interval is None else args.eval_interval)
    layers = _heatmap_layers(args.layers, model_cfg.n_layer)
    run_dir = args.output_dir / "model"
    _prepare_run_dir(run_dir, args.overwrite)
    _require_splits(args.data_dir, SPLITS)
    tokenizer = _build_tokenizer(args.tokenizer, args.data_dir, args.encoder_json, args.vocab_bpe)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    # The prompts must survive the analysis (not empty, >= 3 tokens ...) before minutes of training.
    ids, _ = encode_prompts(prompts, tokenizer, model_cfg.block_size, truncate=True)
    analyze_model(Transformer(model_cfg), ids, "check", 0, layers, exclude_first_token=args.exclude_first_token,
                  knn_k=args.knn_k)
    tokens = _token_files(tokenizer, args.data_dir, SPLITS)
    _train_run(model_cfg, train_cfg, tokenizer, tokens, run_dir, args.overwrite)

    stages = evolution_stages(dataclasses.asdict(train_cfg), run_dir)
    geometry = {"heatmap_layers": layers, "exclude_first_token": args.exclude_first_token, "knn_k": args.knn_k,
                "device": args.analysis_device}
    with _truncation_noted(args.prompts, args.output_dir):
        analyze_evolution(stages, args.prompts, run_dir / "tokenizer.json", args.output_dir, geometry)
    title = _model_title(args.output_dir.name, model_cfg)
    data_label = (f"trained {train_cfg.max_steps} steps (lr {train_cfg.learning_rate:g}) on {args.data_dir / 'train.txt'}; "
                  f"{len(prompts)} prompts from {args.prompts}")
    made = _evolution_figures(args.output_dir, run_dir, title, data_label,
                              evolution_steps(dataclasses.asdict(train_cfg)))
    print(f"geometry of {len(stages)} stages ({', '.join(stages)}) and {', '.join(made)} -> {args.output_dir}")
    return 0


def _evolution_figures(out_dir: Path, run_dir: Path, title: str, data_label: str, steps: list[int]) -> list[str]:
    """The per-model figures for init vs the last checkpoint, the training curves, and each
    evolution figure tga.plots offers (looked up by name: they are newer than this CLI)."""
    import tga.plots as plots

    summary = pd.read_csv(out_dir / "summary.csv")
    log = pd.read_csv(run_dir / "train_log.csv")
    final = f"step{steps[-1]}"
    # plot_geometry_layers draws the stages 'init' and 'trained': show the last checkpoint as
    # 'trained' (its legend still gives the step); only this copy is relabelled.
    last = summary[summary["stage"].isin(["init", final])].replace({"stage": {final: "trained"}})
    plots.plot_geometry_layers(last, out_dir / "geometry_layers.png", title, data_label)
    plots.plot_training_curves(log, out_dir / "training_curves.png", title, data_label)
    made = ["geometry_layers.png", "training_curves.png"]
    optional: dict[str, tuple[str, Callable[[Callable[..., Any], Path], Any]]] = {
        "plot_metrics_by_step": ("metrics_by_step.png",
                                 lambda f, out: f(summary, out, title, data_label, train_log=log)),
        "plot_heatmaps_before_after": ("heatmaps_before_after.png",
                                       lambda f, out: f(out_dir / "similarity.npz", out, title, data_label)),
        "plot_similarity_change": ("similarity_change.png",
                                   lambda f, out: f(pd.read_csv(out_dir / "metrics.csv"), out, title, data_label)),
        "plot_loss_by_step": ("training_loss.png",
                              lambda f, out: f(log, out, title, data_label, analysed_steps=steps)),
        "plot_evolution": ("evolution.png", lambda f, out: f(summary, out, title, data_label)),
    }
    for name, (filename, call) in optional.items():
        func = getattr(plots, name, None)
        if func is None:
            continue
        if name == "plot_evolution":
            try:
                inspect.signature(func).bind(summary, out_dir / filename, title, data_label)
            except TypeError:
                _note(f"tga.plots.{name} does not take (summary, out_path, title, data_label); {filename} skipped")
                continue
        call(func, out_dir / filename)
        made.append(filename)
    return made


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (0 ok, 2 bad input, 1 system trouble)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"tga: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return int(args.func(args))
    except _LIBRARY_ERRORS as exc:
        print(f"tga: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tga: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tga: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
