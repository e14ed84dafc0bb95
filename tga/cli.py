"""The ``tga`` console script: the seed study's commands, a front end over the library.

Its one concern is the command line. Flags become the arguments of the library
functions the workflow's scripts call (model and training flags, defaults and help come
from tga/config.schema.yaml); bad input becomes one ``tga: error: ...`` line naming the
flag, exit code 2, before anything is written; what was made is printed. Only a run
that fails mid-training (e.g. by diverging) keeps what it wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from tga import __version__
from tga.atomic import no_empty_folders_left
from tga.data import SPLITS, DataError, cached_token_files, prepare_corpus
from tga.device import DeviceError, resolve_device
from tga.evaluate import evaluate_checkpoint
from tga.export import ExportError, export_checkpoint, hf_architecture
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
from tga.settings import ConfigError, check_file, check_gpt2_files, coerce_config_types
from tga.tokenizers import VALID_TOKENIZERS, HFTokenizer, Tokenizer, TokenizerError, tokenizer_from
from tga.schema import ModelConfig, SettingError, TrainConfig, defaults, key_specs, unknown_names_hint
from tga.train import TrainingError, clear_run, run_checkpoint, train_from_settings

__all__ = ["CLIError", "build_parser", "main"]

_DESCRIPTION = """\
Train small LLaMA-style transformer variants (Pre-LN/Post-LN, RMSNorm/LayerNorm,
SwiGLU/GELU) and measure the geometry of their token representations.

  download  -> <data-dir>/{train,validation,test}.txt
  train     -> <output-dir>/<model-name>/ (init.pt, final.pt, train_log.csv, checkpoints/, tokenizer.json)
  evaluate  -> perplexity JSON (token ppl, bits/byte, word ppl)
  analyze   -> geometry CSV/NPZ files and figures, init vs trained
  evolve    -> train, then the geometry at init and at every checkpoint
  export    -> a Hugging Face transformers folder (config.json, model.safetensors, tokenizer, tga.json)"""
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


_LIBRARY_ERRORS = (CLIError, DataError, TokenizerError, GeometryError, CheckpointError, SettingError, ConfigError,
                   TrainingError, DeviceError, ResourceError, ExportError)


# --------------------------------------------------------------------------- parser


def _add_data_dir(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data-dir", type=Path, default=Path("data"), metavar="DIR",
                   help=f"folder of train.txt, validation.txt and test.txt; {what}")


def _add_tokenizer_args(p: argparse.ArgumentParser, **tokenizer: Any) -> None:
    """--tokenizer (by default a name, one of train's), the GPT-2 files of bpe and the
    hub id or folder of hf (the config's tokenizer.path and tokenizer.revision)."""
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", **(tokenizer or {
        "choices": ("tiktoken", "bpe", "char", "hf"), "default": "tiktoken",
        "help": "tiktoken: GPT-2 BPE through tiktoken (downloads once, or reads TIKTOKEN_CACHE_DIR); "
                "bpe: the same GPT-2 BPE built from local --encoder-json/--vocab-bpe files; "
                "char: one id per character of the training split; "
                "hf: a Hugging Face tokenizer (--tokenizer-path; needs the hf extra)"}))
    g.add_argument("--encoder-json", type=Path, default=None, help="GPT-2's encoder.json, for --tokenizer bpe")
    g.add_argument("--vocab-bpe", type=Path, default=None, help="GPT-2's vocab.bpe, for --tokenizer bpe")
    g.add_argument("--tokenizer-path", default=None,
                   help="for --tokenizer hf: a Hugging Face hub id or a local folder written by save_pretrained")
    g.add_argument("--tokenizer-revision", default=None,
                   help="for --tokenizer hf and a hub id: the branch, tag or commit (default: main)")


_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"integer": int, "number": float, "string": str}


def _schema_flag(g: Any, section: str, key: str, flag: str | None = None, **overrides: Any) -> argparse.Action:
    """One flag for a config key, named as the key (``n_layer`` is ``--n-layer``; a key
    two sections share is prefixed with its section: ``--geometry-device``), with the
    type, choices, default and help the schema (tga/config.schema.yaml) gives it;
    booleans get --KEY/--no-KEY."""
    spec = key_specs(section)[key]
    types = [spec["type"]] if isinstance(spec.get("type"), str) else list(spec.get("type", []))
    kwargs: dict[str, Any] = {"dest": key, "default": spec["default"],
                              "help": spec.get("description", key.replace("_", " ")).replace("%", "%%")}
    if "enum" in spec:
        kwargs["choices"] = spec["enum"]
        if "boolean" in types:  # compile: auto, true or false; the word "true" is the boolean
            kwargs["type"] = lambda text: coerce_config_types(text, spec)
            kwargs["metavar"] = "{" + ",".join(str(c).lower() for c in spec["enum"]) + "}"
    elif "boolean" in types:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif "array" in types:  # heatmap_layers: --heatmap-layers 0 3 -1
        kwargs.update(type=_FLAG_TYPES[spec["items"]["type"]], nargs="+")
    else:
        kwargs["type"] = next(_FLAG_TYPES[t] for t in types if t in _FLAG_TYPES)
    kwargs.update(overrides)
    return g.add_argument(flag or f"--{key.replace('_', '-')}", **kwargs)


class _Renamed(argparse.Action):
    """A flag's former name, hidden from the help: using it is one error naming the
    flag that replaced it (each setting has one name, the config key's)."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="*", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        raise _UsageError(f"{parser.prog}: {option_string} is now {self.new}, named as its config key "
                          f"(see `{parser.prog} --help`)")


def _add_settings(p: argparse.ArgumentParser, evolve: bool) -> None:
    """Every model and training key of the workflow as a flag, plus the seed study's
    shorthands --pre-ln/--post-ln and --use-swiglu (they set --norm-position and
    --activation). ``evolve`` derives the intervals from --max-steps."""
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
        overrides.update(
            checkpoint_interval={"default": None,
                                 "help": "with --checkpoint-spacing linear, keep a checkpoint every this many steps; "
                                         "default: a fifth of --max-steps"},
            eval_interval={"default": None, "help": "validate every this many steps; default: the checkpoint interval"})
    flags = {key: _schema_flag(g, "training", key, **overrides.get(key, {})).option_strings[0]
             for key in key_specs("training")}
    if evolve:
        g.add_argument("--iterations", action=_Renamed, new="--max-steps")
    g.add_argument("--seed", type=int, default=TrainConfig().seed, help="seed of the initialization and the batch order")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a model already in the run folder (otherwise it is an error)")
    p.set_defaults(flags=flags)


def _add_geometry_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("geometry analysis")
    g.add_argument("--prompts", type=Path, required=True,
                   help="text file, one prompt per line ('#' lines are comments); prompts longer than the "
                        "block size are truncated (noted on stderr and in prompts.csv)")
    _schema_flag(g, "geometry", "heatmap_layers", default=None, metavar="LAYER",
                 help="hidden states stored as similarity heatmaps: 0 = embedding, i = block i, -1 = after the "
                      "final norm; default: 0, the middle block and -1 (0 3 -1 for 6 layers)")
    _schema_flag(g, "geometry", "exclude_first_token", nargs="?", const=True)  # a bare flag means true
    _schema_flag(g, "geometry", "knn_k")
    _schema_flag(g, "geometry", "device", "--geometry-device", dest="geometry_device")
    g.add_argument("--layers", action=_Renamed, new="--heatmap-layers")
    g.add_argument("--analysis-device", action=_Renamed, new="--geometry-device")


def build_parser() -> argparse.ArgumentParser:
    """The ``tga`` parser; exposed so tests can inspect every subcommand's flags."""
    parser = _Parser(prog="tga", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_TopHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the installed version of tga and exit")
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
    _add_tokenizer_args(p, default=None, help="tokenizer JSON, or a name (tiktoken, bpe, gpt2, char, hf); "
                                              "default: tokenizer.json in the model folder")
    _add_data_dir(p, "only read for --tokenizer char (its vocabulary comes from train.txt)")
    p.add_argument("--output-dir", type=Path, required=True, help="folder for the geometry files and figures")
    _add_geometry_args(p)

    p = command("evolve", _cmd_evolve, "how the geometry evolves during training",
                "The model-evolution experiment: train one variant with checkpoints at steps 1, 2, 4, ... "
                "(--checkpoint-spacing log) or every --checkpoint-interval steps (linear), then measure the token geometry at initialization and at every "
                "checkpoint (stages init, step<N>). The model goes to <output-dir>/model/, the geometry files "
                "and figures to <output-dir>/.")
    p.add_argument("--output-dir", type=Path, required=True, help="folder for the model, geometry files and figures")
    _add_data_dir(p, "where `tga download` wrote them")
    _add_tokenizer_args(p)
    _add_settings(p, evolve=True)
    _add_geometry_args(p)

    p = command("export", _cmd_export, "save a trained model as a Hugging Face transformers folder",
                "Write OUT_DIR with config.json, model.safetensors, the tokenizer's files and tga.json (tga's "
                "version, the model's settings, the checkpoint's sha256), so that transformers' "
                "AutoModelForCausalLM and AutoTokenizer, TransformerLens and nnsight open it. Pre-LN variants "
                "map onto LlamaForCausalLM (rmsnorm, swiglu, rope), ArceeForCausalLM (rmsnorm, gelu or relu, "
                "rope), StableLmForCausalLM (layernorm, swiglu, rope, bias false), GPTNeoXForCausalLM "
                "(layernorm, gelu or relu, rope) or GPT2LMHeadModel (layernorm, gelu or relu, learned "
                "positions); any other variant (Post-LN, unigram_bias, ...) is an error that says why "
                "(docs/export.md). The folder is loaded back and checked against tga's logits before it is "
                "written.")
    p.add_argument("model", type=Path, metavar="RUN_DIR_or_CHECKPOINT",
                   help="a model folder (its final.pt is exported) or a checkpoint file")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write (must not exist, see --overwrite)")
    _add_tokenizer_args(p, default=None, help="tokenizer JSON the model was trained with, or a name (tiktoken, "
                                              "bpe, gpt2, char); default: tokenizer.json in the model folder")
    _add_data_dir(p, "only read for --tokenizer char (its vocabulary comes from train.txt)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR when it exists (otherwise an error)")
    return parser


# --------------------------------------------------------------------------- shared steps


def _note(message: str) -> None:
    print(f"tga: note: {message}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    """Library messages may span lines (the download's list of tried sources)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


@contextmanager
def _flag(flag: str) -> Iterator[None]:
    """A library error about the value of ``flag`` names the flag."""
    try:
        yield
    except (CheckpointError, DeviceError, GeometryError) as exc:
        raise CLIError(f"{flag}: {exc}") from None


def _require_splits(data_dir: Path, splits: Sequence[str]) -> None:
    """Name the missing split and the command that makes it, before anything runs."""
    hint = f"run `tga download --data-dir {data_dir}` first, or point --data-dir at the folder download wrote"
    if data_dir.is_file():
        raise CLIError(f"--data-dir {data_dir} is a file, not a folder: {hint}")
    for split in splits:
        check_file(data_dir / f"{split}.txt", "--data-dir", hint)


def _tokenizer(args: argparse.Namespace, run_dir: Path | None = None) -> Tokenizer:
    """``--tokenizer``: a name (built from the GPT-2 file flags, <data-dir>/train.txt for
    char, --tokenizer-path for hf), a tokenizer JSON, or unset: the run folder's tokenizer.json."""
    value = args.tokenizer
    encoder_json, vocab_bpe = getattr(args, "encoder_json", None), getattr(args, "vocab_bpe", None)
    if value is None:
        value = str(run_dir / "tokenizer.json")
        if not Path(value).is_file():
            raise CLIError(f"no tokenizer.json in {run_dir}: pass --tokenizer with the tokenizer JSON the model "
                           "was trained with (for a pipeline model: the tokenizer.json under outputs/data/tokens/)")
    name = value.lower()
    hf_path, hf_revision = getattr(args, "tokenizer_path", None), getattr(args, "tokenizer_revision", None)
    if name == "hf" and not Path(value).is_file():
        if not hf_path:
            raise CLIError("--tokenizer hf needs --tokenizer-path: a Hugging Face hub id or a local folder "
                           "written by save_pretrained")
        return HFTokenizer.load(hf_path, hf_revision, where="--tokenizer-path")
    if hf_path is not None or hf_revision is not None:
        flag = "--tokenizer-path" if hf_path is not None else "--tokenizer-revision"
        raise CLIError(f"{flag} is read by --tokenizer hf only (got --tokenizer {value}): remove it, or give "
                       "--tokenizer hf")
    if name in VALID_TOKENIZERS and not Path(value).is_file():
        if name == "bpe" and not (encoder_json or vocab_bpe):
            raise CLIError("--tokenizer bpe builds GPT-2 BPE from local files: give --encoder-json and --vocab-bpe "
                           "(GPT-2's encoder.json and vocab.bpe), or use --tokenizer tiktoken")
        check_gpt2_files({"--encoder-json": encoder_json, "--vocab-bpe": vocab_bpe}, name in ("bpe", "gpt2"),
                         f"--tokenizer bpe (got --tokenizer {name})", "give the GPT-2 BPE file")
        if name == "char":
            _require_splits(args.data_dir, ["train"])
    try:
        return tokenizer_from(value, args.data_dir / "train.txt", encoder_json, vocab_bpe)
    except TokenizerError as exc:
        if name != "tiktoken":
            raise
        # The library's hint names the pipeline's config keys; say the flags too.
        raise CLIError(f"--tokenizer tiktoken: {exc} On the command line that is --tokenizer bpe "
                       "--encoder-json FILE --vocab-bpe FILE.") from None


def _token_files(tokenizer: Tokenizer, data_dir: Path, splits: Sequence[str]) -> dict[str, Path]:
    """Each split encoded once into <data-dir>/tokens/<tokenizer>/ and reused while current
    (``bpe`` and ``tiktoken`` share ``gpt2``: both give the same, hash-checked, ids)."""
    texts = {split: data_dir / f"{split}.txt" for split in splits}
    return cached_token_files(tokenizer, texts, data_dir / "tokens" / tokenizer.name, report=print)


def _settings(args: argparse.Namespace, **derived: Any) -> dict[str, dict[str, Any]]:
    """The model and training settings the flags give, shaped as the workflow resolves a
    variant (``{"model": ..., "training": ...}``) and checked now, before any data work,
    by the same schema and dataclasses; a bad one names its flag."""
    values = {**vars(args), **derived}
    if values["warmup_steps"] is None:
        values["warmup_steps"] = min(defaults("training")["warmup_steps"], values["max_steps"])
    settings = {section: {key: values[key] for key in key_specs(section)} for section in ("model", "training")}
    try:
        ModelConfig(vocab_size=1, **settings["model"])
        TrainConfig(seed=args.seed, **settings["training"])
    except SettingError as exc:
        flag = {**args.flags, "seed": "--seed"}.get(exc.key, f"--{exc.key.replace('_', '-')}")
        raise CLIError(f"{exc} (set by {flag})") from None
    with _flag("--device"):
        resolve_device(settings["training"]["device"])  # a missing GPU is bad input too
    return settings


def _load_prompts(path: Path) -> list[str]:
    check_file(path, "--prompts", "give a text file with one prompt per line", utf8=True)
    with _flag("--prompts"):
        return load_prompts(path)


def _run_dir(run_dir: Path, overwrite: bool) -> Path:
    if ((run_dir / "final.pt").exists() or (run_dir / "init.pt").exists()) and not overwrite:
        raise CLIError(f"{run_dir} already holds a model: pick another --model-name or --output-dir, "
                       "or pass --overwrite to replace it")
    return run_dir


def _train(settings: dict[str, dict[str, Any]], args: argparse.Namespace, tokenizer: Tokenizer,
           tokens: dict[str, Path], run_dir: Path) -> dict[str, Any]:
    """Train into ``run_dir`` as the workflow does, with the tokenizer beside the model.
    --overwrite first clears the old run, so no stale checkpoint is mixed in; a run
    that fails before writing a model leaves nothing behind."""
    if args.overwrite:
        clear_run(run_dir)
        (run_dir / "tokenizer.json").unlink(missing_ok=True)
    with no_empty_folders_left(run_dir):
        try:
            return train_from_settings(settings, args.seed, 0, tokens["train"], tokens["validation"], run_dir,
                                       run_name=run_dir.name)
        finally:
            if (run_dir / "init.pt").exists():
                tokenizer.save(run_dir / "tokenizer.json")


def _model(args: argparse.Namespace, path: Path, flag: str) -> tuple[Path, Path, ModelConfig, dict, Tokenizer]:
    """(checkpoint, run folder, config, metadata, tokenizer) of a model folder or checkpoint
    file; a tokenizer whose vocabulary cannot be the model's is refused."""
    with _flag(flag):
        ckpt, run_dir = run_checkpoint(path)
        model, extra = load_checkpoint(ckpt, map_location="cpu")
    config, tokenizer = model.config, _tokenizer(args, run_dir)
    if tokenizer.vocab_size != config.vocab_size:
        source = f"--tokenizer {args.tokenizer}" if args.tokenizer else run_dir / "tokenizer.json"
        raise CLIError(f"{source} gives {tokenizer.vocab_size} ids but {ckpt} was trained with "
                       f"{config.vocab_size}: give (--tokenizer) the tokenizer the model was trained with")
    return ckpt, run_dir, config, extra, tokenizer


def _heatmap_layers(layers: Sequence[int] | None, n_layer: int) -> list[int]:
    with _flag("--heatmap-layers"):
        return resolve_layer_indices([0, (n_layer + 1) // 2, -1] if layers is None else layers, n_layer + 2)


def _model_title(name: str, model: Mapping[str, Any]) -> str:
    return (f"{name}: {model['norm_position']}-LN, {model['norm']}, {model['activation']}, "
            f"{model['n_layer']} layers x {model['n_embd']} dims")


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
    texts = {"--text-train": args.text_train, "--text-validation": args.text_validation, "--text-test": args.text_test}
    data: dict[str, Any] = {"source": "wikitext2", "archive": args.archive}
    if any(texts.values()):
        if args.archive is not None:
            raise CLIError("--archive and --text-train/--text-validation/--text-test are alternatives: give one")
        missing = [flag for flag, path in texts.items() if path is None]
        if missing:
            raise CLIError(f"{', '.join(missing)} missing: your own corpus needs --text-train, --text-validation "
                           "and --text-test")
        for flag, path in texts.items():
            check_file(path, flag, "give a UTF-8 text file")
        data = {"source": "text", **{flag[len("--text-"):]: path for flag, path in texts.items()}}
    elif args.archive is not None:
        check_file(args.archive, "--archive", "give wikitext-2-raw-v1.zip")
    with no_empty_folders_left(args.data_dir):
        prepare_corpus(data, args.data_dir)
    for split in SPLITS:
        path = args.data_dir / f"{split}.txt"
        print(f"{path}: {path.stat().st_size:,} bytes")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    settings = _settings(args)
    model = settings["model"]
    name = args.model_name or f"{model['norm_position']}ln-{model['norm']}-{model['activation']}-seed{args.seed}"
    run_dir = _run_dir(args.output_dir / name, args.overwrite)
    _require_splits(args.data_dir, SPLITS)
    tokenizer = _tokenizer(args)
    summary = _train(settings, args, tokenizer, _token_files(tokenizer, args.data_dir, SPLITS), run_dir)
    print(f"trained {name}: {summary['step']} steps, validation loss {summary['final_val_loss']:.4f} "
          f"(ppl {summary['final_val_ppl']:.2f}) -> {run_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    with _flag("--device"):
        resolve_device(args.device)
    ckpt, run_dir, config, extra, tokenizer = _model(args, args.model, "--model")
    _require_splits(args.data_dir, [args.split])
    out = args.output or ckpt.with_name(f"{ckpt.stem}_perplexity_{args.split}.json")
    if out.is_dir():
        raise CLIError(f"--output {str(out)!r} is a directory: give the path of the JSON file to write")
    tokens = _token_files(tokenizer, args.data_dir, [args.split])[args.split]
    labels = {"variant": run_dir.name, "seed": extra.get("seed"), "split": args.split, "checkpoint": str(ckpt)}
    result = evaluate_checkpoint(ckpt, tokens, out, labels=labels, batch_size=args.batch_size, device=args.device)
    print(f"{ckpt} on {args.split}: token ppl {result['token_ppl']:.3f}, {result['bits_per_byte']:.4f} bits/byte, "
          f"word ppl {result['word_ppl']:.2f} ({result['n_tokens_scored']:,} tokens) -> {out}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from tga.plots import plot_geometry_layers, plot_similarity_heatmaps

    with _flag("--geometry-device"):
        device = resolve_device(args.geometry_device)
    prompts = _load_prompts(args.prompts)
    ckpt, run_dir, config, _, tokenizer = _model(args, args.trained_model, "--trained-model")
    stages: dict[str, Path] = {}
    init = args.init_model
    if init is None and (run_dir / "init.pt").is_file():
        init = run_dir / "init.pt"
    if init is not None:
        check_file(init, "--init-model", "give the run's init.pt")
        with _flag("--init-model"):  # another architecture is an error
            load_checkpoint(init, map_location="cpu", expected_config=config)
        stages["init"] = init
    else:
        _note(f"no init.pt in {run_dir} and no --init-model: analysing the trained model only")
    stages["trained"] = ckpt
    layers = _heatmap_layers(args.heatmap_layers, config.n_layer)
    out = args.output_dir
    with _truncation_noted(args.prompts, out):
        analyze_checkpoints(stages, args.prompts, tokenizer, out, heatmap_layers=layers,
                            exclude_first_token=args.exclude_first_token, knn_k=args.knn_k, device=device)
    title = _model_title(run_dir.name, dataclasses.asdict(config))
    data_label = f"{len(prompts)} prompts from {args.prompts}; checkpoint {ckpt}"
    plot_geometry_layers(pd.read_csv(out / "summary.csv"), out / "geometry_layers.png", title, data_label)
    plot_similarity_heatmaps(out / "similarity.npz", out / "similarity_heatmaps.png", title, data_label)
    print(f"geometry of {', '.join(stages)} -> {out}")
    return 0


def _cmd_evolve(args: argparse.Namespace) -> int:
    from tga.evolution import analyze_evolution, evolution_stages

    with _flag("--geometry-device"):
        resolve_device(args.geometry_device)
    prompts = _load_prompts(args.prompts)
    interval = max(1, args.max_steps // 5) if args.checkpoint_interval is None else args.checkpoint_interval
    settings = _settings(args, checkpoint_interval=interval,
                         eval_interval=max(1, interval) if args.eval_interval is None else args.eval_interval)
    model, training = settings["model"], settings["training"]
    layers = _heatmap_layers(args.heatmap_layers, model["n_layer"])
    run_dir = _run_dir(args.output_dir / "model", args.overwrite)
    _require_splits(args.data_dir, SPLITS)
    tokenizer = _tokenizer(args)
    # The prompts must survive the analysis (not empty, >= 3 tokens ...) before minutes of training.
    ids, _ = encode_prompts(prompts, tokenizer, model["block_size"], truncate=True)
    analyze_model(Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **model)), ids, "check", 0, layers,
                  exclude_first_token=args.exclude_first_token, knn_k=args.knn_k)
    _train(settings, args, tokenizer, _token_files(tokenizer, args.data_dir, SPLITS), run_dir)

    stages = evolution_stages(training, run_dir)
    geometry = {"heatmap_layers": layers, "exclude_first_token": args.exclude_first_token, "knn_k": args.knn_k,
                "device": args.geometry_device}
    with _truncation_noted(args.prompts, args.output_dir):
        analyze_evolution(stages, args.prompts, run_dir / "tokenizer.json", args.output_dir, geometry)
    title = _model_title(args.output_dir.name, model)
    data_label = (f"trained {training['max_steps']} steps (lr {training['learning_rate']:g}) on "
                  f"{args.data_dir / 'train.txt'}; {len(prompts)} prompts from {args.prompts}")
    made = _evolution_figures(args.output_dir, run_dir, title, data_label, training)
    print(f"geometry of {len(stages)} stages ({', '.join(stages)}) and {', '.join(made)} -> {args.output_dir}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    out = args.out_dir
    if out.exists() and not out.is_dir():
        raise CLIError(f"OUT_DIR {out} is a file: give the path of a folder to create")
    if out.exists() and not args.overwrite:
        raise CLIError(f"OUT_DIR {out} already exists: choose another folder, or pass --overwrite to replace it")
    with _flag("RUN_DIR_or_CHECKPOINT"):
        ckpt, _ = run_checkpoint(args.model)
        config = load_checkpoint(ckpt, map_location="cpu")[0].config
    try:  # a variant no transformers class computes fails before the tokenizer is looked for
        architecture = hf_architecture(config)
    except ExportError as exc:
        raise CLIError(f"{ckpt}: {exc}") from None
    ckpt, _, _, _, tokenizer = _model(args, args.model, "RUN_DIR_or_CHECKPOINT")
    info = export_checkpoint(ckpt, out, tokenizer, overwrite=args.overwrite)
    check = info["logit_check"]
    if info["tokenizer_files"].startswith("none"):
        _note(f"{out} holds no tokenizer files ({info['tokenizer_files'].removeprefix('none: ')})")
    print(f"exported {ckpt} as {architecture} -> {out} (float32 logits within "
          f"{check['float32_max_abs_difference']:.1e} of tga's on {check['tokens']} tokens; open with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _evolution_figures(out_dir: Path, run_dir: Path, title: str, label: str, training: dict[str, Any]) -> list[str]:
    """The per-model figures for init vs the last checkpoint, the training curves (the
    learning rate from ``training``'s schedule), and the workflow's evolution figures;
    returns their file names."""
    from tga import plots
    from tga.evolution import evolution_steps

    steps = evolution_steps(training)
    summary, log = pd.read_csv(out_dir / "summary.csv"), pd.read_csv(run_dir / "train_log.csv")
    final = f"step{steps[-1]}"
    # plot_geometry_layers draws the stages 'init' and 'trained': show the last checkpoint as
    # 'trained' (its legend still gives the step); only this copy is relabelled.
    last = summary[summary["stage"].isin(["init", final])].replace({"stage": {final: "trained"}})
    plots.plot_geometry_layers(last, out_dir / "geometry_layers.png", title, label)
    plots.plot_training_curves(log, out_dir / "training_curves.png", title, label, training=training)
    plots.plot_metrics_by_step(summary, out_dir / "metrics_by_step.png", title, label, train_log=log)
    plots.plot_heatmaps_before_after(out_dir / "similarity.npz", out_dir / "heatmaps_before_after.png", title, label)
    plots.plot_similarity_change(pd.read_csv(out_dir / "metrics.csv"), out_dir / "similarity_change.png", title, label)
    return ["geometry_layers.png", "training_curves.png", "metrics_by_step.png", "heatmaps_before_after.png",
            "similarity_change.png"]


# --------------------------------------------------------------------------- entry point


def _unrecognized(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """argparse's "unrecognized arguments" plus the flag of ``command`` each unknown
    flag most likely meant (``--learnig-rate``: did you mean --learning-rate?)."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subparsers.choices[command]
    flags = [f for a in sub._actions if a.help != argparse.SUPPRESS for f in a.option_strings]
    message = f"{sub.prog}: unrecognized arguments: {' '.join(unknown)}"
    wrong = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("--")]
    hint = unknown_names_hint(wrong, flags, show=str, list_valid=False)
    return f"{message}; {hint} (see `{sub.prog} --help`)" if hint else f"{message} (see `{sub.prog} --help`)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (0 ok, 2 bad input, 1 system trouble)."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            raise _UsageError(_unrecognized(parser, args.command, unknown))
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
