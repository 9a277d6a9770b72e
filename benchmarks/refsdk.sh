#!/usr/bin/env bash
# Create benchmarks/.venv-ref with the reference SDK (avtomatika-worker 1.0b3),
# only if it is missing or broken. Idempotent; prints the interpreter path.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-ref"
pin="avtomatika-worker==1.0b3"
py="${PYTHON:-python3}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import avtomatika_worker" 2>/dev/null; then
    echo "$venv/bin/python"
    exit 0
fi

echo "refsdk: creating $venv with $pin" >&2
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pin" >&2
"$venv/bin/python" -c "import avtomatika_worker" >&2
echo "$venv/bin/python"
