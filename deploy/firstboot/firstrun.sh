#!/bin/bash
# edgedance first boot, for a freshly flashed Raspberry Pi OS SD card.
#
# Two ways to run it, both from the boot partition (/boot/firmware on Bookworm):
#  - cloud-init: deploy/firstboot/user-data calls it (copy it there as user-data,
#    and this file as edgedance-firstrun.sh);
#  - without cloud-init: copy this file as edgedance-firstrun.sh and append
#      systemd.run=/boot/firmware/edgedance-firstrun.sh systemd.run_success_action=reboot
#    to the single line of cmdline.txt; the script removes that again once it has run
#    (the mechanism Raspberry Pi Imager's own firstrun.sh uses).
# Beside it on the boot partition: edgedance-src.tar.gz (deploy/install.sh --pack ...),
# edgedance-device.ini, optionally edgedance-mqtt.password. The Pi needs the network.
set -euo pipefail
BOOT=/boot/firmware
[ -d "$BOOT" ] || BOOT=/boot
LOG=/var/log/edgedance-firstboot.log
exec > >(tee -a "$LOG") 2>&1
echo "edgedance first boot: $(date)"

# cmdline.txt route: remove our systemd.run hook whatever happens, so it runs only once
if grep -q "edgedance-firstrun.sh" "$BOOT/cmdline.txt" 2>/dev/null; then
  sed -i 's| systemd.run=[^ ]*edgedance-firstrun.sh[^ ]*||; s| systemd.run_success_action=[^ ]*||; s| systemd.unit=kernel-command-line.target||' \
      "$BOOT/cmdline.txt"
fi

for i in $(seq 1 60); do  # wait up to 2 minutes for the network (apt and PyPI)
  getent hosts pypi.org >/dev/null && break
  sleep 2
done

[ -f "$BOOT/edgedance-src.tar.gz" ] || { echo "missing $BOOT/edgedance-src.tar.gz (deploy/install.sh --pack)"; exit 1; }
rm -rf /opt/edgedance-src
mkdir -p /opt/edgedance-src
tar -xzf "$BOOT/edgedance-src.tar.gz" -C /opt/edgedance-src --strip-components=1
args=(--bundle /opt/edgedance-src/models/default)
[ -f "$BOOT/edgedance-device.ini" ] && args+=(--config "$BOOT/edgedance-device.ini")
[ -f "$BOOT/edgedance-mqtt.password" ] && args+=(--mqtt-password-file "$BOOT/edgedance-mqtt.password")
bash /opt/edgedance-src/deploy/install.sh "${args[@]}"
rm -f "$BOOT/edgedance-mqtt.password"  # it now lives in /etc/edgedance, readable by the service only
echo "edgedance first boot: done"
