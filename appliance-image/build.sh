#!/bin/bash
# build.sh: build the xderp appliance disk image (raw GPT + zstd copy) from
# Debian 12 packages, as root, without loop devices or mounts.
#
#   appliance-image/build.sh            # uses bin/xderpd (built if missing)
#   XDERPD_BIN=/path/xderpd appliance-image/build.sh
#
# Outputs (appliance-image/out/): xderp.img, xderp.img.zst, xderp.img.sha256,
# layout.env (partition offsets, used by test.sh and update.sh).
#
# Environment:
#   XDERPD_BIN          daemon binary to install (default: bin/xderpd)
#   XDERP_IMAGE_CACHE   rootfs/apt cache (default ${XDG_CACHE_HOME:-~/.cache}/xderp/image)
#   XDERP_IMAGE_REFRESH=1  rebuild the cached rootfs even if the key matches
#   EXTRA_PACKAGES      additional Debian packages (space separated), e.g.
#                       "firmware-misc-nonfree" for Intel E810 (ice) DDP
#   ZSTD_LEVEL          zstd level for the compressed copy (default 12)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(cd "$HERE/.." && pwd)
OUT=${OUT:-$HERE/out}
CACHE=${XDERP_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xderp/image}
XDERPD_BIN=${XDERPD_BIN:-$TOP/bin/xderpd}
ZSTD_LEVEL=${ZSTD_LEVEL:-12}

SUITE=bookworm
MIRROR="deb http://deb.debian.org/debian bookworm main non-free-firmware
deb http://deb.debian.org/debian bookworm-updates main non-free-firmware
deb http://deb.debian.org/debian-security bookworm-security main non-free-firmware"

# Kernel: Debian's generic linux-image-amd64 (6.1 LTS, security-supported
# through the metapackage). It carries the bare-metal NIC drivers with
# driver-mode XDP (ixgbe, i40e, ice, igb, igc, mlx4/mlx5, bnxt, ena, virtio_net,
# ...); linux-image-cloud-amd64 drops most of them.
PACKAGES=(
	linux-image-amd64 initramfs-tools zstd
	systemd systemd-sysv udev dbus
	systemd-timesyncd systemd-resolved
	iproute2 kmod e2fsprogs dosfstools ca-certificates
)
# shellcheck disable=SC2206
PACKAGES+=(${EXTRA_PACKAGES:-})

# Partition layout (MiB). Fixed so that an update can rewrite the ESP and the
# root partition in place while the config and state partitions stay put.
ESP_MB=160
ROOT_MB=896
CONF_MB=16
STATE_MB=128
ESP_START=1
ROOT_START=$((ESP_START + ESP_MB))
CONF_START=$((ROOT_START + ROOT_MB))
STATE_START=$((CONF_START + CONF_MB))
DISK_MB=$((STATE_START + STATE_MB + 1)) # +1 MiB for the backup GPT
# Fixed partition UUIDs: the kernel command line and fstab name them, and they
# must stay valid when only the ESP and root are rewritten by an update.
ESP_UUID=8b0f7ea5-6c44-4f5e-9d61-0c2a6f1e0001
ROOT_UUID=8b0f7ea5-6c44-4f5e-9d61-0c2a6f1e0002
CONF_UUID=8b0f7ea5-6c44-4f5e-9d61-0c2a6f1e0003
STATE_UUID=8b0f7ea5-6c44-4f5e-9d61-0c2a6f1e0004
GUID_ESP=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
GUID_ROOT_X86_64=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
GUID_MSDATA=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7 # FAT data: Windows/macOS mount it
GUID_LINUX=0FC63DAF-8483-4772-8E79-3D69D8477DE4

log() { printf '[build %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, chroot)"
for t in mmdebstrap mkfs.vfat mcopy mmd sfdisk mkfs.ext4 zstd; do
	command -v "$t" >/dev/null || die "missing $t: apt-get install --no-install-recommends mmdebstrap mtools dosfstools fdisk systemd-boot-efi zstd e2fsprogs"
done
SDBOOT=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[ -f "$SDBOOT" ] || die "missing $SDBOOT: apt-get install --no-install-recommends systemd-boot-efi"

# --- the daemon ------------------------------------------------------------
# The image needs a static binary (the root has glibc, but a cgo build would
# tie the daemon to the build host's libc and its DNS resolver). A binary from
# `make build` with cgo enabled is rebuilt here with CGO_ENABLED=0 into out/.
is_static() { ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'INTERP'; }
build_static() { # build_static OUTPUT
	[ -d "$TOP/cmd/xderpd" ] || die "no ./cmd/xderpd to build xderpd from"
	local version
	version=$(cd "$TOP" && git describe --always --dirty 2>/dev/null || echo dev)
	log "building a static xderpd ($version) -> $1"
	(cd "$TOP" && CGO_ENABLED=0 go build -trimpath \
		-ldflags "-X github.com/xderp/xderp/userspace/daemon.Version=$version" -o "$1" ./cmd/xderpd) ||
		die "go build ./cmd/xderpd failed"
}
mkdir -p "$OUT"
command -v readelf >/dev/null || die "missing readelf (apt-get install binutils)"
if [ ! -x "$XDERPD_BIN" ]; then
	build_static "$XDERPD_BIN"
fi
if ! is_static "$XDERPD_BIN"; then
	if [ "$XDERPD_BIN" = "$TOP/bin/xderpd" ]; then
		build_static "$OUT/xderpd"
		XDERPD_BIN="$OUT/xderpd"
	else
		die "$XDERPD_BIN is dynamically linked; build it with CGO_ENABLED=0"
	fi
fi

# --- cached base rootfs (keyed on everything that goes into it) -------------
mkdir -p "$CACHE/debs" "$OUT"
DPKG_OPTS=(
	'path-exclude=/usr/share/man/*'
	'path-exclude=/usr/share/info/*'
	'path-exclude=/usr/share/locale/*'
	'path-exclude=/usr/share/doc/*'
	'path-include=/usr/share/doc/*/copyright'
	'path-exclude=/usr/share/lintian/*'
	# Kernel modules an appliance relay never loads: sound, video capture,
	# GPUs (efifb/simpledrm are built in), wireless, bluetooth, staging.
	'path-exclude=/lib/modules/*/kernel/sound/*'
	'path-exclude=/lib/modules/*/kernel/drivers/media/*'
	'path-exclude=/lib/modules/*/kernel/drivers/gpu/*'
	'path-exclude=/lib/modules/*/kernel/drivers/net/wireless/*'
	'path-exclude=/lib/modules/*/kernel/net/wireless/*'
	'path-exclude=/lib/modules/*/kernel/net/mac80211/*'
	'path-exclude=/lib/modules/*/kernel/drivers/bluetooth/*'
	'path-exclude=/lib/modules/*/kernel/net/bluetooth/*'
	'path-exclude=/lib/modules/*/kernel/drivers/staging/*'
	'path-exclude=/lib/modules/*/kernel/drivers/iio/*'
	'path-exclude=/lib/modules/*/kernel/drivers/isdn/*'
	'path-exclude=/lib/modules/*/kernel/drivers/infiniband/*'
)
BASE_HOOK='set -e
mkdir -p "$1/etc/initramfs-tools/conf.d"
printf "COMPRESS=zstd\nMODULES=most\n" > "$1/etc/initramfs-tools/conf.d/xderp.conf"'
KEY_INPUT=$(printf '%s\n' "v1" "$SUITE" "$MIRROR" "${PACKAGES[@]}" "${DPKG_OPTS[@]}" "$BASE_HOOK")
KEY=$(printf '%s' "$KEY_INPUT" | sha256sum | cut -c1-16)
BASE_TAR="$CACHE/rootfs-$KEY.tar"

if [ ! -s "$BASE_TAR" ] || [ "${XDERP_IMAGE_REFRESH:-0}" = 1 ]; then
	log "mmdebstrap $SUITE (cache key $KEY): ${PACKAGES[*]}"
	dpkgargs=()
	for o in "${DPKG_OPTS[@]}"; do dpkgargs+=(--dpkgopt="$o"); done
	mmdebstrap --variant=minbase --mode=root --format=tar \
		--include="$(IFS=,; echo "${PACKAGES[*]}")" \
		--aptopt='APT::Install-Recommends "false"' \
		"${dpkgargs[@]}" \
		--skip=download/empty --skip=essential/unlink \
		--setup-hook="$BASE_HOOK" \
		--setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
		--setup-hook="sync-in $CACHE/debs /var/cache/apt/archives/" \
		--customize-hook="sync-out /var/cache/apt/archives $CACHE/debs" \
		--customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
		"$SUITE" "$BASE_TAR.tmp" "$MIRROR"
	mv "$BASE_TAR.tmp" "$BASE_TAR"
	# keep only the current cache entry
	find "$CACHE" -maxdepth 1 -name 'rootfs-*.tar' ! -name "rootfs-$KEY.tar" -delete
else
	log "using cached rootfs $BASE_TAR"
fi

# --- appliance layer ---------------------------------------------------------
R="$OUT/rootfs"
rm -rf "$R" "$OUT/esp" && mkdir -p "$R" "$OUT/esp"
log "unpacking rootfs"
tar --xattrs --xattrs-include='*' --numeric-owner -C "$R" -xpf "$BASE_TAR"

KVER=$(basename "$(ls -d "$R"/lib/modules/*)")
[ -n "$KVER" ] && [ -f "$R/boot/vmlinuz-$KVER" ] || die "no kernel in rootfs"
log "kernel $KVER"

F="$HERE/files"
install -D -m0755 "$XDERPD_BIN" "$R/usr/bin/xderpd"
install -d "$R/usr/lib/xderp"
install -m0755 "$F"/lib/xderp-config "$F"/lib/xderp-console-report "$F"/lib/xderpd-prestart "$R/usr/lib/xderp/"
install -m0644 "$F"/xderp.conf.example "$R/usr/lib/xderp/xderp.conf.example"
for u in "$F"/systemd/*.service; do install -m0644 "$u" "$R/usr/lib/systemd/system/"; done
install -D -m0644 "$F"/sysusers-xderp.conf "$R/usr/lib/sysusers.d/xderp.conf"
install -D -m0644 "$F"/wait-online-any.conf "$R/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf"
install -D -m0644 "$F"/journald-volatile.conf "$R/etc/systemd/journald.conf.d/xderp.conf"
install -m0644 "$F"/fstab "$R/etc/fstab"
echo xderp > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
# Read-only root: an empty machine-id makes systemd use a transient one.
: > "$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
ln -sf /etc/machine-id "$R/var/lib/dbus/machine-id"
ln -sf /run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
mkdir -p "$R/etc/xderp" "$R/boot/efi" "$R/var/lib/xderp"

log "users and units"
chroot "$R" systemd-sysusers /usr/lib/sysusers.d/xderp.conf
chroot "$R" systemctl enable xderpd.service xderp-config.service \
	systemd-networkd.service systemd-resolved.service systemd-timesyncd.service >/dev/null 2>&1
# Nothing may write the root or reach out for packages at run time.
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
	e2scrub_reap.service fstrim.timer systemd-firstboot.service >/dev/null 2>&1 || true
chroot "$R" systemctl set-default multi-user.target >/dev/null 2>&1
passwd -R "$R" -l root >/dev/null

log "ESP"
install -m0644 "$R/boot/vmlinuz-$KVER" "$OUT/esp/vmlinuz"
install -m0644 "$R/boot/initrd.img-$KVER" "$OUT/esp/initrd.img"
# The ESP carries the kernel; the root keeps only the modules.
rm -f "$R"/boot/vmlinuz-* "$R"/boot/initrd.img-* "$R"/vmlinuz* "$R"/initrd.img*
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/* "$R"/var/log/*.log "$R"/tmp/*

ESP_IMG="$OUT/esp.img"
rm -f "$ESP_IMG"
mkfs.vfat -F 32 -n XDERP_ESP -C "$ESP_IMG" $((ESP_MB * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$ESP_IMG" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/xderp
mcopy -i "$ESP_IMG" "$SDBOOT" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$ESP_IMG" "$OUT/esp/vmlinuz" "$OUT/esp/initrd.img" ::/xderp/
printf 'default xderp.conf\ntimeout 0\nconsole-mode keep\neditor no\nrandom-seed-mode off\n' > "$OUT/esp/loader.conf"
cat > "$OUT/esp/xderp.conf" <<EOF
title   xderp appliance ($KVER)
linux   /xderp/vmlinuz
initrd  /xderp/initrd.img
options root=PARTUUID=$ROOT_UUID ro rootwait console=ttyS0,115200 console=tty0 quiet systemd.show_status=error
EOF
mcopy -i "$ESP_IMG" "$OUT/esp/loader.conf" ::/loader/loader.conf
mcopy -i "$ESP_IMG" "$OUT/esp/xderp.conf" ::/loader/entries/xderp.conf

log "config partition"
CONF_IMG="$OUT/conf.img"
rm -f "$CONF_IMG"
mkfs.vfat -n XDERP_CONF -C "$CONF_IMG" $((CONF_MB * 1024)) >/dev/null
mcopy -i "$CONF_IMG" "$F"/xderp.conf.example ::/xderp.conf
mcopy -i "$CONF_IMG" "$F"/README-conf.txt ::/README.txt

log "root filesystem"
ROOT_IMG="$OUT/root.img"
rm -f "$ROOT_IMG"
used_mb=$(du -sm --apparent-size "$R" | cut -f1)
log "rootfs content ${used_mb} MiB of ${ROOT_MB} MiB"
[ "$used_mb" -lt $((ROOT_MB * 90 / 100)) ] || die "rootfs (${used_mb} MiB) does not fit the ${ROOT_MB} MiB root partition"
# No journal: the root is mounted read-only and never written.
mkfs.ext4 -q -L XDERP_ROOT -O ^has_journal -m 0 -d "$R" "$ROOT_IMG" "${ROOT_MB}M"

log "state partition"
STATE_IMG="$OUT/state.img"
rm -f "$STATE_IMG"
mkfs.ext4 -q -L XDERP_STATE -m 0 "$STATE_IMG" "${STATE_MB}M"

log "disk image"
DISK="$OUT/xderp.img"
rm -f "$DISK" "$DISK.zst"
truncate -s "${DISK_MB}M" "$DISK"
sfdisk --quiet "$DISK" <<EOF
label: gpt
unit: sectors
start=$((ESP_START * 2048)), size=$((ESP_MB * 2048)), type=$GUID_ESP, uuid=$ESP_UUID, name="xderp-esp"
start=$((ROOT_START * 2048)), size=$((ROOT_MB * 2048)), type=$GUID_ROOT_X86_64, uuid=$ROOT_UUID, name="xderp-root"
start=$((CONF_START * 2048)), size=$((CONF_MB * 2048)), type=$GUID_MSDATA, uuid=$CONF_UUID, name="xderp-conf"
start=$((STATE_START * 2048)), size=$((STATE_MB * 2048)), type=$GUID_LINUX, uuid=$STATE_UUID, name="xderp-state"
EOF
place() { dd if="$1" of="$DISK" bs=1M seek="$2" conv=notrunc,sparse status=none; }
place "$ESP_IMG" "$ESP_START"
place "$ROOT_IMG" "$ROOT_START"
place "$CONF_IMG" "$CONF_START"
place "$STATE_IMG" "$STATE_START"
rm -f "$ESP_IMG" "$ROOT_IMG" "$CONF_IMG" "$STATE_IMG"

cat > "$OUT/layout.env" <<EOF
# xderp disk layout (MiB offsets/sizes), written by build.sh
KERNEL_VERSION=$KVER
ESP_START=$ESP_START
ESP_MB=$ESP_MB
ROOT_START=$ROOT_START
ROOT_MB=$ROOT_MB
CONF_START=$CONF_START
CONF_MB=$CONF_MB
STATE_START=$STATE_START
STATE_MB=$STATE_MB
DISK_MB=$DISK_MB
EOF

log "compressing (zstd -$ZSTD_LEVEL)"
zstd -q -T0 -"$ZSTD_LEVEL" "$DISK" -o "$DISK.zst"
(cd "$OUT" && sha256sum xderp.img xderp.img.zst > xderp.img.sha256)
rm -rf "$R" "$OUT/esp"
raw=$(stat -c %s "$DISK"); zst=$(stat -c %s "$DISK.zst")
log "done: $DISK ($((raw / 1048576)) MiB raw), $DISK.zst ($((zst / 1048576)) MiB)"
echo "image: $DISK raw_bytes=$raw zst_bytes=$zst kernel=$KVER"
