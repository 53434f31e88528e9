#!/usr/bin/env bash
# Installs the real clients the server tests drive (the `openai` package, lm-evaluation-harness,
# Playwright) from PyPI into a virtual environment under target/ (or $ZAGREUS_PY), and the browser
# the chat page is tested in (Debian's chromium; $ZAGREUS_CHROMIUM names another). Idempotent:
# nothing is done when the environment already holds tests/clients/requirements.txt.
set -euo pipefail
root_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
chromium="${ZAGREUS_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  if root_apt; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "python-clients: $chromium is missing; install Debian's chromium (or set ZAGREUS_CHROMIUM)" >&2
    exit 1
  fi
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ZAGREUS_PY:-$here/target/py}"
req="$here/tests/clients/requirements.txt"
python="${PYTHON:-python3}"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
  exit 0
fi
rm -rf "$venv"
if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
  # Debian keeps venv (ensurepip) in a package of its own; CI runs as root and installs it.
  if root_apt; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    "$python" -m venv "$venv"
  else
    echo "python-clients: $python cannot make a virtual environment; install python3-venv" >&2
    exit 1
  fi
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
echo "python-clients: $venv"
