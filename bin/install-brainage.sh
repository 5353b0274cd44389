#!/usr/bin/env bash
# Install brainage from this checkout into one Python environment, then check that everything the
# app needs at run time is inside it (no download ever happens at run time).
#
# This is the one install recipe of the container image: the Dockerfile runs it, and .ci/run runs
# it in a fresh virtual environment (tests/test_install_script.py checks its pieces), so the
# image's steps are exercised even where Docker cannot build.
#
# Usage:   bin/install-brainage.sh cpu|cuda
#   cpu    torch <pin>+cpu from the PyTorch CPU index (no CUDA libraries)
#   cuda   torch <pin> from PyPI, whose Linux x86_64 wheel is the CUDA 13.0 build
#          (it requires cuda-toolkit 13.0.x; NVIDIA driver >= 580 on the host)
# <pin> is the torch version in constraints.txt; every other package is installed under the same
# constraints, so no dependency can swap torch for another build.
#
# Environment:
#   PYTHON                     interpreter of the target environment (default: python3 on PATH)
#   BRAINAGE_TORCH_INDEX_URL   another index for the torch wheel (a mirror, or another CUDA
#                              build, e.g. https://download.pytorch.org/whl/cu126 together with
#                              BRAINAGE_TORCH_LOCAL=cu126)
#   BRAINAGE_TORCH_LOCAL       local version label of the torch wheel (default: cpu for cpu,
#                              none for cuda)
#
# Exit codes: 0 installed and checked, 64 usage error, anything else: the failing step's code.
set -euo pipefail

usage() {
    awk '/^# Usage:/{on=1} /^# Environment:/{on=0} on' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

[[ $# -eq 1 ]] || usage
variant=$1
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

torch_version=$(sed -n 's/^torch==\([0-9][0-9.]*\)[[:space:]]*$/\1/p' "$src/constraints.txt")
if [[ -z $torch_version ]]; then
    echo "install-brainage: no 'torch==X.Y.Z' line in $src/constraints.txt" >&2
    exit 64
fi
case $variant in
    cpu)  index=https://download.pytorch.org/whl/cpu; local_label=${BRAINAGE_TORCH_LOCAL-cpu} ;;
    cuda) index=https://pypi.org/simple;              local_label=${BRAINAGE_TORCH_LOCAL-} ;;
    *)    echo "install-brainage: unknown torch variant '$variant' (use cpu or cuda)" >&2; usage ;;
esac
index=${BRAINAGE_TORCH_INDEX_URL:-$index}
torch_req="torch==$torch_version${local_label:++$local_label}"

step() { printf '\n== install-brainage: %s\n' "$*" >&2; }

step "$("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
step "$torch_req from $index"
"$python" -m pip install --no-cache-dir --index-url "$index" "$torch_req"

# A clean copy of exactly what the package is built from: a checkout's stale build/ or
# *.egg-info must not leak into the installed package.
stage=$(mktemp -d "${TMPDIR:-/tmp}/brainage-src.XXXXXX")
trap 'rm -rf "$stage"' EXIT
for item in pyproject.toml setup.cfg README.md constraints.txt bidsapp training models; do
    cp -R "$src/$item" "$stage/"
done
find "$stage" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +

step "brainage and its dependencies (constraints.txt)"
"$python" -m pip install --no-cache-dir -c "$stage/constraints.txt" "$stage"
# zennit without its dependencies: it declares torchvision, which would replace torch (setup.cfg)
"$python" -m pip install --no-cache-dir --no-deps zennit==0.5.1
# pip check, less the one known gap: zennit declares torchvision, which brainage never imports
if ! report=$("$python" -m pip check 2>&1); then
    unexpected=$(grep -v '^zennit [0-9.]* requires torchvision, which is not installed\.$' <<<"$report" || true)
    if [[ -n $unexpected ]]; then
        printf '%s\n' "$unexpected" >&2
        exit 1
    fi
fi

step "checking the installed environment (offline assets, torch build)"
# -I: isolated, so the checkout (the current folder) cannot shadow the installed package
"$python" -I - "$variant" "$torch_version" <<'EOF'
"""Everything the app reads at run time must already be installed: fail the install otherwise."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

variant, torch_version = sys.argv[1:3]

import torch  # noqa: E402

problems = []
if torch.__version__.split("+")[0] != torch_version:
    problems.append(f"torch {torch.__version__} is installed, constraints.txt pins {torch_version}")
if (torch.version.cuda is None) != (variant == "cpu"):
    problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) is not the {variant} build")

import deepbet.utils  # noqa: E402
from nilearn import datasets  # noqa: E402

from bidsapp.atlases import harvard_oxford_files, neuromorphometrics_files  # noqa: E402
from bidsapp.inference.registry import available_models, models_dir, verify_models  # noqa: E402
from bidsapp.templates import get_template  # noqa: E402

files = [Path(deepbet.utils.DATA_PATH) / "models" / name for name in ("model.pt", "bbox_model.pt")]
files += [Path(p) for p in (datasets.MNI152_FILE_PATH, datasets.GM_MNI152_FILE_PATH,
                            datasets.WM_MNI152_FILE_PATH)]
files += [*harvard_oxford_files(), *neuromorphometrics_files()]
problems += [f"missing run-time file {path}" for path in files if not path.is_file()]
get_template(2.0)  # reads and resamples the bundled MNI152 template
cards = verify_models(sorted(available_models()))  # sha256 of every shipped weight file
for tool in ("brainage", "bids-validator-deno"):
    exe = shutil.which(tool, path=str(Path(sys.executable).parent))
    if exe is None:
        problems.append(f"{tool} is not installed next to {sys.executable}")
        continue
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False,
                          env={**os.environ, "NO_COLOR": "1"})
    if proc.returncode != 0:
        problems.append(f"{tool} --version failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    else:
        print(f"{tool}: {proc.stdout.strip()}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); models in {models_dir()}: "
      f"{', '.join(cards) or 'none shipped'}")
if problems:
    sys.exit("install-brainage: the installed environment is incomplete:\n  " + "\n  ".join(problems))
EOF
step "done"
