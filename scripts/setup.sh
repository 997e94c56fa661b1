#!/usr/bin/env bash
# Create .venv (if missing) and install ca-flow with its stack. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip, quiet; its stderr shown in full when it fails, else without the notices a pip config naming local
# package mirrors (extra-index-url file:///...) prints for every project a mirror does not hold.
MIRROR_NOTICE="^WARNING: Location 'file://[^']*' is ignored: it is neither a file nor a directory\.$"
pip_install() {
    local err
    err=$(mktemp)
    if ! python -m pip install -q "$@" 2>"$err"; then
        cat "$err" >&2
        rm -f "$err"
        return 1
    fi
    grep -v "$MIRROR_NOTICE" "$err" >&2 || true
    rm -f "$err"
}

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip_install --upgrade pip
# torch first and pinned: these builds are on this disk, and open_clip needs the matching torchvision.
pip_install torch==2.14.1 torchvision==0.29.1
pip_install -e ".[test]"
