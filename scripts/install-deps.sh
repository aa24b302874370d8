#!/usr/bin/env bash
# Installs what the demo and the tests need; idempotent and fast when everything is present.
#   Debian packages (apt-get only when something is missing) and node_modules (npm ci when
#   missing or older than package-lock.json).
# Usage: scripts/install-deps.sh [--no-npm]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

# Package                 used for
packages=(
  libiscsi-bin      # iscsi-test-cu, iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-perf
  qemu-system-x86   # guests under TCG (boot tests, Linux initiator test)
  qemu-block-extra  # QEMU's iscsi:// block driver
  qemu-utils        # qemu-img, qemu-io
  tgt               # reference iSCSI target (tests, bench baseline)
  restic            # demo: comparison with a file-level backup tool
  syslinux          # boot image: syslinux --install (mtools flavour)
  syslinux-common   # boot image: mbr.bin, ldlinux.c32
  busybox-static    # boot image: the initramfs userland
  cpio              # boot image: initramfs archive
  dosfstools        # boot image: mkfs.fat
  mtools            # boot image: mcopy into the FAT partition without loop mounts
  fdisk             # boot image: sfdisk
  open-iscsi        # boot image: iscsistart for the Linux kernel initiator test
  socat             # Linux initiator test: guestfwd to the target on 127.0.0.1
  openssl           # boot image: deterministic pseudo-random pattern region
)

missing=()
installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${packages[@]}" 2> /dev/null | awk '$4 == "installed" { print $1 }' || true)
for pkg in "${packages[@]}"; do
  grep -qx "$pkg" <<< "$installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all ${#packages[@]} Debian packages present" >&2
fi

if [ "${1:-}" != "--no-npm" ]; then
  # npm writes node_modules/.package-lock.json on every install: older than the lock file = stale.
  if [ ! -d "$repo/node_modules" ] || [ ! "$repo/node_modules/.package-lock.json" -nt "$repo/package-lock.json" ]; then
    echo "install-deps: npm ci" >&2
    (cd "$repo" && npm ci --no-audit --no-fund)
  else
    echo "install-deps: node_modules up to date" >&2
  fi
fi
