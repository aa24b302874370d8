#!/usr/bin/env bash
# Build the bootable test image (layout: docs/boot-image.md) from Debian packages, cached by a
# content key. Usage: scripts/build-boot-image.sh [OUTDIR]
#   Without OUTDIR the cached directory is used as is. The last line on stdout is the directory
#   holding boot.img, vmlinuz, initrd.gz and manifest.json.
# Environment: BOOTRESTORE_CACHE_DIR (default: <repo>/.cache), BOOTRESTORE_KERNEL_DEB (a
#   linux-image-*-cloud-amd64 .deb to use instead of resolving and downloading one).
set -euo pipefail
export LC_ALL=C SOURCE_DATE_EPOCH=1767225600 MTOOLS_SKIP_CHECK=1   # 2026-01-01T00:00:00Z
export PATH="$PATH:/usr/sbin:/sbin"

repo=$(cd "$(dirname "$0")/.." && pwd)
here="$repo/scripts"
cache=${BOOTRESTORE_CACHE_DIR:-$repo/.cache}
outdir=${1:-}
log() { echo "build-boot-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in busybox syslinux mcopy mkfs.fat sfdisk cpio gzip openssl perl dpkg-deb sha256sum flock; do
  command -v "$tool" > /dev/null || die "missing $tool (run scripts/install-deps.sh)"
done
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
[ -r "$MBR_BIN" ] || die "missing $MBR_BIN (package syslinux-common)"
BUSYBOX=$(command -v busybox)
if ldd "$BUSYBOX" > /dev/null 2>&1; then die "$BUSYBOX is not static (install busybox-static)"; fi
ISCSISTART=$(command -v iscsistart || true)

mkdir -p "$cache/debs"

# --- the kernel package: the versioned dependency of linux-image-cloud-amd64 ----------------------
kernel_deb=${BOOTRESTORE_KERNEL_DEB:-}
# apt-cache takes seconds on a busy machine: remember its answer until the package lists change.
apt_stamp=$(stat -c %Y /var/lib/apt/lists /var/cache/apt/pkgcache.bin 2> /dev/null | tr '\n' . || true)
resolved="$cache/debs/.resolved-kernel"
if [ -z "$kernel_deb" ] && [ -r "$resolved" ]; then
  read -r stamp path < "$resolved" || true
  [ "${stamp:-}" = "$apt_stamp" ] && [ -r "${path:-}" ] && kernel_deb=$path
fi
if [ -z "$kernel_deb" ]; then
  kpkg=$(apt-cache depends linux-image-cloud-amd64 2> /dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true)
  if [ -n "$kpkg" ]; then
    kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ { print $2 }')
    kfile="${kpkg}_${kver//:/%3a}_amd64.deb"
    for d in "$cache/debs" /var/cache/apt/archives; do
      [ -r "$d/$kfile" ] && { kernel_deb="$d/$kfile"; break; }
    done
    if [ -z "$kernel_deb" ]; then
      log "downloading $kpkg $kver"
      (cd "$cache/debs" && apt-get download "$kpkg=$kver" > /dev/null 2>&1) || log "apt-get download $kpkg failed"
      [ -r "$cache/debs/$kfile" ] && kernel_deb="$cache/debs/$kfile"
    fi
  fi
  if [ -z "$kernel_deb" ]; then # offline fallback: the newest cloud kernel .deb we already have
    kernel_deb=$(ls -1 "$cache"/debs/linux-image-*-cloud-amd64_*.deb /var/cache/apt/archives/linux-image-*-cloud-amd64_*.deb 2> /dev/null | sort -V | tail -n 1 || true)
  fi
fi
[ -n "$kernel_deb" ] && [ -r "$kernel_deb" ] || die "no linux-image-*-cloud-amd64 .deb found or downloadable"
[ -n "${BOOTRESTORE_KERNEL_DEB:-}" ] || echo "$apt_stamp $kernel_deb" > "$resolved"

# --- iscsistart and its shared libraries (for br.mode=iscsi) ------------------------------------
host_files=("$BUSYBOX")
if [ -n "$ISCSISTART" ]; then
  host_files+=("$ISCSISTART")
  while read -r lib; do host_files+=("$lib"); done < <(ldd "$ISCSISTART" | awk '/=> \// { print $3 } /^\t\/lib/ { print $1 }')
else
  log "warning: iscsistart not found (package open-iscsi): the image will not support br.mode=iscsi"
fi

# --- content key -------------------------------------------------------------------------------
key=$( {
  sha256sum "$0" "$here/boot-image/init.sh" "$MBR_BIN" /usr/lib/syslinux/modules/bios/ldlinux.c32 2> /dev/null | cut -d' ' -f1
  basename "$kernel_deb"
  sha256sum "${host_files[@]}" | cut -d' ' -f1
  syslinux --version 2>&1 | head -n 1
} | sha256sum | cut -c1-16)
final="$cache/boot-image/$key"

publish() {
  if [ -n "$outdir" ]; then
    mkdir -p "$outdir"
    for f in boot.img vmlinuz initrd.gz manifest.json; do cp --reflink=auto "$final/$f" "$outdir/$f"; done
    echo "$(cd "$outdir" && pwd)"
  else
    echo "$final"
  fi
}

mkdir -p "$cache/boot-image"
exec 9> "$cache/boot-image/.lock"
flock 9
if [ -r "$final/manifest.json" ]; then
  log "cached: $final"
  publish
  exit 0
fi

started_ms=$(($(date +%s%N) / 1000000))
work=$(mktemp -d "$cache/boot-image/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building $key in $work (kernel $(basename "$kernel_deb"))"

# --- kernel and modules --------------------------------------------------------------------------
dpkg-deb -x "$kernel_deb" "$work/kernel"
kdir=$(ls -d "$work"/kernel/lib/modules/*/ | head -n 1)
kdir=${kdir%/}
uname_r=$(basename "$kdir")
cp "$work/kernel/boot/vmlinuz-$uname_r" "$work/vmlinuz"

mkdir -p "$work/root/bin" "$work/root/sbin" "$work/root/lib/modules" "$work/root/etc/iscsi"
# Which of the needed drivers are modules (=m) and which are built in (=y)?
kconfig="$work/kernel/boot/config-$uname_r"
declare -A loaded=()
order=()
add_module() { # add_module NAME: NAME's dependencies first, then NAME
  local name=$1 ko deps dep
  [ -n "${loaded[$name]:-}" ] && return 0
  loaded[$name]=1
  ko=$(find "$kdir/kernel" -name "$name.ko" -print -quit)
  if [ -z "$ko" ]; then
    ko=$(find "$kdir/kernel" -name "${name//_/-}.ko" -print -quit)
  fi
  [ -n "$ko" ] || { log "module $name not in $uname_r (built in?)"; return 0; }
  deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$ko" | head -n 1 | cut -d= -f2)
  for dep in ${deps//,/ }; do add_module "$dep"; done
  cp "$ko" "$work/root/lib/modules/$(basename "$ko")"
  order+=("$(basename "$ko" .ko)")
}
for opt_mod in CONFIG_VIRTIO_PCI:virtio_pci CONFIG_VIRTIO_BLK:virtio_blk CONFIG_VIRTIO_NET:virtio_net \
  CONFIG_FW_CFG_SYSFS:qemu_fw_cfg CONFIG_BLK_DEV_SD:sd_mod CONFIG_ISCSI_TCP:iscsi_tcp; do
  opt=${opt_mod%%:*} mod=${opt_mod##*:}
  case "$(grep "^$opt=" "$kconfig" | cut -d= -f2)" in
    m) add_module "$mod" ;;
    y) log "$opt built in" ;;
    *) die "$opt is not enabled in $uname_r" ;;
  esac
done
printf '%s\n' "${order[@]}" > "$work/root/lib/modules/load-order"

# --- initramfs -----------------------------------------------------------------------------------
cp "$BUSYBOX" "$work/root/bin/busybox"
cp "$here/boot-image/init.sh" "$work/root/init"
chmod 755 "$work/root/init" "$work/root/bin/busybox"
for f in "${host_files[@]:1}"; do
  case "$f" in
    */iscsistart) cp "$f" "$work/root/sbin/iscsistart" ;;
    *) mkdir -p "$work/root$(dirname "$f")" && cp -L "$f" "$work/root$f" ;;
  esac
done
echo "InitiatorName=iqn.2026-12.io.bootrestore:guest" > "$work/root/etc/iscsi/initiatorname.iscsi"
find "$work/root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$work/root" && find . -print0 | sort -z | cpio --null -o -H newc --reproducible --quiet --owner=0:0) \
  | gzip -9 -n > "$work/initrd.gz"

# --- FAT boot partition with syslinux -------------------------------------------------------------
cat > "$work/syslinux.cfg" << 'EOF'
SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0,115200 quiet panic=-1 br.mode=disk
EOF
MIB=1048576
part_start_mib=1 part_end_mib=32 pattern_end_mib=48 hash_end_mib=63 disk_mib=64
part_sectors=$(((part_end_mib - part_start_mib) * MIB / 512))
mkfs.fat -F 16 --invariant -i 42524f4f -n BRBOOT -h $((part_start_mib * 2048)) \
  -C "$work/fat.img" $((part_sectors / 2)) > /dev/null
touch -d "@$SOURCE_DATE_EPOCH" "$work/vmlinuz" "$work/initrd.gz" "$work/syslinux.cfg"
mcopy -m -i "$work/fat.img" "$work/vmlinuz" "$work/initrd.gz" "$work/syslinux.cfg" ::/
syslinux --install "$work/fat.img"

# --- the disk --------------------------------------------------------------------------------------
img="$work/boot.img"
truncate -s $((disk_mib * MIB)) "$img"
printf 'label: dos\nlabel-id: 0x42524f4f\nunit: sectors\n\nstart=%d, size=%d, type=6, bootable\n' \
  $((part_start_mib * 2048)) "$part_sectors" | sfdisk --quiet "$img"
dd if="$MBR_BIN" of="$img" bs=440 count=1 conv=notrunc status=none
dd if="$work/fat.img" of="$img" bs=1M seek=$part_start_mib conv=notrunc,sparse status=none
# Pattern region: every 512-byte sector starts with "BR-LBA:%09d" (its own LBA); the first half
# is pseudo-random (AES-CTR of zeros, fixed key: incompressible), the second half repeats text.
pattern_bytes=$(((pattern_end_mib - part_end_mib) * MIB))
head -c "$pattern_bytes" /dev/zero \
  | openssl enc -aes-128-ctr -nosalt -K 626f6f74726573746f72652d74657374 -iv 00000000000000000000000000000000 \
  | perl -e '
      my ($first_lba, $sectors) = @ARGV; binmode STDIN; binmode STDOUT;
      my $text = "bootrestore test pattern: compressible text for chunk stores. " x 8;
      for my $i (0 .. $sectors - 1) {
        read(STDIN, my $s, 512) == 512 or die "short read";
        $s = substr($text, 0, 512) if $i >= $sectors / 2;
        substr($s, 0, 16) = sprintf("BR-LBA:%09d", $first_lba + $i);
        print $s;
      }' $((part_end_mib * 2048)) $((pattern_bytes / 512)) \
  | dd of="$img" bs=1M seek=$part_end_mib conv=notrunc iflag=fullblock status=none

hash=$(head -c $((hash_end_mib * MIB)) "$img" | sha256sum | cut -d' ' -f1)
elapsed_ms=$(($(date +%s%N) / 1000000 - started_ms))
cat > "$work/manifest.json" << EOF
{
  "key": "$key",
  "kernelDeb": "$(basename "$kernel_deb")",
  "kernelRelease": "$uname_r",
  "modules": [$(printf '"%s",' "${order[@]}" | sed 's/,$//')],
  "iscsistart": $([ -n "$ISCSISTART" ] && echo true || echo false),
  "diskBytes": $((disk_mib * MIB)),
  "partition": { "startBytes": $((part_start_mib * MIB)), "endBytes": $((part_end_mib * MIB)) },
  "pattern": { "startBytes": $((part_end_mib * MIB)), "endBytes": $((pattern_end_mib * MIB)) },
  "hashRegion": { "startBytes": 0, "endBytes": $((hash_end_mib * MIB)), "sha256": "$hash" },
  "scratch": { "startBytes": $((hash_end_mib * MIB)), "endBytes": $((disk_mib * MIB)) },
  "buildMs": $elapsed_ms
}
EOF
mkdir -p "$final.tmp"
mv "$work/boot.img" "$work/vmlinuz" "$work/initrd.gz" "$work/manifest.json" "$final.tmp/"
rm -rf "$final"
mv "$final.tmp" "$final"
# Older builds (other keys) are dead weight: keep only this one.
find "$cache/boot-image" -mindepth 1 -maxdepth 1 -type d ! -name "$key" ! -name '.build.*' -exec rm -rf {} +
log "built $final in ${elapsed_ms} ms (sha256 of [0, ${hash_end_mib} MiB): $hash)"
publish
