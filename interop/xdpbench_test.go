//go:build linux

package interop_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/xderp/xderp/bpf"
	"github.com/xderp/xderp/userspace/stun"
)

// BenchmarkXDPvsTailscale runs xderp's XDP program and the object Tailscale
// ships in tailscale.com/derp/xdp (v1.102.5) on the same IPv4 STUN, IPv6
// STUN and non-STUN UDP frames through BPF_PROG_TEST_RUN (one kernel-timed
// run per call, averaged), plus an empty XDP_PASS program whose cost is
// subtracted, and reports ns/pkt for each and the ratios.
//
// It needs root (or CAP_BPF + CAP_PERFMON) and reads Tailscale's object from
// the module cache (go list -m tailscale.com), so this module must require
// tailscale.com v1.102.5.
func BenchmarkXDPvsTailscale(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to load XDP programs")
	}
	ours, tsProg, empty := loadPrograms(b)
	tx := stun.TxID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	req := stun.AppendRequest(nil, tx)
	frames := []struct {
		name  string
		frame []byte
		want  uint32 // XDP action both must return
	}{
		{"ipv4-stun", udpFrame(netip.MustParseAddrPort("192.0.2.1:1025"), netip.MustParseAddrPort("198.51.100.7:3478"), req), 3},
		{"ipv6-stun", udpFrame(netip.MustParseAddrPort("[2001:db8::1]:1025"), netip.MustParseAddrPort("[2001:db8:1::7]:3478"), req), 3},
		{"ipv4-udp-other", udpFrame(netip.MustParseAddrPort("192.0.2.1:1025"), netip.MustParseAddrPort("198.51.100.7:41641"), make([]byte, 100)), 2},
	}
	emptyNs := perPacket(b, empty, frames[0].frame)
	b.Logf("empty program: %.1f ns/pkt (subtracted below)", emptyNs)
	for _, f := range frames {
		for name, p := range map[string]*ebpf.Program{"xderp": ours, "tailscale": tsProg} {
			if ret, _, err := p.Benchmark(f.frame, 1, nil); err != nil || ret != f.want {
				b.Fatalf("%s on %s: action %d (%v), want %d", name, f.name, ret, err, f.want)
			}
		}
		var o, t float64
		b.Run(f.name+"/xderp", func(b *testing.B) { o = perPacket(b, ours, f.frame) })
		b.Run(f.name+"/tailscale", func(b *testing.B) { t = perPacket(b, tsProg, f.frame) })
		target := 0.5
		if !strings.Contains(f.name, "stun") {
			target = 0.25
		}
		ratio := (o - emptyNs) / (t - emptyNs)
		verdict := "reached"
		if ratio > target {
			verdict = "NOT reached"
		}
		fmt.Printf("xdp %-15s xderp %6.1f ns  tailscale %6.1f ns  (minus empty %.1f)  ratio %.2f  target <= %.2f %s\n",
			f.name, o, t, emptyNs, ratio, target, verdict)
	}
}

// perPacket reports and returns the mean kernel-timed duration of one run.
// (A kernel repeat count would rerun the program on its own output, the
// STUN response, so each call runs once on a fresh copy.)
func perPacket(b *testing.B, p *ebpf.Program, frame []byte) float64 {
	var total float64
	n := 0
	for range max(b.N, 20000) {
		_, d, err := p.Benchmark(frame, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		total += float64(d.Nanoseconds())
		n++
	}
	ns := total / float64(n)
	b.ReportMetric(ns, "ns/pkt")
	return ns
}

func loadPrograms(b *testing.B) (ours, ts, empty *ebpf.Program) {
	spec, err := bpf.LoadXderp()
	if err != nil {
		b.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { coll.Close() })
	ours = coll.Programs["xderp_xdp"]

	dir, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "tailscale.com").Output()
	if err != nil {
		b.Fatalf("locate tailscale.com: %v", err)
	}
	tsSpec, err := ebpf.LoadCollectionSpec(filepath.Join(strings.TrimSpace(string(dir)), "derp", "xdp", "bpf_bpfel.o"))
	if err != nil {
		b.Fatal(err)
	}
	tsColl, err := ebpf.NewCollection(tsSpec)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tsColl.Close() })
	// Tailscale's config_map: {u16 dst_port, u16 drop_stun}, native endian.
	if err := tsColl.Maps["config_map"].Put(uint32(0), [2]uint16{3478, 0}); err != nil {
		b.Fatal(err)
	}
	for _, p := range tsColl.Programs {
		ts = p
	}
	empty, err = ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "BSD",
		Instructions: asm.Instructions{asm.LoadImm(asm.R0, 2, asm.DWord), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { empty.Close() })
	return ours, ts, empty
}

func sum(s uint32, p []byte) uint32 {
	for i := 0; i+1 < len(p); i += 2 {
		s += uint32(p[i])<<8 | uint32(p[i+1])
	}
	if len(p)%2 == 1 {
		s += uint32(p[len(p)-1]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// udpFrame builds an Ethernet frame with correct IP and UDP checksums.
func udpFrame(src, dst netip.AddrPort, payload []byte) []byte {
	f := []byte{2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa, 0x08, 0x00}
	u := binary.BigEndian.AppendUint16(nil, src.Port())
	u = binary.BigEndian.AppendUint16(u, dst.Port())
	u = binary.BigEndian.AppendUint16(u, uint16(8+len(payload)))
	u = append(append(u, 0, 0), payload...)
	ps := sum(sum(0, src.Addr().AsSlice()), dst.Addr().AsSlice()) + 17 + uint32(len(u))
	binary.BigEndian.PutUint16(u[6:], ^fold(sum(ps, u)))
	if src.Addr().Is4() {
		ip := []byte{0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0}
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(u)))
		ip = append(append(ip, src.Addr().AsSlice()...), dst.Addr().AsSlice()...)
		binary.BigEndian.PutUint16(ip[10:], ^fold(sum(0, ip)))
		return append(append(f, ip...), u...)
	}
	f[12], f[13] = 0x86, 0xdd
	ip := []byte{0x60, 0, 0, 0, 0, 0, 17, 64}
	binary.BigEndian.PutUint16(ip[4:], uint16(len(u)))
	ip = append(append(ip, src.Addr().AsSlice()...), dst.Addr().AsSlice()...)
	return append(append(f, ip...), u...)
}
