#!/usr/bin/env bash
# The GPU measurement of issue 22, as one script of at most ~9 minutes on one H100/H200:
#   (a) python -m tga.bench, compiled as the pipeline compiles by default (compile_mode
#       and loss_head auto), with TORCH_LOGS=graph_breaks,recompiles: the default model
#       at batch 64 (with a torch.profiler table of its top kernels), the same with the
#       issue-16 path (compile_mode default, chunked head; profiled too, without CUDA
#       graphs in the way), the nanoGPT-like block at
#       batch 64 (like for like with nanoGPT), and the default model at batch 8 (the
#       config's; CUDA graphs), with its top kernels too;
#   (b) the whole default study (4 variants x 3 seeds) on the proxy data, config/proxy.yaml
#       over shared/data, on CUDA with resources.train_gpus 0 and a cold compile cache;
#   (c) its 12 training jobs again (cache warm), all at once, then (d) one at a time;
#   and ends with one summary table (in summary.txt): ms/step at 64 and 8, MFU, the
#   study's wall time and its four test perplexities.
# It writes 8 files under $OUT (default: ./gpu_check_out): summary.txt env.txt
# bench.jsonl bench.log profile.md study.log jobs.tsv perplexity.csv.
#
# Two steps, because the device machine reaches no package registry and lacks
# jsonschema (tga imports it) and Snakemake:
#   1. here, on a machine with pip and network, in the repository root:
#        bash benchmarks/gpu_check.sh wheels
#      downloads the missing packages as wheels for the device's Python 3.12 into .whl/
#      (git-ignored; the versions installed here, so the same Snakemake runs there).
#      Copy the offline data into the checkout too, so that it travels to the device:
#        mkdir -p shared/data && cp -r ../shared/data/wikitext-2-raw ../shared/data/gpt2 shared/data/
#   2. on the device machine (tool run, carry [".whl"], timeout_s 600):
#        bash benchmarks/gpu_check.sh          # issue 22's measurements, or
#        bash benchmarks/gpu_check.sh scale    # issue 23's: GPT-2 small through the workflow (see "scale" below)
# (b)-(d) need shared/data/wikitext-2-raw/wiki.{valid,test}.raw and shared/data/gpt2/
# {encoder.json,vocab.bpe} in the repository (or in ../shared/data beside it).
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
seen, todo = {}, ["snakemake", "jsonschema", "datasets"]  # datasets: data.source hf (scale)
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
# next one still runs.
LIMIT_BENCH=${LIMIT_BENCH:-60} LIMIT_STUDY=${LIMIT_STUDY:-180} LIMIT_WARM=${LIMIT_WARM:-45}
LIMIT_SERIAL=${LIMIT_SERIAL:-80}
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
TMP=$(mktemp -d)

# scale ------------------------------------- issue 23: GPT-2 small on one GPU, in the workflow
# `bash benchmarks/gpu_check.sh scale`: the recipe for 200 steps (benchmarks/gpt2-small-check.yaml),
# then its test perplexity and its geometry on 128 test windows of 1024 tokens, all on the
# GPU; GPU memory sampled by nvidia-smi. Writes summary.txt, scale.log, gpu_memory.csv,
# train_log.csv, perplexity.json, summary.csv and the rules' benchmark tables under $OUT.
if [ "${1:-}" = scale ]; then
    DATA=$ROOT/shared/data
    [ -f "$DATA/wikitext-2-raw/wiki.valid.raw" ] || DATA=$ROOT/../shared/data
    mkdir -p gpu_check_data
    "$PY" - "$DATA/wikitext-2-raw" gpu_check_data <<'PYEOF'
import json, re, sys
from pathlib import Path
source, out = Path(sys.argv[1]), Path(sys.argv[2])
for name, split in (("wiki.valid.raw", "train"), ("wiki.test.raw", "test")):
    articles = [a for a in re.split(r"\n(?= = [^=].* = \n)", (source / name).read_text(encoding="utf-8")) if a.strip()]
    (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for a in articles), encoding="utf-8")
PYEOF
    export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$DATA/gpt2/tiktoken_cache} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 500 >"$OUT/gpu_memory.csv" &
    sampler=$!
    start=$SECONDS
    timeout "${LIMIT_SCALE:-540}" "$PY" -m snakemake outputs/eval/llama-preln/seed0/perplexity.json \
        outputs/geometry/llama-preln/seed0/summary.csv --cores 16 --resources gpu=1 \
        --configfile config/recipes/gpt2-small.yaml benchmarks/gpt2-small-check.yaml >"$OUT/scale.log" 2>&1
    echo "scale: snakemake exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    kill "$sampler" 2>/dev/null
    cp outputs/models/llama-preln/seed0/train_log.csv outputs/eval/llama-preln/seed0/perplexity.json \
        outputs/geometry/llama-preln/seed0/summary.csv "$OUT"/ 2>/dev/null
    for f in outputs/benchmarks/*/llama-preln/seed0.tsv outputs/benchmarks/tokenize_corpus.tsv; do
        [ -f "$f" ] && { echo "== $f"; cat "$f"; } >>"$OUT/rule_benchmarks.txt"
    done
    "$PY" - "$OUT" <<'PYEOF' | tee -a "$OUT/summary.txt"
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    rates = [float(r["tokens_per_s"]) for r in rows if r.get("tokens_per_s")]
    print(f"train: {rows[-1]['step']} steps, tokens/s per logged interval {[round(r) for r in rates]}, "
          f"last val_ppl {rows[-1]['val_ppl']}, elapsed {rows[-1]['elapsed_s']} s")
except (OSError, KeyError, IndexError) as e:
    print(f"train: no train_log.csv ({e})")
try:
    used = [float(line.split(",")[1]) for line in open(out / "gpu_memory.csv") if "," in line]
    print(f"GPU memory used, peak over the run (nvidia-smi, MiB): {max(used):.0f}")
except (OSError, ValueError) as e:
    print(f"GPU memory: unreadable ({e})")
for name in ("perplexity.json",):
    try:
        print("eval:", {k: v for k, v in json.load(open(out / name)).items() if k in ("token_ppl", "bits_per_byte", "n_tokens_scored")})
    except OSError as e:
        print(f"eval: none ({e})")
PYEOF
    exit 0
fi

# (a) ------------------------------------------------------------------ benchmark
# One process per setting (each compiles its own graph): a label, then tga.bench's flags.
while read -r label flags; do
    start=$SECONDS
    # shellcheck disable=SC2086  # the flags are meant to split
    TORCH_LOGS=graph_breaks,recompiles timeout "$LIMIT_BENCH" "$PY" -m tga.bench --device cuda --models default \
        --compile on --steps 200 --warmup 30 --eval-tokens 500000 --repo "$ROOT" $flags \
        >"$TMP/bench-$label.json" 2>>"$OUT/bench.log"
    echo "(a) bench $label ($flags): exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
done <<BENCHES
b64 --batch-sizes 64 --profile $TMP/profile
b64-issue16 --batch-sizes 64 --compile-mode default --loss-head chunked --profile $TMP/profile
b64-nanogpt --batch-sizes 64 --variant nanogpt-like
b8 --batch-sizes 8 --profile $TMP/profile
BENCHES
for f in "$TMP"/bench-*.json; do
    label=$(basename "$f" .json)
    "$PY" -c "import json, sys; print(json.dumps({'label': sys.argv[1], 'report': json.load(open(sys.argv[2]))}))" \
        "${label#bench-}" "$f" >>"$OUT/bench.jsonl" 2>>"$OUT/bench.log"
done
cat "$TMP"/profile/*.md >"$OUT/profile.md" 2>/dev/null
clip "$OUT/bench.log"

# (b) ------------------------------------------- the whole default study on the proxy data
DATA=$ROOT/shared/data
[ -f "$DATA/wikitext-2-raw/wiki.valid.raw" ] || DATA=$ROOT/../shared/data
study=$TMP/base/study
mkdir -p "$study"
ln -s "$(cd "$(dirname "$DATA")" 2>/dev/null && pwd)" "$TMP/base/shared"  # config/proxy.yaml reads ../shared/data
cp -r Snakefile workflow config resources profiles "$study"/
# Training, evaluation and geometry on the GPU; train_gpus 0 lets the 12 training jobs
# share the one GPU instead of queueing for it (the default profile declares gpu: 1),
# and one CPU thread each lets all 12 start at once within --cores 16 (a GPU job's
# host work is one thread launching kernels).
printf '%s\n' "training: {device: cuda}" "evaluation: {device: cuda}" "geometry: {device: cuda}" \
    "resources: {train_gpus: 0, train_threads: 1}" >"$study/config/cuda.yaml"
printf '%s\n' "resources: {train_gpus: 1, train_threads: 1}" >"$study/config/serial.yaml"
smk() {  # smk LIMIT ARGS...: Snakemake in the study's folder, cut off after LIMIT seconds
    (cd "$study" && timeout "$1" "$PY" -m snakemake --cores 16 "${@:2}") >>"$OUT/study.log" 2>&1
}
if [ -f "$DATA/wikitext-2-raw/wiki.valid.raw" ] && [ -f "$DATA/gpt2/encoder.json" ]; then
    start=$SECONDS
    smk "$LIMIT_STUDY" --configfile config/proxy.yaml config/cuda.yaml
    status=$?
    echo "study_s=$((SECONDS - start)) study_exit=$status" >"$TMP/study.txt"
    echo "(b) the default study, proxy data, cold compile cache: exit $status after $((SECONDS - start)) s" \
        | tee -a "$OUT/summary.txt"
    cp "$study/outputs/compare/perplexity.csv" "$OUT/perplexity.csv" 2>/dev/null
    # every job's seconds (Snakemake's benchmark files): training, evaluation, geometry, plots
    (cd "$study/outputs/benchmarks" && find . -name '*.tsv' | sort | while read -r f; do
        printf '%s\t%s\n' "${f#./}" "$(tail -n 1 "$f" | cut -f1)"; done) >"$OUT/jobs.tsv" 2>/dev/null
    # (c) the 12 training jobs again, all at once, then (d) one at a time; the cache warm in both
    for part in warm serial; do
        start=$SECONDS
        if [ $part = warm ]; then
            smk "$LIMIT_WARM" --configfile config/proxy.yaml config/cuda.yaml --forcerun train --until train
        else
            smk "$LIMIT_SERIAL" --configfile config/proxy.yaml config/cuda.yaml config/serial.yaml --resources gpu=1 \
                --forcerun train --until train
        fi
        status=$?
        echo "${part}_s=$((SECONDS - start)) ${part}_exit=$status" >>"$TMP/study.txt"
        echo "(c/d) 12 training jobs, $part, cache warm: exit $status after $((SECONDS - start)) s" \
            | tee -a "$OUT/summary.txt"
        (cd "$study/outputs/benchmarks/train" && find . -name '*.tsv' | sort | while read -r f; do
            printf '%s\t%s\t%s\n' "$part" "${f#./}" "$(tail -n 1 "$f" | cut -f1)"; done) >>"$OUT/jobs.tsv" 2>/dev/null
    done
    du -sh "$study/outputs/cache/torch-compile" >>"$OUT/study.log" 2>&1
else
    echo "(b)-(d) skipped: no WikiText-2 / GPT-2 files in $ROOT/shared/data or ../shared/data" | tee -a "$OUT/summary.txt"
fi
clip "$OUT/study.log"

# ------------------------------------------------------------------ the summary table
"$PY" - "$OUT" "$TMP/study.txt" >>"$OUT/summary.txt" 2>&1 <<'SUMMARY'
import csv, json, statistics, sys
from pathlib import Path

out, study = Path(sys.argv[1]), Path(sys.argv[2])
runs = {}
if (out / "bench.jsonl").is_file():
    for line in (out / "bench.jsonl").read_text().splitlines():
        entry = json.loads(line)
        runs[entry["label"]] = entry["report"]["models"]["default"]["train"][0]
times = dict(item.split("=") for item in study.read_text().split()) if study.is_file() else {}
rows = []
for label, what in (("b64", "ms/step, default model, batch 64 x 256"),
                    ("b64-issue16", "ms/step, same, issue-16 path (compile_mode default, chunked head)"),
                    ("b64-nanogpt", "ms/step, nanoGPT-like block, batch 64 x 256"),
                    ("b8", "ms/step, default model, batch 8 x 256")):
    run = runs.get(label)
    rows.append((what, "not measured" if run is None else
                 f"{run['step_ms']} ({run['compile']}, {run['loss_head']} head, {run['precision']}, "
                 f"{run['train_tokens_per_s'] / 1e6:.2f}M tokens/s)"))
mfu = runs.get("b64", {}).get("mfu")
rows.append(("MFU, default model, batch 64", "not measured" if mfu is None else f"{100 * mfu:.1f}%"))
for key, what in (("study", "the default study, 4 variants x 3 seeds, proxy data, cold cache (s)"),
                  ("warm", "its 12 training jobs at once, cache warm (s)"),
                  ("serial", "its 12 training jobs one at a time, cache warm (s)")):
    seconds, status = times.get(f"{key}_s"), times.get(f"{key}_exit")
    rows.append((what, "not measured" if seconds is None else seconds + ("" if status == "0" else f" (exit {status})")))
ppl = out / "perplexity.csv"
if ppl.is_file():
    by_variant = {}
    for row in csv.DictReader(open(ppl)):
        if row.get("seed") and row.get("status", "ok") == "ok":
            by_variant.setdefault(row["variant"], []).append(float(row["token_ppl"]))
    for variant, values in sorted(by_variant.items()):
        rows.append((f"test perplexity, {variant} (mean of {len(values)} seeds)",
                     f"{statistics.mean(values):.1f} ({' / '.join(f'{v:.0f}' for v in values)})"))
width = max(len(what) for what, _ in rows)
print(f"\n| {'what'.ljust(width)} | figure |\n|{'-' * (width + 2)}|---|")
for what, figure in rows:
    print(f"| {what.ljust(width)} | {figure} |")
SUMMARY
cat "$OUT/summary.txt"
