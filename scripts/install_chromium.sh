#!/usr/bin/env bash
# Install Debian's headless-capable Chromium, for the browser tests (tests/test_report.py and friends).
#
# Idempotent: does nothing when a `chromium` (or `chromium-browser`) binary is already on PATH.
# Needs root (or passwordless sudo) and a Debian/Ubuntu apt. It only installs the package: the tests
# start their own headless browser with a fresh profile in a temporary folder and stop it afterwards.
#
#   scripts/install_chromium.sh            # install if missing
#   scripts/install_chromium.sh --check    # exit 0 when installed, 1 when not; installs nothing
set -euo pipefail

find_chromium() {
    command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null
}

if path=$(find_chromium); then
    echo "install_chromium: chromium is already installed ($path)"
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    echo "install_chromium: no chromium binary on PATH" >&2
    exit 1
fi

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install_chromium: need root or passwordless sudo to apt-get install chromium" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get here; install Chromium by hand (a 'chromium' binary on PATH)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Package lists may be missing on a fresh container; refresh them only then (or when install fails).
# fonts-dejavu-core gives headless pages a font to draw text with.
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; then
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi

if path=$(find_chromium); then
    echo "install_chromium: installed $("$path" --version 2>/dev/null || echo chromium) at $path"
else
    echo "install_chromium: apt-get finished but no chromium binary is on PATH" >&2
    exit 1
fi
