#!/usr/bin/env bash
# Debian's chromium + chromium-driver, for the dashboard's browser tests and benchmark (as root, like
# the SLURM packages in scripts/slurm/cluster.sh). Selenium drives them as they are: no driver download.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
[[ $EUID -eq 0 ]] || { echo "install_browser.sh must run as root: apt-get install chromium chromium-driver" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
echo "[browser] installing chromium chromium-driver"
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
