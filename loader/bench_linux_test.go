//go:build linux

package loader

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// Per-packet cost through BPF_PROG_TEST_RUN: the kernel times one run of the
// program on a fresh copy of the frame; we average over b.N runs. (A kernel
// repeat count would run the program again on its own output, i.e. on the
// STUN response rather than the request, so it is not used.) Compare against
// BenchmarkXDPEmpty (the same harness around an XDP_PASS program).

func benchProg(b *testing.B, prog *ebpf.Program, frame []byte) {
	const repeat = 1
	var total float64
	for b.Loop() {
		_, d, err := prog.Benchmark(frame, repeat, nil)
		if err != nil {
			b.Fatal(err)
		}
		total += float64(d.Nanoseconds())
	}
	b.ReportMetric(total/float64(b.N), "ns/pkt")
}

func BenchmarkXDP(b *testing.B) {
	x := loadTest(b, Config{DERPPorts: []uint16{443}})
	for _, bc := range []struct {
		name  string
		frame []byte
	}{
		{"ipv4-stun", frame{src: cli4, dst: srv4, payload: tsRequest()}.build()},
		{"ipv6-stun", frame{src: cli6, dst: srv6, payload: tsRequest()}.build()},
		{"ipv4-udp-other", frame{src: cli4, dst: withPort(srv4, 41641), payload: make([]byte, 100)}.build()},
		{"ipv6-udp-other", frame{src: cli6, dst: withPort(srv6, 41641), payload: make([]byte, 100)}.build()},
	} {
		b.Run(bc.name, func(b *testing.B) { benchProg(b, x.objs.XderpXdp, bc.frame) })
	}
}

func BenchmarkXDPEmpty(b *testing.B) {
	loadTest(b, Config{}) // skips without privileges
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.XDP,
		Instructions: asm.Instructions{asm.LoadImm(asm.R0, 2, asm.DWord), asm.Return()},
		License:      "BSD",
	})
	if err != nil {
		b.Fatal(err)
	}
	defer prog.Close()
	benchProg(b, prog, frame{src: cli4, dst: srv4, payload: tsRequest()}.build())
}

// BenchmarkXDPBounce is the per-request cost of the load generator of
// BenchmarkVethSTUNBounce (package bpf/loadgen): xderp's response to a flow's
// request turned back into that request. Compare with BenchmarkXDP/ipv4-stun
// (what xderp spends answering it) and BenchmarkXDPEmpty.
func BenchmarkXDPBounce(b *testing.B) {
	x := loadTest(b, Config{})
	frames := bounceFrames(withPort(cli4, 20000), srv4, macA, macB, 1)
	bn := loadBouncer(b, frames, 0)
	_, resp := run(b, x, frames[0])
	benchProg(b, bn.objs.BounceXdp, resp)
}
