#!/usr/bin/env bash
# Everything a fresh Debian machine needs for edgedance development: apt packages,
# a .venv, the package with its extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(mosquitto mosquitto-clients portaudio19-dev libsndfile1 pulseaudio pulseaudio-utils
              libasound2-plugins chromium ffmpeg sox systemd)
EXTRAS="${EXTRAS:-device,train,dev}"
PYTHON="${PYTHON:-python3}"

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's mosquitto package may start a system broker on 1883; ours run on their own ports.

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.edgedance-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "setup: pip install -e .[$EXTRAS]"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[$EXTRAS]"
  rm -f .venv/.edgedance-*
  touch "$stamp"
fi
echo "setup: ok (.venv ready, extras: $EXTRAS)"
