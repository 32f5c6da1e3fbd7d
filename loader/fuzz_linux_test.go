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
