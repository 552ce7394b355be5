#!/usr/bin/env bash
# Debian's chromium, for the book's test (it opens the built pages in a headless browser).
# Run by `make test`; a no-op where chromium is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "browser: installing Debian's chromium (headless browser for the book's test)"
    apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null
else
    echo "browser: chromium not found; the book's test needs it (Debian: apt-get install chromium)"
fi
