#!/usr/bin/env bash
# The dry run of the GPU check: `scripts/gpu_check.sh --cpu` in a fresh venv that holds only what the lent GPU
# machine holds, with the wheels of scripts/gpu_wheels.sh added the way the README installs them there
# (`pip install --no-index --no-deps --target DIR`, DIR on PYTHONPATH). A module that the machine lacks and the
# wheels do not bring fails the preflight here, not in the GPU machine's one chance.
#   bash scripts/gpu_dry_run.sh [gpu_check.py options]    # tests/test_gpu_scripts.py runs it (slow)
# Differences from the machine, on purpose: this machine's Python (3.11; the wheels are fetched for it, same names
# and versions) and torch 2.13.0 CPU (the wheel on disk; the machine has 2.11+cu130). The venv is kept, keyed by
# its package list, in ~/.cache/mlm-lightning (GPU_DRY_RUN_VENV to choose): building it takes a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."
# The machine's packages (the workplace's list, read there 2026-11-17): whatever else pip brings in is removed.
GPU_MACHINE="
  absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
  charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
  cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
  flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
  huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
  jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
  llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
  multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
  nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
  nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
  nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
  opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
  prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
  pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
  pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
  scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
  statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
  tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
  triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
  zipp
"
# What the project needs of them, at the machine's versions where they are known (its pip list, 2026-11)
INSTALL=(torch==2.13.0 lightning==2.6.6 transformers==5.17.0 tokenizers==0.23.2 torchmetrics==1.9.0
         safetensors==0.8.0 huggingface_hub==1.33.0 accelerate==1.15.0 numpy filelock matplotlib pyarrow fsspec
         aiohttp tqdm uvloop pyyaml packaging)
PY=${GPU_DRY_RUN_PYTHON:-python3}
key=$(printf '%s\n' "$("$PY" -V)" "${INSTALL[*]}" "$GPU_MACHINE" | sha1sum | cut -c1-12)
VENV=${GPU_DRY_RUN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mlm-lightning/gpu-like-$key}
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file" >&2); }  # this machine's pip config's noise
if [ ! -f "$VENV/.complete" ]; then  # (a venv cut short while building is built again)
  echo "gpu_dry_run: building $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  quiet "$VENV/bin/python" -m pip install -q "${INSTALL[@]}"
  extra=$("$VENV/bin/python" -c '
import importlib.metadata as md, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
machine = {norm(n) for n in sys.argv[1].split()}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in md.distributions()} - machine)))' "$GPU_MACHINE")
  if [ -n "$extra" ]; then
    echo "gpu_dry_run: not on the GPU machine, removed: $extra"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip uninstall -q -y $extra
  fi
  touch "$VENV/.complete"
fi
WHEELS="$VENV/.whl"  # the same names and versions as for the GPU machine, for this venv's Python
GPU_WHEELS_PYTHON=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
  bash scripts/gpu_wheels.sh "$WHEELS"
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
quiet "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl
# only the venv and the carried wheels: no user site, no PYTHONPATH of the caller's
PYTHONNOUSERSITE=1 PYTHONPATH="$SITE" PYTHON="$VENV/bin/python" bash scripts/gpu_check.sh --cpu "$@"
