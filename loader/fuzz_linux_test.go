//go:build linux

package loader

import (
	"bytes"
	"testing"
)

// FuzzXDPvsOracle runs random and mutated frames through the program and
// through the Go oracle: action and output bytes must agree, and the program
// never aborts.
func FuzzXDPvsOracle(f *testing.F) {
	for _, tc := range packetTable() {
		f.Add(tc.frame)
	}
	cfg := Config{DERPPorts: []uint16{443}}
	x := loadTest(f, cfg)
	f.Fuzz(func(t *testing.T, b []byte) {
		// BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header
		// and longer than a page.
		if len(b) < 14 || len(b) > 1500 {
			return
		}
		want := oracle(b, cfg)
		ret, out := run(t, x, b)
		if ret == xdpAborted {
			t.Fatalf("aborted on %x", b)
		}
		if ret != want.action || !bytes.Equal(out, want.out) {
			t.Fatalf("frame %x\nprogram %d %x\noracle  %d %s %x", b, ret, out, want.action, want.reason, want.out)
		}
	})
}

// FuzzXDPvsOracleSTUN fuzzes the UDP payload sent to the STUN port inside
// well-formed frames (valid IP and UDP checksums, IPv4 or IPv6, with or
// without VLAN), so that the STUN acceptance rule itself is explored.
func FuzzXDPvsOracleSTUN(f *testing.F) {
	req := tsRequest()
	f.Add(req, uint8(0))
	f.Add(req[:20], uint8(1))
	f.Add(stunWith(0x8023, "abc"), uint8(2))
	f.Add(stunWith(0x0006, "user"), uint8(3))
	cfg := Config{DERPPorts: []uint16{443}}
	x := loadTest(f, cfg)
	f.Fuzz(func(t *testing.T, payload []byte, shape uint8) {
		if len(payload) > 1400 {
			return
		}
		fr := frame{src: cli4, dst: srv4, payload: payload, vlan: shape&1 != 0, zeroCsum: shape&4 != 0}
		if shape&2 != 0 {
			fr.src, fr.dst = cli6, srv6
		}
		b := fr.build()
		want := oracle(b, cfg)
		ret, out := run(t, x, b)
		if ret == xdpAborted {
			t.Fatalf("aborted on %x", b)
		}
		if ret != want.action || !bytes.Equal(out, want.out) {
			t.Fatalf("payload %x shape %d\nprogram %d %x\noracle  %d %s %x", payload, shape, ret, out, want.action, want.reason, want.out)
		}
	})
}
