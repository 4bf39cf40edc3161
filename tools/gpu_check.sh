#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md ("Throughput"), for an offline GPU machine: one that
# reaches no package index and takes files in transfers of at most 64 MiB, each with a
# copy of this checkout (~15 MB).
#
#   bash tools/gpu_check.sh fetch      # here: wheels for that machine's Python into .whl/
#   bash tools/gpu_check.sh receive    # there: keep the wheel parts this transfer brought
#   bash tools/gpu_check.sh run        # there: install, build the model, measure into $OUT
#   (split FILE and assemble: the steps of fetch and run that cut and rejoin the wheel)
#
# onnxruntime-gpu's wheel is 255 MB (its CUDA provider alone is 284 MB unpacked and 186 MB
# compressed), so it travels in parts: `fetch` prints what each transfer takes; the last
# one brings the small wheels and the last part and runs everything. Parts are kept in
# $PARTS there, which must survive between the transfers. What `run` measures: the bench
# DenseNet-121 (tools/make_fixtures.py --bench, 14 classes) at 224 and 320, every method of
# tools/bench_methods.py on CUDA through the service's own path (I/O binding, cuDNN's
# exhaustive search, warm-up), with every call's maps compared with the same calls on the
# CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.whl}
PARTS=${PARTS:-/tmp/medexplain-gpu-parts}
PART_BYTES=${PART_BYTES:-$((46 * 1024 * 1024))}  # with the ~15 MB checkout, under 64 MiB
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}  # the GPU machine's python3
PYTHON=${PYTHON:-python3}             # there; a dry run here: PYTHON=.venv/bin/python
# pip matches a manylinux tag exactly: every one a glibc 2.39 runs.
PLATFORMS=(manylinux2014_x86_64 $(for n in $(seq 17 39); do echo "manylinux_2_${n}_x86_64"; done))

# What the service imports beyond a PyTorch image's packages (numpy, onnx, opencv,
# prometheus-client, protobuf, flatbuffers, torch), pinned to this checkout's environment
# so both run the same code.
SMALL=(pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls)

pinned() {  # NAME==VERSION as this checkout's .venv has it
  .venv/bin/python -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"
}

fetch() {
  [ -x .venv/bin/python ] || { echo "no .venv: run 'make test' (or 'make tools') first" >&2; exit 2; }
  rm -rf "$WHEELS" && mkdir -p "$WHEELS/small" "$WHEELS/whole"
  local platform_args=() name
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  local download=(.venv/bin/python -m pip download -q --no-deps --only-binary=:all:
                  --python-version "$DEVICE_PYTHON" --implementation cp "${platform_args[@]}")
  for name in "${SMALL[@]}"; do "${download[@]}" -d "$WHEELS/small" "$(pinned "$name")"; done
  "${download[@]}" -d "$WHEELS/whole" "$(pinned onnxruntime-gpu)"
  split_wheel "$(ls "$WHEELS"/whole/onnxruntime_gpu-*.whl)"
  rm -r "$WHEELS/whole"
}

split_wheel() {  # FILE -> $WHEELS/partK/partNN, its name and digest in $WHEELS/small
  local wheel=$1 name
  name=$(basename "$wheel")
  mkdir -p "$WHEELS/small" "$WHEELS/cut"
  echo "$name" > "$WHEELS/small/onnxruntime-gpu.name"
  (cd "$(dirname "$wheel")" && sha256sum "$name") > "$WHEELS/small/onnxruntime-gpu.sha256"
  split -b "$PART_BYTES" -d -a 2 "$wheel" "$WHEELS/cut/part"
  local parts=("$WHEELS"/cut/part*) i=0
  for part in "${parts[@]}"; do
    mkdir -p "$WHEELS/part$i" && mv "$part" "$WHEELS/part$i/"
    i=$((i + 1))
  done
  rmdir "$WHEELS/cut"
  echo "$i parts of $name; one transfer each, in this order:"
  for ((k = 0; k < i - 1; k++)); do
    echo "  $WHEELS/part$k, then there: bash tools/gpu_check.sh receive"
  done
  echo "  $WHEELS/small and $WHEELS/part$((i - 1)), then there: bash tools/gpu_check.sh run"
}

receive() {
  mkdir -p "$PARTS"
  local found=0
  for part in "$WHEELS"/part*/part*; do
    [ -f "$part" ] || continue
    cp "$part" "$PARTS/" && found=$((found + 1))
  done
  echo "received $found part(s); $PARTS holds: $(ls "$PARTS" | tr '\n' ' ')"
}

assemble() {  # the parts in $PARTS -> the wheel, its digest checked; prints its path
  local wheel sums
  wheel="$PARTS/$(cat "$WHEELS/small/onnxruntime-gpu.name")"
  sums=$(realpath "$WHEELS/small/onnxruntime-gpu.sha256")
  cat "$PARTS"/part* > "$wheel"
  (cd "$PARTS" && sha256sum --quiet -c "$sums") >&2 \
    || { echo "the wheel's parts do not add up: was a part not received?" >&2; exit 3; }
  echo "$wheel"
}

run() {
  receive
  local out=${OUT:-/tmp/medexplain-gpu-out} site=/tmp/medexplain-site wheel
  mkdir -p "$out"
  wheel=$(assemble)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheel" "$WHEELS"/small/*.whl
  # Where CUDA 13 and cuDNN 9 are NVIDIA's wheels (beside a PyTorch), they are not on the
  # loader's path: put their folders there (the service's preload looks beside
  # onnxruntime, which is installed elsewhere here).
  local libs
  libs=$("$PYTHON" -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, '**', 'lib*.so*'), recursive=True)})))" || true)
  [ -n "$libs" ] || echo "no NVIDIA library wheels beside $PYTHON: CUDA must come from the system" >&2
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PYTHON" -c "import onnxruntime as ort, sys; print('python', sys.version.split()[0], 'onnxruntime', ort.__version__, ort.get_available_providers())"
    nproc
  } 2>&1 | tee "$out/machine.txt"
  for size in 224 320; do
    "$PYTHON" tools/make_fixtures.py --bench --bench-size "$size" --bench-out "/tmp/densenet121-$size.onnx"
    "$PYTHON" tools/bench_methods.py --model "/tmp/densenet121-$size.onnx" --provider cuda \
      --threads 0 --repeat 50 --check 2>&1 | tee "$out/bench-cuda-$size.txt"
  done
}

case "${1:-}" in
  fetch) fetch ;;
  receive) receive ;;
  run) run ;;
  split) split_wheel "$2" ;;
  assemble) assemble ;;
  *) echo "usage: $0 fetch|receive|run (split FILE|assemble)" >&2; exit 2 ;;
esac
