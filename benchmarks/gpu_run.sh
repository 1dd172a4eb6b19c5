#!/usr/bin/env bash
# Build, test and benchmark on a CUDA GPU machine that has its own torch, triton and pytest
# (pytest-benchmark too) but no network, in a few calls of at most 10 minutes each:
#
#   bash benchmarks/gpu_run.sh wheels    # here, with network: the report's peers as wheels in .whl/
#   bash benchmarks/gpu_run.sh test      # there: the CUDA tests and the sm_90 compile check
#   bash benchmarks/gpu_run.sh report    # there: python -m benchmarks.report --device cuda
#   bash benchmarks/gpu_run.sh suites    # there: the four pytest-benchmark suites on CUDA
#
# Each GPU stage builds the C++ library for that machine's torch when it does not import yet,
# installs the wheels of .whl/ (POT, GeomLoss, KeOps) when present, and leaves its log and a
# tarball of what it wrote under $OUT (build/gpu-run by default). A step that runs past its time
# limit is cut off and what it wrote so far is still packed; the stage exits non-zero if any
# step failed. With the device tool: carry [".whl"], one stage per call.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
case "$stage" in
wheels | test | report | suites) ;;
*) echo "usage: bash benchmarks/gpu_run.sh wheels|test|report|suites" >&2; exit 2 ;;
esac
OUT=${OUT:-build/gpu-run}
PYTHON=${PYTHON:-python3}

if [ "$stage" = wheels ]; then
    # The GPU image's Python is 3.12; pykeops and keopscore are pure Python, built from sdists.
    rm -rf .whl && mkdir .whl
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "pot==0.9.7.post1" "geomloss==0.3.1"
    "$PYTHON" -m pip wheel -q --no-deps -w .whl "pykeops==2.3" "keopscore==2.3"
    ls -l .whl
    exit 0
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/$stage.log") 2>&1
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PYTHON" -c "import mlot_kernels" 2>/dev/null; then
    MAX_JOBS=16 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$PYTHON" - <<'EOF'
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print(gpu, "| torch", torch.__version__, "| triton", triton.__version__, "| CUDA", torch.version.cuda)
EOF

pack() {
    tar czf "/tmp/$stage.tgz" --exclude='*.tgz' --exclude='*.log' -C "$OUT" . && mv "/tmp/$stage.tgz" "$OUT/"
}
trap pack EXIT
failed=0
step() {  # run a step; remember a failure and go on
    "$@" || { echo "FAILED ($?): $*"; failed=1; }
}

case "$stage" in
test)
    # -rs lists every skip: on a GPU, none of the CUDA tests may be skipped.
    step timeout 420 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_sinkhorn_cuda.py \
        tests/test_topk_probs_cuda.py tests/test_loss_cuda.py --junitxml="$OUT/cuda-tests.xml"
    step env -u TRITON_INTERPRET timeout 240 "$PYTHON" -m benchmarks.kernel_resources --quick \
        --json "$OUT/kernel-resources-quick.json" --out "$OUT/kernel-resources-quick.md" >/dev/null
    ;;
report)
    step timeout 560 "$PYTHON" -m benchmarks.report --device cuda --out "$OUT"
    ;;
suites)
    tag=$("$PYTHON" -c "from benchmarks.report import tag; print(tag('cuda'))")
    for suite in sinkhorn topk_probs loss loss_cost; do
        step timeout 180 env MLOT_BENCH_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider \
            "benchmarks/test_$suite.py" --benchmark-json "$OUT/$tag-${suite//_/-}.json"
    done
    ;;
esac
exit $failed
