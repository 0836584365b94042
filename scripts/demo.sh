#!/usr/bin/env bash
# README command 1: segment the bundled lung CT sample from one box prompt (offline, CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "${SSS_VENV:-$root/.venv}/bin/python" -m sss_lib demo "$@"
