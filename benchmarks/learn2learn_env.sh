#!/usr/bin/env bash
# A separate virtual environment holding learn2learn 0.2.0 beside fewshot, for
# benchmarks/maml_vs_learn2learn.py. Kept out of the project's own environment
# and dependencies: learn2learn imports torchvision, and PyPI's torchvision does
# not import beside the project's torch 2.13.0 (CPU).
#
#   bash benchmarks/learn2learn_env.sh [DIR]      # DIR defaults to .venv-learn2learn
#   DIR/bin/python benchmarks/maml_vs_learn2learn.py
#
# What it takes, and why:
# - torch 2.14.1 with torchvision 0.29.1, a pair that imports together (on
#   x86_64 a CUDA build, about 5.5 GB, which runs on the CPU as well);
# - learn2learn 0.2.0 from its source distribution, with its Cython files
#   regenerated: the C files it ships were made by an old Cython and do not
#   compile on Python 3.11 (longintrepr.h is gone), so Cython < 3 rebuilds them;
# - fewshot itself, editable, on that torch (it asks only torch>=2.4).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-.venv-learn2learn}"

python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q 'cython<3' setuptools wheel

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# --no-build-isolation: its metadata is prepared with the Cython above, not one compiled from source
pip download -q --no-deps --no-binary learn2learn --no-build-isolation learn2learn==0.2.0 -d "$work"
tar xzf "$work/learn2learn-0.2.0.tar.gz" -C "$work"
(cd "$work/learn2learn-0.2.0" && cython -3 learn2learn/data/meta_dataset.pyx \
    learn2learn/data/task_dataset.pyx learn2learn/data/transforms.pyx)
pip install -q --no-build-isolation "$work/learn2learn-0.2.0"
pip install -q -e "$root"

python -c "import learn2learn, torch, torchvision, fewshot; \
print('learn2learn', learn2learn.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
