#!/usr/bin/env bash
# README command 2: the whole test suite on the CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export SSS_HOME="${SSS_HOME:-$(mktemp -d)}"   # tests never touch the user's weights cache
exec "${SSS_VENV:-$root/.venv}/bin/python" -m pytest "$@"
