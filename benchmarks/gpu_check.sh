#!/usr/bin/env bash
# The CUDA backend's checks, for a machine with an NVIDIA GPU (a lent one has no
# internet: whatever Python packages it lacks must come from a wheelhouse carried with
# the working tree). Usage, from anywhere:
#
#   bash benchmarks/gpu_check.sh                           # tests, then bench_kernels.py
#   KERNELMESH_WHEELHOUSE=wh bash benchmarks/gpu_check.sh   # install from ./wh first
#
# A wheelhouse is made on a networked machine with the GPU machine's Python version:
#   pip download -d wh numpy numba pytest pytest-timeout hypothesis pycuda cupy-cuda13x \
#       nvidia-cuda-nvcc
# (pycuda is an sdist: building it needs cuda.h, from nvidia-cuda-runtime or a toolkit,
# and the driver's libcuda.so, which the GPU machine has.)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || echo "nvidia-smi not found"
"$PY" --version

if [ -n "${KERNELMESH_WHEELHOUSE:-}" ]; then
  echo "== offline install from $KERNELMESH_WHEELHOUSE"
  "$PY" -m pip install -q --no-index --find-links "$KERNELMESH_WHEELHOUSE" \
    numpy numba pytest pytest-timeout hypothesis pycuda cupy-cuda13x nvidia-cuda-nvcc \
    || echo "some packages did not install; the checks below say which are missing"
fi

# Without an installed kernelmesh, import it from this tree through a shim package.
if ! "$PY" -c "import kernelmesh.native.cuda" 2>/dev/null; then
  shim=$(mktemp -d)
  mkdir -p "$shim/kernelmesh"
  for part in core native services clients; do ln -s "$PWD/$part" "$shim/kernelmesh/$part"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== what the CUDA backend finds"
"$PY" - <<'PYEOF'
import importlib
for name in ("numpy", "numba", "pytest", "pycuda", "cupy"):
    try:
        module = importlib.import_module(name)
        print(f"{name:8} {getattr(module, '__version__', 'present')}")
    except Exception as exc:
        print(f"{name:8} MISSING ({type(exc).__name__}: {exc})")
from kernelmesh.native import cuda
print("nvcc    ", cuda.find_nvcc())
print("usable  ", cuda.available() or "yes")
for device in cuda.devices():
    print(device.name, device.properties.model, device.properties.fingerprint,
          "cupy:", device.cupy_missing or "yes")
PYEOF

echo "== tests"
"$PY" -m pytest -q -p no:cacheprovider -rs tests/native/test_cuda_sources.py tests/native/test_cuda.py
status=$?

echo "== benchmark"
if [ -f benchmarks/bench_kernels.py ]; then
  # every backend found (cpu beside cuda, plus the cuBLAS/device-copy bounds);
  # KERNELMESH_BENCH_ARGS="--quick" or "--only matmul,fft" narrows it
  "$PY" benchmarks/bench_kernels.py ${KERNELMESH_BENCH_ARGS:-} || status=1
else
  echo "benchmarks/bench_kernels.py not present: skipped"
fi
exit $status
