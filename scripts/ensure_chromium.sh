#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium is at /usr/bin/chromium, for the report's browser
# test (tests/test_audit_report.py). Installs it with apt-get when missing; needs root (or sudo).
# Non-interactive; safe to run again (does nothing when chromium is already there).
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    "$CHROMIUM" --version 2>/dev/null || true
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "ensure_chromium: $CHROMIUM is missing and this user cannot install packages (not root, no sudo)." >&2
    echo "ensure_chromium: install it with: apt-get install chromium" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: $CHROMIUM is missing and apt-get is not available; install Chromium by hand." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
"$CHROMIUM" --version
