#!/usr/bin/env bash
# The live page's browser test drives Debian's headless Chromium through chromedriver; browsers
# cannot be downloaded here, so both come from the distribution's packages. Idempotent.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium chromium-driver
