#!/usr/bin/env bash
# The GPU benchmark run of issue 15 (item 5), in bf16, in one go (about 5 minutes on one H100):
#   0. install the carried wheels (.whl/*.whl, see below), check every import, print the machine;
#   1. write two random-weight teachers (benchmarks/random_model.py): SmolLM2-135M's shape and a
#      262 K-vocabulary one (8 blocks, hidden 1024);
#   2. bench_cache_build on the 135M-shaped teacher: bf16, 512 x 1024 tokens, batch 16, bare
#      forward before and after (3 passes each);
#   3. bench_trainer's large-vocabulary row: 262 K vocabulary, 8 -> 4 blocks, plain vs plain with
#      the chunked CE vs distill-from-cache (throughput and peak CUDA memory);
#   4. bench_trainer on the 135M-shaped teacher, 30 -> 20 blocks: plain, plain_chunked, cache and
#      online, 2 round-robin repeats.
# Each step runs under `timeout`, capped by what is left of $DEADLINE, so one failure or overrun
# does not eat the others; results (cache_build_<tag>, trainer_<tag>, trainer_<tag>-vocab262k,
# .json and .md) are copied flat into $OUT after every step, with log.txt: 7 files.
#
# On the GPU machine, from the repo root (the device tool sets OUT; carry .whl):
#   bash benchmarks/device_run.sh
# Here, the same steps at tiny sizes on the CPU (no wheels, the local venv, float32):
#   DRY=1 bash benchmarks/device_run.sh
# Environment: STEPS (default "cache_build trainer_large_vocab trainer"; a rerun may name fewer),
# DRY (1 = CPU dry run), OUT (results; DRY default /tmp/unidistill-dry/out), PY
# (python; DRY default the main checkout's .venv), DEADLINE (seconds for the whole script; 360 on
# the GPU), UNIDISTILL_COMMIT (the commit measured, recorded in the results when .git is absent).
#
# Wheels (.whl/, git-ignored; pip download --no-deps --python-version 3.12, manylinux x86_64):
# zarr, numcodecs, donfig, google-crc32c, crc32c, datasets, dill, multiprocess; the image has the
# rest (torch, transformers, tokenizers, accelerate, pyarrow, fsspec, xxhash, ...).
# .whl/optional/typing_extensions is installed only if the image's is older than zarr needs.

set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${DRY:-0}
START=$(date +%s)

if [ "$DRY" = 1 ]; then
    OUT=${OUT:-/tmp/unidistill-dry/out}
    if [ -z "${PY:-}" ]; then
        PY=$ROOT/.venv/bin/python
        [ -x "$PY" ] || PY=$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir)/../.venv/bin/python
    fi
    DEADLINE=${DEADLINE:-900}
    WORK=/tmp/unidistill-dry/work
    rm -rf "$OUT"  # a dry run starts clean (on the device, the tool empties $OUT)
else
    OUT=${OUT:-/tmp/unidistill-device-out}
    PY=${PY:-python3}
    DEADLINE=${DEADLINE:-360}
    WORK=/tmp/unidistill-bench
fi
rm -rf "$WORK" && mkdir -p "$WORK/tmp" "$WORK/results" "$OUT"
RES=$WORK/results
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       PYTHONUNBUFFERED=1 HF_HOME=$WORK/hf TMPDIR=$WORK/tmp HF_HUB_DISABLE_TELEMETRY=1 \
       DO_NOT_TRACK=1 MPLBACKEND=Agg
[ "$DRY" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

STEPS=${STEPS:-cache_build trainer_large_vocab trainer}
STATUS=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

needs() {  # needs TEACHER_FOLDER STEP: false (and the step marked skipped) if the teacher is missing
    [ -f "$1/config.json" ] && return 0
    echo "=== SKIP $2: no teacher at $1"; STATUS+=("$2: SKIPPED (no teacher)"); FAILED=1; return 1
}

collect() {  # results so far, flat, into $OUT (at most 8 files there with log.txt)
    local f
    for f in "$RES"/*.json "$RES"/*.md; do
        [ -e "$f" ] && cp -f "$f" "$OUT/"
    done
}

step() {  # step NAME CAP_SECONDS CMD...: run under timeout, capped by the deadline; never fatal
    local name=$1 cap=$2 left t s rc
    shift 2
    left=$(( DEADLINE - $(elapsed) - 10 ))
    t=$(( cap < left ? cap : left ))
    if [ "$t" -lt 30 ]; then
        echo "=== SKIP $name: ${left}s left of DEADLINE=${DEADLINE}s"
        STATUS+=("$name: SKIPPED (deadline)"); FAILED=1
        return
    fi
    echo "=== $name: start at +$(elapsed)s, timeout ${t}s"
    echo "+ $(printf '%q ' "$@")"
    s=$(date +%s)
    timeout -k 10 "$t" "$@"
    rc=$?
    [ "$rc" = 0 ] || FAILED=1
    [ "$rc" = 124 ] && echo "=== $name: TIMED OUT after ${t}s"
    STATUS+=("$name: rc=$rc in $(( $(date +%s) - s ))s")
    echo "=== $name: rc=$rc, $(( $(date +%s) - s ))s, at +$(elapsed)s"
    collect
}

main() {
    echo "=== unidistill device run, DRY=$DRY, $(date -u +'%Y-%m-%d %H:%M:%S UTC'), deadline ${DEADLINE}s"
    if [ "$DRY" != 1 ]; then
        ls .whl/*.whl >/dev/null 2>&1 || { echo "FATAL: no .whl/*.whl here: the run must carry .whl"; return 2; }
        local te_ok
        te_ok=$("$PY" -c "import importlib.metadata as m; v=m.version('typing_extensions').split('.'); print(int(v[0]) > 4 or int(v[1]) >= 12)" 2>/dev/null)
        local extra=()
        [ "$te_ok" = True ] || extra=(.whl/optional/*.whl)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl "${extra[@]}" || { echo "FATAL: pip install of .whl failed"; return 2; }
        export PYTHONPATH=/tmp/site:$ROOT
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
        export PYTHONPATH=$ROOT
    fi
    echo "python: $PY; PYTHONPATH=$PYTHONPATH; $(getconf _NPROCESSORS_ONLN) CPUs; $(df -h /tmp | tail -1)"

    # fail in the first seconds on anything missing, before any model is built
    DRY=$DRY "$PY" - <<'EOF' || { echo "FATAL: import check failed (see above); nothing was run"; return 3; }
import importlib, importlib.metadata as md, os, sys
need = ["torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "yaml", "click",
        "tqdm", "zarr", "numcodecs", "donfig", "google_crc32c", "crc32c", "unidistill",
        "unidistill.cli", "unidistill.cache_builder.build", "unidistill.trainer.run",
        "unidistill.trainer.distill_trainer", "unidistill.pruning.prune", "unidistill.storage"]
bad = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {e}")
try:  # unused by these benchmarks (built-in text); a missing wheel is fatal, a version clash is not
    import datasets  # noqa: F401
except ModuleNotFoundError as e:
    bad.append(f"datasets: {e}")
except Exception as e:
    print(f"WARNING: datasets does not import ({type(e).__name__}: {e}); these benchmarks read "
          "built-in text only and go on, but hub and local-file data would fail here")
try:
    import zarr, numcodecs.blosc  # noqa: F401,E401
    from zarr.codecs import BloscCodec  # noqa: F401
except Exception as e:
    bad.append(f"zarr codecs: {type(e).__name__}: {e}")
vers = {}
for d in ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy", "zarr", "numcodecs",
          "donfig", "google-crc32c", "crc32c", "datasets", "dill", "multiprocess", "pyarrow", "fsspec",
          "huggingface-hub", "packaging", "typing_extensions", "pyyaml"):
    try:
        vers[d] = md.version(d)
    except md.PackageNotFoundError:
        vers[d] = None
print("versions:", vers)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          *([torch.cuda.get_device_name(0)] if torch.cuda.is_available() else []))
    if os.environ.get("DRY") != "1" and not torch.cuda.is_available():
        bad.append("torch sees no CUDA GPU")
except Exception as e:
    bad.append(f"torch/CUDA: {type(e).__name__}: {e}")
for b in bad:
    print("MISSING/BROKEN:", b)
sys.exit(1 if bad else 0)
EOF

    local T135=$WORK/teacher-135m T262=$WORK/teacher-262k TAG BIG
    local A_ARGS B_ARGS C_ARGS M135 M262
    if [ "$DRY" = 1 ]; then
        TAG=dry; BIG=$TAG-vocab70k
        M135=(--preset tiny); M262=(--preset tiny --vocab-size 70000)
        A_ARGS=(--device cpu --dtype float32 --seq-len 128 --batch-size 4 --n-sequences 16 --layers 2,4
                --bare-repeats 2)
        C_ARGS=(--device cpu --seq-len 128 --batch-size 2 --warmup-steps 1 --steps 2 --student-drop-blocks 2)
        B_ARGS=(--device cpu --seq-len 128 --batch-size 2 --warmup-steps 1 --steps 2 --student-drop-blocks 2)
    else
        TAG=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from machine import gpu_tag; print(gpu_tag())")
        TAG=${TAG:-gpu}; BIG=$TAG-vocab262k
        M135=(--preset smollm2-135m --init-device cuda); M262=(--preset vocab262k --init-device cuda)
        A_ARGS=(--device cuda --dtype bfloat16 --seq-len 1024 --batch-size 16 --n-sequences 512
                --layers 6,12,18,24,30 --bare-repeats 3)
        C_ARGS=(--device cuda --bf16 --seq-len 1024 --batch-size 8 --warmup-steps 3 --steps 20
                --student-drop-blocks 4)
        B_ARGS=(--device cuda --bf16 --seq-len 1024 --batch-size 8 --warmup-steps 5 --steps 40
                --student-drop-blocks 10)
        # TRAINER_EXTRA: more bench_trainer flags for both trainer rows (e.g. a larger logits chunk)
        C_ARGS+=(${TRAINER_EXTRA:-}); B_ARGS+=(${TRAINER_EXTRA:-})
    fi
    echo "=== steps: $STEPS; result tags: $TAG (cache_build, trainer), $BIG (trainer_large_vocab)"
    local NOTE135="Random-weight teacher of SmolLM2-135M's shape (the GGUF does not travel); benchmarks/device_run.sh."

    if wanted cache_build || wanted trainer; then
        step teacher_135m 90 "$PY" benchmarks/random_model.py "${M135[@]}" --out "$T135"
    fi
    if wanted trainer_large_vocab; then
        step teacher_262k 90 "$PY" benchmarks/random_model.py "${M262[@]}" --out "$T262"
    fi

    if wanted cache_build; then
        needs "$T135" cache_build && \
        step cache_build 150 "$PY" benchmarks/bench_cache_build.py --teacher "$T135" --data builtin:stdlib_docs \
            --split all --top-k 64 "${A_ARGS[@]}" --tag "$TAG" --results "$RES" --note "$NOTE135"
    fi
    if wanted trainer_large_vocab; then
        needs "$T262" trainer_large_vocab && \
        step trainer_large_vocab 150 "$PY" benchmarks/bench_trainer.py --teacher "$T262" \
            --data builtin:stdlib_docs "${C_ARGS[@]}" --modes ${BIG_MODES:-plain,plain_chunked,cache} --repeats 1 \
            --tag "$BIG${TAG_SUFFIX:-}" --results "$RES" --note "Large-vocabulary row (issue 15 item 2): random-weight \
teacher with a Gemma-3-sized vocabulary; benchmarks/device_run.sh."
    fi
    if wanted trainer; then  # last: it keeps every finished mode if the deadline cuts it short
        needs "$T135" trainer && \
        step trainer 240 "$PY" benchmarks/bench_trainer.py --teacher "$T135" --data builtin:stdlib_docs \
            "${B_ARGS[@]}" --modes ${TRAINER_MODES:-plain,cache,online,plain_chunked} --repeats ${TRAINER_REPEATS:-2} --tag "$TAG${TAG_SUFFIX:-}" \
            --results "$RES" --note "$NOTE135"
    fi

    collect
    echo "=== summary after $(elapsed)s:"
    printf '  %s\n' "${STATUS[@]}"
    echo "=== files in $OUT:"; ls -la "$OUT"
    grep -h -E "^\| \*\*ratio|^\| (throughput|peak)_" "$OUT"/*.md 2>/dev/null | sed 's/^/  /'
    return $FAILED
}

set -o pipefail
main 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
[ "$DRY" = 1 ] && [ "${KEEP:-0}" != 1 ] && rm -rf "$WORK"
exit "$rc"
