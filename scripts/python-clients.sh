#!/usr/bin/env bash
# Installs the real clients the server tests drive (the `openai` package, lm-evaluation-harness)
# from PyPI into a virtual environment under target/ (or $ZAGREUS_PY). Idempotent: nothing is
# done when the environment already holds tests/clients/requirements.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ZAGREUS_PY:-$here/target/py}"
req="$here/tests/clients/requirements.txt"
python="${PYTHON:-python3}"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
  exit 0
fi
if ! "$python" -m venv --help >/dev/null 2>&1; then
  echo "python-clients: $python cannot make virtual environments; install python3-venv" >&2
  exit 1
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
echo "python-clients: $venv"
