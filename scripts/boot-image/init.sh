#!/bin/busybox sh
# /init of the bootrestore test initramfs (see docs/boot-image.md).
# Modes (kernel command line):
#   br.mode=disk   (default; syslinux.cfg) use the first virtio disk /dev/vda
#   br.mode=iscsi  log in with open-iscsi's iscsistart over the user-mode network and use /dev/sda;
#                  needs br.target=IQN, optional br.initiator=IQN, br.portal=IP:PORT (10.0.2.100:3260)
# Optional QEMU fw_cfg entries: opt/io.bootrestore/nonce (stamped into the scratch pattern),
#   opt/io.bootrestore/scratch = "skip" (do not write the scratch area, e.g. for read-only LUNs).
# Every line meant for the host starts with "BOOTRESTORE-".
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /run /var/lock /etc/iscsi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk

say() { echo "BOOTRESTORE-$*"; }
finish() {
  say "DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
  sync
  poweroff -f
  sleep 5
  echo o > /proc/sysrq-trigger
}
fail() { say "ERROR $*"; finish; }

say "BOOT-OK uptime=$(cut -d' ' -f1 /proc/uptime)"

# Modules, in dependency order (written by build-boot-image.sh).
while read -r mod; do
  [ -n "$mod" ] && insmod "/lib/modules/$mod.ko" 2>/dev/null
done < /lib/modules/load-order

arg() { # arg NAME DEFAULT: value of NAME=... on the kernel command line
  v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1)
  [ -n "$v" ] && echo "$v" || echo "$2"
}
fwcfg() { # fwcfg NAME: content of QEMU fw_cfg entry opt/io.bootrestore/NAME, if any
  f="/sys/firmware/qemu_fw_cfg/by_name/opt/io.bootrestore/$1/raw"
  [ -r "$f" ] && cat "$f"
}

MODE=$(arg br.mode disk)
HASH_MIB=$(arg br.hashmib 63)
SCRATCH_MIB=$(arg br.scratchmib 63)

wait_for() { # wait_for PATH SECONDS
  i=0
  while [ ! -b "$1" ] && [ "$i" -lt "$(($2 * 10))" ]; do usleep 100000; i=$((i + 1)); done
  [ -b "$1" ]
}

if [ "$MODE" = iscsi ]; then
  TARGET=$(arg br.target "")
  INITIATOR=$(arg br.initiator iqn.2026-12.io.bootrestore:guest)
  PORTAL=$(arg br.portal 10.0.2.100:3260)
  [ -n "$TARGET" ] || fail "no br.target"
  ip link set lo up
  ip link set eth0 up || fail "no eth0"
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
  say "ISCSI-LOGIN target=$TARGET portal=$PORTAL uptime=$(cut -d' ' -f1 /proc/uptime)"
  iscsistart -i "$INITIATOR" -t "$TARGET" -g 1 -a "${PORTAL%:*}" -p "${PORTAL##*:}" > /tmp/iscsistart.log 2>&1 \
    || { sed 's/^/BOOTRESTORE-ISCSISTART /' /tmp/iscsistart.log; fail "iscsistart failed"; }
  DEV=/dev/sda
  wait_for "$DEV" 30 || fail "no $DEV after login"
  say "ISCSI-OK uptime=$(cut -d' ' -f1 /proc/uptime)"
else
  DEV=/dev/vda
  wait_for "$DEV" 20 || fail "no $DEV"
fi

NAME=${DEV#/dev/}
say "DISK dev=$DEV sectors=$(cat /sys/block/$NAME/size)"
# What the kernel made of the device (SCSI disks: INQUIRY, VPD 0x83 → wwid, block limits).
for f in device/vendor device/model device/rev device/wwid queue/logical_block_size \
  queue/physical_block_size queue/write_cache queue/discard_max_bytes queue/max_hw_sectors_kb queue/rotational; do
  [ -r "/sys/block/$NAME/$f" ] && say "SYSFS ${f#*/}=$(tr -s ' \n' ' ' < "/sys/block/$NAME/$f" | sed 's/ *$//')"
done

# Hash of the fixed region, read with O_DIRECT so the block layer goes to the device.
HASH=$(dd if="$DEV" bs=1M count="$HASH_MIB" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
say "HASH $HASH mib=$HASH_MIB uptime=$(cut -d' ' -f1 /proc/uptime)"

if [ "$(fwcfg scratch)" = skip ]; then
  say "SCRATCH SKIPPED"
else
  NONCE=$(fwcfg nonce)
  [ -n "$NONCE" ] || NONCE=none
  # 64-byte record repeated to 1 MiB (2^14 records).
  printf '%-63s\n' "BOOTRESTORE-SCRATCH $NONCE" > /tmp/s
  n=0
  while [ "$n" -lt 14 ]; do cat /tmp/s /tmp/s > /tmp/s2; mv /tmp/s2 /tmp/s; n=$((n + 1)); done
  WANT=$(sha256sum /tmp/s | cut -d' ' -f1)
  if dd if=/tmp/s of="$DEV" bs=1M seek="$SCRATCH_MIB" count=1 oflag=direct conv=fsync 2>/tmp/dd.err; then
    sync
    echo 3 > /proc/sys/vm/drop_caches
    GOT=$(dd if="$DEV" bs=1M skip="$SCRATCH_MIB" count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$GOT" = "$WANT" ]; then say "SCRATCH OK $GOT"; else say "SCRATCH BAD want=$WANT got=$GOT"; fi
  else
    say "SCRATCH WRITE-FAILED $(tr '\n' ' ' < /tmp/dd.err)"
  fi
fi
finish
