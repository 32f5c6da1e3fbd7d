#!/bin/bash
# config-test.sh: check files/lib/xderp-config (the xderp.conf parser) on the
# host, in dry-run mode: good files produce the expected daemon flags and
# network configuration; each bad file is refused with a message naming the
# setting or line. No VM, no root needed. Run by test.sh first.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CFG="$HERE/files/lib/xderp-config"
T=$(mktemp -d "${TMPDIR:-/tmp}/xderp-config-test.XXXXXX")
trap 'rm -rf "$T"' EXIT
fails=0
run() { # run NAME: parse $T/NAME.conf into $T/NAME/
	XDERP_CONFIG_DRYRUN=1 XDERP_CONF="$T/$1.conf" XDERP_RUN="$T/$1/run" XDERP_NETDIR="$T/$1/net" \
		XDERP_TIMEDIR="$T/$1/time" XDERP_STATE=/var/lib/xderp bash "$CFG" >"$T/$1.out" 2>&1
}
expect_ok() { # expect_ok NAME FILE REGEX...: parse succeeds and FILE matches every REGEX
	local name=$1 file=$2; shift 2
	if ! run "$name"; then echo "FAIL $name: refused: $(cat "$T/$name.out")"; fails=$((fails + 1)); return; fi
	for re in "$@"; do
		if ! grep -qE -- "$re" "$T/$name/$file"; then
			echo "FAIL $name: $file lacks /$re/:"; sed 's/^/    /' "$T/$name/$file"; fails=$((fails + 1)); return
		fi
	done
	echo "ok   $name"
}
expect_err() { # expect_err NAME REGEX: parse fails with a message matching REGEX
	if run "$1"; then echo "FAIL $1: accepted"; fails=$((fails + 1)); return; fi
	if grep -qE -- "$2" "$T/$1.out"; then echo "ok   $1: $(head -1 "$T/$1.out")"; else
		echo "FAIL $1: message '$(cat "$T/$1.out")' lacks /$2/"; fails=$((fails + 1)); fi
}

# the shipped example is valid as it is
cp "$HERE/files/xderp.conf.example" "$T/example.conf"
expect_ok example run/xderpd.env '-hostname derp1.example.com -certmode letsencrypt' '-c /var/lib/xderp/derper.key'

# Windows line endings, a byte-order mark, spaces around '=', quotes, lower-case keys
printf '\xef\xbb\xbf# from Notepad\r\nHOSTNAME = 203.0.113.7\r\nmetrics_allow="192.0.2.0/24,2001:db8::/64"\r\nSHAPE_PPS=100\r\nSHAPE_EXEMPT=198.51.100.0/24\r\nNET_DNS=192.0.2.53, 2001:db8::53\r\n' >"$T/windows.conf"
expect_ok windows run/xderpd.env '-hostname 203.0.113.7 -certmode manual' '-metrics-allow 192.0.2.0/24,2001:db8::/64' '-shape-pps 100' '-shape-exempt 198.51.100.0/24'
expect_ok windows net/50-xderp.network '^DHCP=ipv4$' '^DNS=192.0.2.53$' '^DNS=2001:db8::53$' '^ClientIdentifier=mac$'

# static address, mesh, NTP
printf 'HOSTNAME=derp2.example.com\nNET_ADDRESS=192.0.2.10/24\nNET_GATEWAY=192.0.2.1\nMESH_WITH=derp1.example.com,derp3.example.com\nMESH_PSK=%s\nNTP=ntp1.example.com,ntp2.example.com\nXDP=driver\nXDP_IFACE=enp1s0\n' \
	"$(printf 'ab%.0s' $(seq 32))" >"$T/static.conf"
expect_ok static net/50-xderp.network '^Address=192.0.2.10/24$' '^Gateway=192.0.2.1$'
expect_ok static run/xderpd.env '-mesh-with derp1.example.com,derp3.example.com' '-mesh-psk-file .*/run/mesh.psk' '-xdp driver' '-xdp-iface enp1s0'
expect_ok static time/50-xderp.conf '^NTP=ntp1.example.com ntp2.example.com$'

# an IP address with letsencrypt: a CA-issued IP certificate
printf 'HOSTNAME=192.0.2.1\nCERTMODE=letsencrypt\n' >"$T/ipacme.conf"
expect_ok ipacme run/xderpd.env '-hostname 192.0.2.1 -certmode letsencrypt' '-acme-ip-certs'

# refusals name the setting or the line
printf '# nothing\n' >"$T/nohost.conf";                          expect_err nohost 'HOSTNAME is not set'
printf 'HOSTNAME=a.example\nCERTMODE=bogus\n' >"$T/certmode.conf"; expect_err certmode "CERTMODE: 'bogus'"
printf 'HOSTNAME=a.example\nFOO=1\n' >"$T/unknown.conf";         expect_err unknown "line 2: unknown setting 'FOO'"
printf 'HOSTNAME=a.example\njust words\n' >"$T/noeq.conf";       expect_err noeq 'line 2: expected KEY=VALUE'
printf 'HOSTNAME=a.example\nMETRICS_ALLOW=10.0.0.0\n' >"$T/cidr.conf"; expect_err cidr 'METRICS_ALLOW'
printf 'HOSTNAME=a.example\nSHAPE_PPS=-5\n' >"$T/neg.conf";      expect_err neg 'SHAPE_PPS'
printf 'HOSTNAME=a.example\nSTUN_PORT=70000\n' >"$T/port.conf";  expect_err port 'STUN_PORT: 70000'
printf 'HOSTNAME=a.example\nMESH_WITH=b.example\n' >"$T/meshpsk.conf"; expect_err meshpsk 'MESH_PSK is empty'
printf 'HOSTNAME=a.example\nNET_GATEWAY=192.0.2.1\n' >"$T/gw.conf"; expect_err gw 'NET_ADDRESS is not'
printf 'HOSTNAME=a.example\nEXTRA_ARGS=-x; reboot\n' >"$T/shell.conf"; expect_err shell 'EXTRA_ARGS: shell characters'
printf 'HOSTNAME=a.example\nEXTRA_ARGS=-home blank --verify-clients\n' >"$T/vc.conf"; expect_err vc 'EXTRA_ARGS: -verify-clients needs a tailscaled'
printf 'HOSTNAME=a.example\nEXTRA_ARGS=-verify-client-url https://admit.example/derp\n' >"$T/vcu.conf"
expect_ok vcu run/xderpd.env '-verify-client-url https://admit.example/derp'

echo "config-test: $fails failed"
[ $fails = 0 ]
