#!/usr/bin/env bash
# Install what tests/test_browser.py needs: Debian's `chromium` (apt) and the Python
# Playwright driver (pip, the project's `test` extra). Playwright drives the system browser
# through `executable_path=/usr/bin/chromium`; its own browser download (`playwright install`)
# is never used. Re-runnable: skips what is already there. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! [ -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation
fi
# The driver is in the project's `test` extra (scripts/setup.sh); this covers a venv set up
# without it.
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install "playwright>=1.45"
fi
echo "browser: $(/usr/bin/chromium --version)"
