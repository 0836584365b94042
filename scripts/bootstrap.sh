#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv. Idempotent: it reinstalls only
# when pyproject.toml or this script changed. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SSS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.sss-stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "Setting up $venv (first run takes a few minutes)..." >&2
"$python" -c 'import sys; assert sys.version_info >= (3, 10), "SSS needs Python >= 3.10"'
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip wheel setuptools
# torch first: sam2's build imports it. These versions lie on the project's build machines' disk.
"${pip[@]}" install -q "torch==2.14.1" "torchvision==0.29.1"
# sam2 compiles an optional CUDA extension; we build it without (its Python fallback is used).
SAM2_BUILD_CUDA=0 "${pip[@]}" install -q --no-build-isolation "sam2==1.1.0"
"${pip[@]}" install -q -e "$root[models,server,test]"
echo "$want" > "$stamp"
