#!/usr/bin/env bash
# Create (once) a separate virtualenv holding olah, the Hub-compatible mirror server the Hub tests
# start on 127.0.0.1, and print the path of its python. olah needs huggingface_hub >= 1.27, which
# must not leak into the main environment (the transformers 4.57 CI job pins huggingface_hub < 1.0).
# Usage: .ci/olah_env.sh [VENV_DIR]
#   VENV_DIR    where to put the virtualenv (default: $OLAH_VENV, else /tmp/olah-venv)
#   OLAH_SPEC   pip requirement for olah (default: olah==0.5.4)
set -euo pipefail
venv="${1:-${OLAH_VENV:-/tmp/olah-venv}}"
spec="${OLAH_SPEC:-olah==0.5.4}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import olah" >/dev/null 2>&1; then
    "$py" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec" >&2
fi
"$venv/bin/python" -c "import olah" >&2
echo "$venv/bin/python"
