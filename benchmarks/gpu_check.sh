#!/usr/bin/env bash
# The GPU measurement of issue 16, as one script of at most ~9 minutes on one H100/H200:
#   (a) python -m tga.bench on the default config's model, batch 64 and 8, compiled
#       (and eager, for the comparison), with TORCH_LOGS=graph_breaks,recompiles;
#   (b) one default-config 1000-step training job (tga.train.train_model, as the
#       training rule runs it: compile auto = compiled on CUDA), timed;
#   (c) the quick config end to end on CUDA through Snakemake.
# Everything it writes goes under $OUT (default: ./gpu_check_out).
#
# Two steps, because the device machine reaches no package registry and lacks
# jsonschema (tga imports it) and Snakemake:
#   1. here, on a machine with pip and network, in the repository root:
#        bash benchmarks/gpu_check.sh wheels
#      downloads the missing packages as wheels for the device's Python 3.12 into .whl/
#      (git-ignored; the versions installed here, so the same Snakemake runs there).
#   2. on the device machine (tool run, carry [".whl"], timeout_s 600):
#        bash benchmarks/gpu_check.sh
# Token files for (b): WikiText-2's valid split (train) and test split (validation),
# GPT-2 BPE, when shared/data/{wikitext-2-raw,gpt2} is in the repository (copy
# ../shared/data there: a checkout's shared/ travels to the device); otherwise
# synthetic uniform ids over GPT-2's vocabulary (same arithmetic, meaningless loss).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

if [ "${1:-}" = wheels ]; then
    rm -rf .whl && mkdir -p .whl
    # Snakemake's and jsonschema's dependency closure at the versions installed here,
    # less what the device image already holds (/work/.library/device/KINDS.md).
    python3 - >.whl/requirements.txt <<'EOF'
import importlib.metadata as md, re
from packaging.requirements import Requirement
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
on_device = {"attrs", "certifi", "charset-normalizer", "idna", "jinja2", "markupsafe", "packaging", "psutil",
             "pyyaml", "requests", "tabulate", "typing-extensions", "urllib3", "wrapt"}
seen, todo = {}, ["snakemake", "jsonschema"]
while todo:
    name = norm(todo.pop())
    if name in seen:
        continue
    dist = md.distribution(name)
    seen[name] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
for name, version in sorted(seen.items()):
    if name not in on_device:
        print(f"{name}=={version}")
EOF
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    while read -r req; do
        # a binary wheel for CPython 3.12 on x86-64, else (a pure-Python sdist) one built here
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d .whl "$req" 2>/dev/null \
            || python3 -m pip wheel -q --no-deps -w .whl "$req" \
            || { echo "gpu_check: no wheel for $req" >&2; exit 1; }
    done <.whl/requirements.txt
    du -sh .whl && ls .whl | wc -l
    exit 0
fi

OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
# Seconds per part (about 9 minutes in all); a part that runs out is cut off and the
# next one still runs. Files: env.txt summary.txt bench64.json bench8.json bench.log
# train.log train_log.csv e2e.log (the device tool returns at most 8).
LIMIT_BENCH64=${LIMIT_BENCH64:-110} LIMIT_BENCH8=${LIMIT_BENCH8:-90} LIMIT_TRAIN=${LIMIT_TRAIN:-110}
LIMIT_E2E=${LIMIT_E2E:-210}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
# tga from this checkout (no install needed: the workflow's scripts import it from PYTHONPATH too)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import tga.train, snakemake" 2>"$OUT/env.txt"; then
    echo "gpu_check: tga or snakemake does not import here (see env.txt): run 'bash benchmarks/gpu_check.sh wheels'" \
         "on a machine with network and carry .whl" | tee -a "$OUT/env.txt"
    exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(),
'bf16', torch.cuda.is_bf16_supported(including_emulation=False))"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null; } >>"$OUT/env.txt" 2>&1
clip() { tail -c 2000000 "$1" >"$1.tmp" && mv "$1.tmp" "$1"; }  # logs stay well under the 16 MiB a file

# (a) ------------------------------------------------------------------ benchmark
# One process per shape (each compiles its own graph); batch 64 also eager, for the gain.
for shape in "64 both" "8 on"; do
    set -- $shape
    start=$SECONDS
    TORCH_LOGS=graph_breaks,recompiles timeout "$([ "$1" = 64 ] && echo "$LIMIT_BENCH64" || echo "$LIMIT_BENCH8")" \
        "$PY" -m tga.bench --device cuda --models default --batch-sizes "$1" --compile "$2" --steps 200 --warmup 30 \
        --repo "$ROOT" >"$OUT/bench$1.json" 2>>"$OUT/bench.log"
    echo "(a) bench, batch $1, compile $2: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
done
clip "$OUT/bench.log"

# (b) ------------------------------------------------- one default-config training job
start=$SECONDS
timeout "$LIMIT_TRAIN" "$PY" - "$ROOT" "$OUT" >>"$OUT/train.log" 2>&1 <<'EOF'
import csv, json, shutil, statistics, sys, tempfile, time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from tga.bench import pipeline_settings
from tga.data import tokenize_to_file
from tga.tokenizers import create_tokenizer
from tga.train import train_model

root, out = Path(sys.argv[1]), Path(sys.argv[2])
work = Path(tempfile.mkdtemp())
data = root / "shared" / "data"
text, gpt2 = data / "wikitext-2-raw", data / "gpt2"
if (text / "wiki.valid.raw").is_file() and (gpt2 / "encoder.json").is_file():
    tokenizer = create_tokenizer("bpe", encoder_json=gpt2 / "encoder.json", vocab_bpe=gpt2 / "vocab.bpe")
    tokenize_to_file(text / "wiki.valid.raw", tokenizer, work / "train.bin")
    tokenize_to_file(text / "wiki.test.raw", tokenizer, work / "val.bin")
    tokens = "WikiText-2 valid (train) / test (validation), GPT-2 BPE"
else:
    rng = np.random.default_rng(0)
    for name, n in (("train", 2_000_000), ("val", 200_000)):
        ids = rng.integers(0, 50257, n, dtype=np.uint16)
        (work / f"{name}.bin").write_bytes(ids.tobytes())
        meta = {"dtype": "uint16", "n_tokens": n, "vocab_size": 50257, "tokenizer": "synthetic", "source": "synthetic",
                "n_bytes": 4 * n, "n_words": n, "sha256": ""}
        (work / f"{name}.json").write_text(json.dumps(meta))
    tokens = "synthetic uniform ids, vocab 50257"
variant, model, training = pipeline_settings(root, "default")
training = replace(training, device="cuda")
start = time.perf_counter()
summary = train_model(model, training, work / "train.bin", work / "val.bin", work / "run", variant, show_progress=False)
wall = time.perf_counter() - start
shutil.copy(work / "run" / "train_log.csv", out / "train_log.csv")
rates = [float(r["tokens_per_s"]) for r in csv.DictReader(open(work / "run" / "train_log.csv")) if r["tokens_per_s"]]
print(json.dumps({"variant": variant, "tokens": tokens, "training": asdict(training), "wall_s": round(wall, 1),
                  "median_tokens_per_s": statistics.median(rates), "first_log_tokens_per_s": rates[0],
                  **summary}, indent=1))
EOF
echo "(b) 1000-step training: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
clip "$OUT/train.log"

# (c) ------------------------------------------------ the quick config end to end on CUDA
start=$SECONDS
work=$(mktemp -d)
cp -r Snakefile workflow config resources profiles "$work"/
# Training, evaluation and geometry on the GPU; train_gpus 0 lets the 12 small training
# jobs share the one GPU instead of queueing for it (the default profile declares gpu: 1).
cat >"$work/config/cuda.yaml" <<'EOF'
training: {device: cuda}
evaluation: {device: cuda}
geometry: {device: cuda}
resources: {train_gpus: 0}
EOF
(cd "$work" && timeout "$LIMIT_E2E" "$PY" -m snakemake --cores 16 --configfile config/quick.yaml config/cuda.yaml) \
    >"$OUT/e2e.log" 2>&1
echo "(c) quick config end to end on CUDA: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
clip "$OUT/e2e.log"
