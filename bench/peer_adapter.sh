#!/usr/bin/env bash
# Adapter for ../shared/bench (run_matrix.sh --new-cmd 'bash bench/peer_adapter.sh'): $1 job, $2 out.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${TW_PYTHON:-$HERE/../.venv/bin/python}" -B "$HERE/peer_adapter.py" "$1" "$2"
