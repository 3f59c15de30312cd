#!/bin/sh
# Install img2dataset (the baseline of bench_download.py) into its own venv, .venv-bench: it pins
# its own versions of pyarrow, webdataset, opencv and albumentations, which must not touch .venv.
# Idempotent: does nothing when .venv-bench already runs img2dataset.
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VERSION="1.47.0"
if .venv-bench/bin/python -c "import img2dataset" >/dev/null 2>&1; then
    exit 0
fi
echo "installing img2dataset==$VERSION into .venv-bench (baseline for the download benchmark)"
"$PYTHON" -m venv .venv-bench
.venv-bench/bin/python -m pip install --quiet --upgrade "pip>=24"
.venv-bench/bin/python -m pip install --quiet "img2dataset==$VERSION"
.venv-bench/bin/python -c "import img2dataset"
