#!/usr/bin/env bash
# Install the edgedance device on a Raspberry Pi (Raspberry Pi OS / Debian, 64-bit): a venv with
# the `device` extra only (numpy, LiteRT, paho-mqtt, PyAudio, soundfile; never TensorFlow),
# the model bundle, /etc/edgedance/device.ini, and the systemd unit, enabled and started.
#
#   sudo deploy/install.sh                                  # on the Pi, from a checkout
#   deploy/install.sh --ssh pi@raspberrypi.local -- --device-id pi-livingroom --mqtt-host broker.local
#   deploy/install.sh --prefix /tmp/try --no-apt --no-systemd   # a throwaway tree, as the tests do
#   deploy/install.sh --pack edgedance-src.tar.gz           # for first boot (deploy/firstboot/)
#
# Run again to upgrade: the venv is reused, an existing device.ini is kept (the new example goes
# beside it as device.ini.new), the bundle is replaced. Offline installs: --pip-args passes
# options to pip, e.g. --pip-args "--no-index --find-links /media/usb/wheels".
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=""
BUNDLE=""
CONFIG=""
DEVICE_ID=""
MQTT_HOST=""
MQTT_PORT=""
MQTT_PASSWORD_FILE=""
PYTHON="${PYTHON:-python3}"
PIP_ARGS=""
SELFTEST_ARGS=""
RUN_USER="edgedance"
DO_APT=1
DO_SYSTEMD=1
DO_USER=1
SSH_TARGET=""
PACK=""

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --prefix DIR              install under DIR (DIR/opt/edgedance, DIR/etc/edgedance, DIR/etc/systemd/system);
                            implies no user creation and no systemctl calls
  --bundle DIR              model bundle to install (default: models/default of this checkout)
  --config FILE             device.ini to install (default: deploy/device.ini, only if none is there yet)
  --device-id ID            set [device] id (and the MQTT user device-ID) in a newly written device.ini
  --mqtt-host HOST          set [mqtt] host in a newly written device.ini
  --mqtt-port PORT          set [mqtt] port in a newly written device.ini
  --mqtt-password-file F    install F as /etc/edgedance/mqtt.password (0640, group of the service user)
  --python PY               interpreter for the venv (default python3, needs >= 3.11)
  --pip-args "ARGS"         extra arguments for pip install (offline: "--no-index --find-links DIR")
  --selftest-args "ARGS"    extra arguments for the selftest run at the end (e.g. "--max-cpu-ms 200")
  --user NAME               service user (default edgedance; created, member of group audio)
  --no-apt                  do not apt-get install the system packages (portaudio, libsndfile, ...)
  --no-systemd              install the unit file but do not enable or start it
  --ssh USER@HOST [-- ARGS] copy this checkout to HOST and run install.sh there with sudo and ARGS
  --pack OUT.tar.gz         write the sources (+ --bundle) as one tarball for first-boot installs
  -h, --help                this text
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$(realpath -m "$2")"; shift 2 ;;
    --bundle) BUNDLE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --device-id) DEVICE_ID="$2"; shift 2 ;;
    --mqtt-host) MQTT_HOST="$2"; shift 2 ;;
    --mqtt-port) MQTT_PORT="$2"; shift 2 ;;
    --mqtt-password-file) MQTT_PASSWORD_FILE="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --pip-args) PIP_ARGS="$2"; shift 2 ;;
    --selftest-args) SELFTEST_ARGS="$2"; shift 2 ;;
    --user) RUN_USER="$2"; shift 2 ;;
    --no-apt) DO_APT=0; shift ;;
    --no-systemd) DO_SYSTEMD=0; shift ;;
    --ssh) SSH_TARGET="$2"; shift 2 ;;
    --pack) PACK="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
REMOTE_ARGS=("$@")

[ -z "$BUNDLE" ] && [ -d "$SRC/models/default" ] && BUNDLE="$SRC/models/default"
SOURCES=(setup.cfg pyproject.toml README.md device broker subscribers converter trainer deploy)

# --- modes that do not install here -------------------------------------------------------
if [ -n "$PACK" ]; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/edgedance"
  (cd "$SRC" && tar --exclude='__pycache__' -cf - "${SOURCES[@]}") | tar -xf - -C "$tmp/edgedance"
  if [ -n "$BUNDLE" ]; then mkdir -p "$tmp/edgedance/models"; cp -r "$BUNDLE" "$tmp/edgedance/models/default"; fi
  tar -czf "$PACK" -C "$tmp" edgedance
  echo "install.sh: wrote $PACK (sources${BUNDLE:+ + bundle $BUNDLE}); see deploy/firstboot/"
  exit 0
fi
if [ -n "$SSH_TARGET" ]; then
  command -v ssh >/dev/null || die "--ssh needs the ssh client"
  remote="/tmp/edgedance-install"
  echo "install.sh: copying the sources to $SSH_TARGET:$remote"
  ssh "$SSH_TARGET" "rm -rf $remote && mkdir -p $remote"
  (cd "$SRC" && tar --exclude='__pycache__' -czf - "${SOURCES[@]}" ${BUNDLE:+-C "$(dirname "$BUNDLE")" "$(basename "$BUNDLE")"}) \
    | ssh "$SSH_TARGET" "tar -xzf - -C $remote"
  bargs=()
  [ -n "$BUNDLE" ] && bargs=(--bundle "$remote/$(basename "$BUNDLE")")
  exec ssh -t "$SSH_TARGET" "sudo bash $remote/deploy/install.sh ${bargs[*]} ${REMOTE_ARGS[*]}"
fi

# --- where things go --------------------------------------------------------------------------
APP="$PREFIX/opt/edgedance"
ETC="$PREFIX/etc/edgedance"
UNIT_DIR="$PREFIX/etc/systemd/system"
VENV="$APP/venv"
if [ -n "$PREFIX" ]; then DO_USER=0; DO_SYSTEMD=0; fi
SUDO=""
[ -z "$PREFIX" ] && [ "$(id -u)" -ne 0 ] && die "run as root (sudo), or give --prefix DIR for a private tree"

[ -n "$BUNDLE" ] || die "no model bundle: give --bundle DIR (a folder with model.tflite + manifest.json)"
[ -f "$BUNDLE/manifest.json" ] && [ -f "$BUNDLE/model.tflite" ] \
  || die "--bundle $BUNDLE: not a model bundle (needs model.tflite and manifest.json)"
[ -z "$CONFIG" ] || [ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
[ -z "$MQTT_PASSWORD_FILE" ] || [ -f "$MQTT_PASSWORD_FILE" ] || die "--mqtt-password-file $MQTT_PASSWORD_FILE: no such file"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
  || die "$PYTHON is missing or older than 3.11 (Raspberry Pi OS Bookworm has 3.11)"

# --- system packages ---------------------------------------------------------------------------
if [ "$DO_APT" = 1 ]; then
  # portaudio19-dev + python3-dev + gcc build PyAudio (no ARM wheels); libsndfile1 for soundfile.
  APT=(python3-venv python3-dev gcc portaudio19-dev libsndfile1 alsa-utils)
  echo "install.sh: apt-get install ${APT[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT[@]}"
fi

# --- user ------------------------------------------------------------------------------------------
if [ "$DO_USER" = 1 ]; then
  if ! id "$RUN_USER" >/dev/null 2>&1; then
    echo "install.sh: creating system user $RUN_USER (groups: audio)"
    useradd --system --home-dir /opt/edgedance --no-create-home --shell /usr/sbin/nologin \
            --user-group --groups audio "$RUN_USER"
  else
    usermod -a -G audio "$RUN_USER"
  fi
fi

# --- venv + the device extra -------------------------------------------------------------------------
mkdir -p "$APP" "$ETC" "$UNIT_DIR"
if [ ! -x "$VENV/bin/python" ]; then
  echo "install.sh: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# Build from a private copy: pip's in-tree build would leave build/ and *.egg-info in the checkout.
stage="$(mktemp -d)"; trap 'rm -rf "$stage"' EXIT
(cd "$SRC" && tar --exclude='__pycache__' --exclude='*.egg-info' -cf - "${SOURCES[@]}") | tar -xf - -C "$stage"
echo "install.sh: pip install edgedance[device] ${PIP_ARGS}"
# shellcheck disable=SC2086  # PIP_ARGS is a list of options on purpose
"$VENV/bin/pip" install -q --disable-pip-version-check $PIP_ARGS "$stage[device]"
if compgen -G "$VENV/lib/python3*/site-packages/tensorflow" >/dev/null; then
  die "TensorFlow ended up in $VENV: the device extra must never pull it (check setup.cfg)"
fi

# --- bundle, config, password -------------------------------------------------------------------------
rm -rf "$APP/models/default.new"
mkdir -p "$APP/models"
cp -r "$BUNDLE" "$APP/models/default.new"
rm -rf "$APP/models/default"
mv "$APP/models/default.new" "$APP/models/default"
echo "install.sh: bundle $BUNDLE -> $APP/models/default"

new_ini="$(mktemp)"
cp "${CONFIG:-$SRC/deploy/device.ini}" "$new_ini"
setkey() {  # setkey SECTION KEY VALUE: set a key inside its section of $new_ini
  "$VENV/bin/python" - "$new_ini" "$1" "$2" "$3" <<'PY'
import re, sys
path, sec, key, val = sys.argv[1:]
text = open(path).read()
m = re.search(rf"^\[{re.escape(sec)}\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
if m is None:  # no such section yet: add it
    open(path, "w").write(text.rstrip("\n") + f"\n\n[{sec}]\n{key} = {val}\n")
    sys.exit(0)
body = m.group(1)
line = f"{key} = {val}"
body2, n = re.subn(rf"^{re.escape(key)}\s*=.*$", line, body, flags=re.M)
if not n:
    body2 = "\n" + line + body
open(path, "w").write(text[:m.start(1)] + body2 + text[m.end(1):])
PY
}
setkey device bundle "/opt/edgedance/models/default"
[ -n "$DEVICE_ID" ] && { setkey device id "$DEVICE_ID"; setkey mqtt username "device-$DEVICE_ID"; }
[ -n "$MQTT_HOST" ] && setkey mqtt host "$MQTT_HOST"
[ -n "$MQTT_PORT" ] && setkey mqtt port "$MQTT_PORT"
if [ -n "$MQTT_PASSWORD_FILE" ]; then
  install -m 0640 "$MQTT_PASSWORD_FILE" "$ETC/mqtt.password"
  [ "$DO_USER" = 1 ] && chgrp "$RUN_USER" "$ETC/mqtt.password"
  setkey mqtt password_file "/etc/edgedance/mqtt.password"
fi
if [ -f "$ETC/device.ini" ] && [ -z "$CONFIG" ]; then
  mv "$new_ini" "$ETC/device.ini.new"
  echo "install.sh: kept $ETC/device.ini (the new example is device.ini.new)"
else
  mv "$new_ini" "$ETC/device.ini"
  chmod 0644 "$ETC/device.ini"
  echo "install.sh: wrote $ETC/device.ini"
fi

# --- the unit -------------------------------------------------------------------------------------------
# Paths inside the unit and the config point at the final locations; with --prefix they point
# into the prefix, so the tree is self-consistent (and `systemd-analyze verify` can check it).
sed -e "s#/opt/edgedance#$APP#g" -e "s#/etc/edgedance#$ETC#g" -e "s#^User=.*#User=$RUN_USER#" \
    -e "s#^Group=.*#Group=$RUN_USER#" "$SRC/deploy/edgedance-device.service" > "$UNIT_DIR/edgedance-device.service"
if [ -n "$PREFIX" ]; then
  sed -i -e "s#^bundle = /opt/edgedance#bundle = $APP#" -e "s#^password_file = /etc/edgedance#password_file = $ETC#" \
      "$ETC/device.ini"
fi
echo "install.sh: unit -> $UNIT_DIR/edgedance-device.service"

# --- check and start ------------------------------------------------------------------------------------
echo "install.sh: checking the install (python -m device selftest --broker none)"
cd "$APP"  # not the checkout: `python -m` would import the checkout's device/ instead of the installed one
# shellcheck disable=SC2086
if ! "$VENV/bin/python" -m device selftest --config "$ETC/device.ini" --broker none --seconds 2 $SELFTEST_ARGS; then
  echo "install.sh: the selftest failed (see above); the service is installed but fix that first" >&2
  SELFTEST_FAILED=1
fi
if [ "$DO_SYSTEMD" = 1 ]; then
  systemctl daemon-reload
  systemctl enable edgedance-device.service
  systemctl restart edgedance-device.service
  echo "install.sh: started; follow it with: journalctl -u edgedance-device -f"
fi
echo "install.sh: done ($APP)"
exit "${SELFTEST_FAILED:-0}"
