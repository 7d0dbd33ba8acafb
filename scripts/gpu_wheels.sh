#!/usr/bin/env bash
# Download into DIR the wheels that the lent GPU machine lacks, for its Python (3.12, manylinux x86-64): it has
# no package registry, so they travel with the repository and install there with --no-index --target (README,
# "What was measured"). One version of each: two versions of one name stop the whole `pip install .whl/*.whl`.
#   bash scripts/gpu_wheels.sh .whl                          # for the GPU machine
#   GPU_WHEELS_PYTHON=3.11 bash scripts/gpu_wheels.sh DIR    # the same names and versions for another Python
#                                                            # (the dry run: tests/test_gpu_scripts.py)
# The list is the closure of pyproject.toml's runtime dependencies (and accelerate, for HF Trainer) less what
# the machine holds (the workplace's list of its packages, read 2026-11-17): every name below is missing there,
# and so is each one's own dependency that the machine lacks. Versions are the ones this repository's tests run.
# typing-extensions is there, but pydantic 2.14 needs >= 4.16 and the machine's version is unknown: a newer
# typing-extensions first on PYTHONPATH is harmless to the rest (it only adds names).
set -euo pipefail
DIR=${1:?usage: bash scripts/gpu_wheels.sh DIR}
PY=${GPU_WHEELS_PYTHON:-3.12}
WHEELS=(
  jsonargparse==4.53.0          # LightningCLI, with its [signatures] extra:
  docstring-parser==0.18.0
  typeshed-client==2.15.0
  zstandard==0.25.0             # .zst corpora (compiled)
  fastapi==0.165.0              # `mlm-lightning serve` (imported by the CLI's serve command), with:
  starlette==1.10.0
  pydantic==2.14.4
  pydantic-core==2.50.5         # (compiled; pydantic pins this exact version)
  annotated-types==0.8.0
  typing-inspection==0.4.5
  opentelemetry-api==1.45.3
  typing-extensions==4.16.0
  uvicorn==0.55.0
  httptools==0.9.0              # (compiled)
)
mkdir -p "$DIR"
# a wheel of another version left from an earlier list would be installed beside the new one
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; file=${name//-/_}
  find "$DIR" -maxdepth 1 -iname "${file}-*.whl" ! -iname "${file}-${spec##*==}-*" -delete
done
# pip matches each manylinux tag exactly: name the ones these projects publish; `any` wheels match as well
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither a file" >&2)
ls -l "$DIR"/*.whl | awk '{ s += $5; n++ } END { printf "gpu_wheels: %d wheels, %.1f MB in '"$DIR"' (Python '"$PY"')\n", n, s / 1e6 }'
