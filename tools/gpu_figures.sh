#!/usr/bin/env bash
# Every GPU figure in docs/benchmarks.md, in stages of a few minutes each (run them in order
# on one machine; WORK keeps the shards between stages):
#   bash tools/gpu_figures.sh STAGE JPEG_DIR WORK LOG_DIR
# JPEG_DIR: real ImageNet JPEGs named <wnid>_*.JPEG (the optional real-image sample).
# Stages:
#   model    prepare the benchmark shards (JPEG_DIR x 60); the LRN test on CUDA;
#            tools/profile_model.py, tools/bench_kernels.py (no DALI needed)
#   loader   pca.json for the shards; tools/bench_pca.py; the GPU tests; tools/bench_loader.py
#   train    tools/bench_train.py with the decoder cache, echo 2, the PyTorch baseline and the
#            model on the default stream beside the default highest-priority one; the
#            decoder cache again on a 4x larger set (JPEG_DIR x 240, --cache-only); the usual
#            shards against tiles of 4 (tools/bench_tiles.py, with echo 2) and bench_train on tiles,
#            also from the decoder cache with one pipeline and with four
#   profile  tools/profile_train.py for both archs; tools/bench_host.py; tools/bench_decode.py;
#            tools/bench_knobs.py; tools/bench_beside.py; tools/bench_neighbors.py
#   real     tools/real_run.sh with and without --echo 2 (same steps), alexpipe-neighbors; on
#            squares (--center-crop) and on tiles of 4 of them
set -euo pipefail
stage=$1; src=$(cd "$2" && pwd); work=$3; log=$4
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}  # the loader overlaps the model
export PYTHONPATH=$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$work/bin" "$log"
# the console scripts, for a checkout that is on PYTHONPATH but not pip-installed
while read -r name target; do
    printf '#!/bin/sh\nexec python3 -c "import sys; from %s import %s as m; sys.argv[0] = \\"%s\\"; raise SystemExit(m())" "$@"\n' \
        "${target%:*}" "${target#*:}" "$name" > "$work/bin/$name"
    chmod +x "$work/bin/$name"
done < <(sed -n '/^\[project.scripts\]/,/^$/p' pyproject.toml | sed -n 's/^\(alexpipe-[a-z]*\) = "\(.*\)"/\1 \2/p')
export PATH=$work/bin:$PATH
case $stage in
model)
    python3 - "$src" "$work" <<'PY'
import sys
from pathlib import Path
from bench_prepare import make_tree
from alexpipe.prepare import PrepareConfig, prepare
src, work = Path(sys.argv[1]), Path(sys.argv[2])
make_tree(src, work / "bench_src", 60)
prepare(PrepareConfig(src=work / "bench_src", out=work / "bench", split="train", shard_size=500))
PY
    python3 -m pytest -q tests/test_model.py 2>&1 | tee "$log/test_model.log"
    python3 tools/profile_model.py 2>&1 | tee "$log/profile_model.log"
    python3 tools/bench_kernels.py 2>&1 | tee "$log/bench_kernels.log"
    ;;
loader)
    python3 -m alexpipe.pca "$work/bench" 2>&1 | tail -8 | tee "$log/pca.log"
    python3 tools/bench_pca.py --src "$src" 2>&1 | grep -v "it/s\]" | tee "$log/bench_pca.log"
    python3 -m pytest -q tests/test_gpu.py tests/test_model.py 2>&1 | tee "$log/test_gpu.log"
    python3 tools/bench_loader.py --out "$work/bench" 2>&1 | tee "$log/bench_loader.log"
    ;;
train)
    python3 tools/bench_train.py --out "$work/bench" --cache --echo 2 --baseline --default-stream 2>&1 \
        | tee "$log/bench_train.log"
    python3 tools/bench_train.py --src "$src" --repeat 240 --cache-only 2>&1 | grep -v "it/s\]" \
        | tee "$log/bench_train_cache120.log"
    python3 tools/bench_tiles.py --src "$src" --repeat 60 --echo 2 --repeats 3 2>&1 | grep -v "it/s\]" | tee "$log/bench_tiles.log"
    python3 tools/bench_train.py --src "$src" --repeat 60 --tile 4 --echo 2 2>&1 \
        | grep -v "it/s\]" | tee "$log/bench_train_tiles.log"
    for loaders in 1x4@1.0 4x4@1.0; do  # tiles from the decoder cache: one pipeline (their default) or four
        python3 tools/bench_train.py --src "$src" --repeat 240 --tile 4 --cache-only --loaders $loaders 2>&1 \
            | grep -v "it/s\]" | tee -a "$log/bench_train_tiles_cache.log"
    done
    ;;
profile)
    for arch in torchvision paper; do
        python3 tools/profile_train.py --out "$work/bench" --arch "$arch" 2>&1 | tee -a "$log/profile_train.log"
    done
    python3 tools/bench_host.py --out "$work/bench" 2>&1 | tee "$log/bench_host.log"
    python3 tools/bench_decode.py --out "$work/bench" 2>&1 | tee "$log/bench_decode.log"
    python3 tools/bench_knobs.py --out "$work/bench" --variants "default,no mmap,old executor,prefetch 4,switch 0.2ms,affinity,echo 2,echo 2 no mmap" 2>&1 | tee "$log/bench_knobs.log"
    python3 tools/bench_knobs.py --out "$work/bench" --repeats 4 \
        --variants "default,echo 2,hw 0.9,hw 0.75,hw 0.5,echo 2 hw 0.75" 2>&1 | tee -a "$log/bench_knobs.log"
    python3 tools/bench_knobs.py --out "$work/bench" --variants "default,6x3,6x2,3x4,2x8" 2>&1 | tee -a "$log/bench_knobs.log"
    for b in 128 256; do
        python3 tools/bench_knobs.py --out "$work/bench" --batch-size $b --variants "default,prealloc,echo 2" 2>&1 \
            | tee -a "$log/bench_knobs.log"
    done
    for arch in torchvision paper; do  # one process per net: each CUDA graph captured before any loader runs
        python3 tools/bench_knobs.py --out "$work/bench" --archs $arch --repeats 4 --modes reduce-overhead,default \
            --variants "default,echo 2" 2>&1 | tee -a "$log/bench_knobs.log"
    done
    python3 tools/bench_knobs.py --out "$work/bench" --archs torchvision --repeats 4 \
        --variants "default,echo 2,echo 4,echo 2 prefetch 4,echo 2 3x4,echo 2 2x8" 2>&1 | tee -a "$log/bench_knobs.log"
    python3 tools/bench_beside.py --out "$work/bench" --parts loads,kernels,batch,graphs,clocks,cpu 2>&1 \
        | tee "$log/bench_beside.log"
    python3 tools/bench_neighbors.py --out "$work/bench" --queries 500 2>&1 | grep -v "it/s\]" \
        | tee "$log/bench_neighbors.log"
    if [ -n "${PRIORITY_TEST:-}" ]; then  # an experiment script: decoding on high/low-priority streams
        python3 "$PRIORITY_TEST" "$work/bench" 3 2>&1 | tee "$log/priority_test.log"
    fi
    ;;
real)
    bash tools/real_run.sh "$src" "$work/real" 20 10 --warmup-epochs 2 2>&1 | grep -v "it/s\]" | tee "$log/real_run.log"
    alexpipe-train "$work/real/out" --arch torchvision --epochs 5 --batch-size 256 --echo 2 --warmup-epochs 1 \
        --run-dir "$work/real/run_echo2" 2>&1 | grep -v "it/s\]" | tee "$log/real_run_echo2.log"
    cp "$work/real/run/"neighbors-*.png "$work/real/run/curves.png" "$log/"
    for run in "squares:--center-crop" "tiles4:--center-crop --tile 4"; do  # squares against tiles of them
        PREPARE="${run#*:}" bash tools/real_run.sh "$src" "$work/real_${run%%:*}" 20 10 --warmup-epochs 2 2>&1 \
            | grep -v "it/s\]" | tee "$log/real_run_${run%%:*}.log"
    done
    ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
