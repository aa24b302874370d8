#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian bookworm machine (run as root from a checkout):
#   1. install what is needed (Debian packages, npm packages), build the CLI;
#   2. build a small bootable disk image from Debian packages and convert it to qcow2, the format a
#      KVM host keeps;
#   3. back it up into a repository (full, then incremental after a change);
#   4. serve the newest restore point as a writable iSCSI LUN (`bootrestore serve`);
#   5. boot a VM from that LUN with QEMU (TCG) and show what the guest printed;
#   6. show the mount, keep what the VM did as a new restore point (`commit`), verify the repository.
# Everything lives under $DEMO_DIR (default /tmp/bootrestore-demo); every process it starts is stopped.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
demo=${DEMO_DIR:-/tmp/bootrestore-demo}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2> /dev/null; then
    kill -TERM "$server_pid"
    wait "$server_pid" 2> /dev/null || true
  fi
}
trap cleanup EXIT

step "1. installing dependencies and building"
bash scripts/install-deps.sh
npm run build --silent
br() { "$repo/bin/bootrestore" "$@"; }

step "2. building a bootable disk image from Debian packages"
image_dir=$(bash scripts/build-boot-image.sh | tail -n 1)
rm -rf "$demo"
mkdir -p "$demo"
qemu-img convert -f raw -O qcow2 "$image_dir/boot.img" "$demo/vm1.qcow2"
qemu-img info "$demo/vm1.qcow2" | sed -n '1,3p'

step "3. backing up the qcow2 disk (full, then incremental after a change)"
br backup "$demo/vm1.qcow2" --repo "$demo/repo" --vm vm1
# Change 4 MiB inside the VM's disk, as a running VM would, then back up again.
qemu-io -f qcow2 -c 'write -P 0x5c 40M 4M' "$demo/vm1.qcow2" > /dev/null
br backup "$demo/vm1.qcow2" --repo "$demo/repo" --vm vm1
br list --repo "$demo/repo"

step "4. serving the newest restore point as an iSCSI LUN"
cat > "$demo/bootrestore.json" << JSON
{
  "listen": ["127.0.0.1:3260"],
  "repository": "$demo/repo",
  "deltaDir": "$demo/deltas",
  "cache": { "maxBytes": "256MiB" },
  "targets": [
    { "iqn": "iqn.2026-12.io.bootrestore:demo", "luns": [{ "lun": 0, "backup": { "vm": "vm1", "point": "latest", "mount": "vm1-restore" } }] }
  ]
}
JSON
"$repo/bin/bootrestore" serve --config "$demo/bootrestore.json" 2> "$demo/server.log" &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q '"msg":"listening"' "$demo/server.log" 2> /dev/null && break
  kill -0 "$server_pid" 2> /dev/null || { cat "$demo/server.log"; exit 1; }
  sleep 0.2
done
url=iscsi://127.0.0.1:3260/iqn.2026-12.io.bootrestore:demo/0
iscsi-ls -s iscsi://127.0.0.1:3260
iscsi-inq -e 1 -c 128 "$url" | sed -n '1,3p'

step "5. booting a VM from the backup over iSCSI (QEMU, software emulation)"
start=$(date +%s%N)
timeout 180 qemu-system-x86_64 -machine pc,accel=tcg -m 512 -display none -monitor none -serial stdio -no-reboot \
  -nic none -drive "file=$url,format=raw,if=virtio,cache=none" \
  -fw_cfg name=opt/io.bootrestore/nonce,string=demo | tee "$demo/serial.log" | grep --line-buffered 'BOOTRESTORE-' || true
end=$(date +%s%N)
grep -q 'BOOTRESTORE-BOOT-OK' "$demo/serial.log" || { echo "the VM did not boot; see $demo/serial.log and $demo/server.log"; exit 1; }
echo "VM booted from its backup and powered off after $(((end - start) / 1000000)) ms"

step "6. the mount, keeping what the VM did, verifying the repository"
br mounts --config "$demo/bootrestore.json"
br commit --config "$demo/bootrestore.json" vm1-restore
br list --repo "$demo/repo" --vm vm1
br verify --repo "$demo/repo"
echo
echo "Done. The repository, deltas and logs are in $demo; the server is stopped on exit."
