#!/bin/bash
# update.sh IMAGE DEVICE: update an installed xderp appliance in place.
# Rewrites only the ESP (boot loader, kernel, initrd) and the root partition
# from a new xderp.img (raw, or .zst); the configuration (XDERP_CONF) and the
# state (XDERP_STATE: server key, certificates, ACME cache) are left alone.
# DEVICE is the appliance's disk (e.g. /dev/sdb), or a disk image file.
# Refuses unless DEVICE carries the same partition layout as IMAGE.
set -euo pipefail
die() { echo "update.sh: $*" >&2; exit 1; }
[ $# = 2 ] || die "usage: update.sh xderp.img[.zst] /dev/sdX"
img=$1 dev=$2
[ -e "$img" ] && [ -e "$dev" ] || die "no such file: $img or $dev"
tmp=
trap '[ -n "$tmp" ] && rm -f "$tmp"' EXIT
case "$img" in *.zst)
	tmp=$(mktemp "${TMPDIR:-/tmp}/xderp-update.XXXXXX")
	zstd -q -d -f "$img" -o "$tmp"
	img=$tmp ;;
esac
# partitions 1 (ESP) and 2 (root): start, size and UUID must match
layout() { sfdisk -d "$1" | sed -n 's/^[^:]*[^0-9]\([12]\) : \(start=.*\), type=.*uuid=\([0-9A-Fa-f-]*\).*/\1 \2 \3/p'; }
want=$(layout "$img") || die "cannot read the partition table of $img"
have=$(layout "$dev") || die "cannot read the partition table of $dev"
[ -n "$want" ] && [ "$want" = "$have" ] || die "$dev does not have this image's layout (a full reflash is needed, which also resets XDERP_STATE):
image:  $want
device: $have"
if [ -b "$dev" ] && grep -q "^$dev" /proc/mounts; then
	die "$dev has mounted partitions; unmount them first"
fi
while read -r n _start _size _uuid; do
	st=$(echo "$want" | awk -v n="$n" '$1 == n {gsub(/[^0-9]/, "", $3); print $3}')
	sz=$(echo "$want" | awk -v n="$n" '$1 == n {gsub(/[^0-9]/, "", $5); print $5}')
	[ $((st % 2048)) = 0 ] && [ $((sz % 2048)) = 0 ] || die "partition $n is not MiB-aligned"
	echo "writing partition $n ($((sz / 2048)) MiB at MiB $((st / 2048)))"
	dd if="$img" of="$dev" bs=1M skip=$((st / 2048)) seek=$((st / 2048)) count=$((sz / 2048)) conv=notrunc,fsync status=none
done <<<"$want"
sync
echo "updated: $dev (XDERP_CONF and XDERP_STATE untouched)"
