//go:build linux

package loader

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/xderp/xderp/bpf/loadgen"
	"github.com/xderp/xderp/userspace/metrics"
	"github.com/xderp/xderp/userspace/stun"
	"github.com/xderp/xderp/userspace/stunserver"
)

// bouncer is the closed-loop STUN load generator of package bpf/loadgen,
// attached to the client end of a vethEnv in place of its XDP_PASS program:
// every binding response to one of its flows goes back out as that flow's
// request, so the requests seeded once keep circulating between it and the
// server end until the stop flag, the per-CPU budget or the next bouncer.
type bouncer struct {
	e      *vethEnv
	objs   loadgen.BounceObjects
	frames [][]byte // frames[i]: the request of flow i (client port base+i)
	budget uint64
}

const (
	bounceMaxFlows = 1024 // MAX_FLOWS in bounce.c
	bounceReqLen   = 82   // REQ_LEN in bounce.c: Ethernet, IPv4, UDP, a 40-byte request
)

// newBouncer loads a bouncer with flows flows (each a Tailscale-style
// binding request to the server end's STUN port, with its own client port
// and transaction ID) and a budget of requests per CPU, and attaches it to
// the client end (replacing the program there; link update, so the client
// end never lacks a program).
func (e *vethEnv) newBouncer(t testing.TB, flows int, budget uint64) *bouncer {
	t.Helper()
	if flows < 1 || flows > bounceMaxFlows {
		t.Fatalf("bouncer: %d flows, want 1..%d", flows, bounceMaxFlows)
	}
	// Each bouncer of e gets its own client port range: responses still in
	// flight for an earlier bouncer's flows are then stale (dropped and
	// counted), never taken for this one's.
	base := 20000 + e.bounces%40*bounceMaxFlows
	e.bounces++

	var srvMAC, cliMAC net.HardwareAddr
	e.in(e.srvHandle, func() {
		ifc, err := net.InterfaceByName(e.srvIf)
		if err != nil {
			t.Fatal(err)
		}
		srvMAC = ifc.HardwareAddr
	})
	e.in(e.cliHandle, func() {
		ifc, err := net.InterfaceByName(e.cliIf)
		if err != nil {
			t.Fatal(err)
		}
		cliMAC = ifc.HardwareAddr
	})
	b := loadBouncer(t, bounceFrames(netip.AddrPortFrom(e.cli4, base), netip.AddrPortFrom(e.srv4, DefaultSTUNPort), cliMAC, srvMAC, flows), budget)
	b.e = e
	if err := e.cliXDP.Update(b.objs.BounceXdp); err != nil {
		t.Fatalf("attach bouncer: %v", err)
	}
	return b
}

// bounceFrames returns the requests of flows flows: flow i is a
// Tailscale-style binding request from client port cli.Port()+i to srv, with
// a transaction ID of its own.
func bounceFrames(cli, srv netip.AddrPort, cliMAC, srvMAC net.HardwareAddr, flows int) [][]byte {
	var frames [][]byte
	for i := range flows {
		var tx stun.TxID
		copy(tx[:], "bounce")
		binary.BigEndian.PutUint16(tx[6:], cli.Port())
		binary.BigEndian.PutUint32(tx[8:], uint32(i))
		f := frame{src: netip.AddrPortFrom(cli.Addr(), cli.Port()+uint16(i)), dst: srv, payload: stun.AppendRequest(nil, tx)}.build()
		copy(f[0:6], srvMAC)
		copy(f[6:12], cliMAC)
		frames = append(frames, f)
	}
	return frames
}

// loadBouncer loads (without attaching) a bouncer whose flow i is frames[i],
// a request from client port base+i (the first frame's source port is base)
// to the server port DefaultSTUNPort.
func loadBouncer(t testing.TB, frames [][]byte, budget uint64) *bouncer {
	t.Helper()
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	b := &bouncer{frames: frames, budget: budget}
	spec, err := loadgen.LoadBounce()
	if err != nil {
		t.Fatal(err)
	}
	base := binary.BigEndian.Uint16(frames[0][14+20:])
	cfg := loadgen.BounceConfig{ServerPort: DefaultSTUNPort, BasePort: base, Flows: uint32(len(frames)), Budget: budget}
	if err := spec.Variables[loadgen.BounceVarBounceCfg].Set(cfg); err != nil {
		t.Fatal(err)
	}
	if err := spec.LoadAndAssign(&b.objs, nil); err != nil {
		t.Fatalf("load bouncer: %v", err)
	}
	t.Cleanup(func() { b.objs.Close() })
	for i, f := range frames {
		var tm loadgen.BounceTmpl
		if len(f) != bounceReqLen {
			t.Fatalf("template of %d bytes, want %d", len(f), bounceReqLen)
		}
		copy(tm.Frame[:], f)
		if err := b.objs.BounceTemplates.Put(uint32(i), tm); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// seed sends perFlow copies of every flow's request from a packet socket on
// the client end, the flows spread over cpus (flow i from cpus[i%len]): on a
// veth pair with one queue per CPU and XPS (see xpsPerCPU), a request sent
// from a CPU keeps circulating on that CPU's queues. It returns the number of
// frames the socket took.
func (b *bouncer) seed(t testing.TB, perFlow int, cpus []int) int {
	t.Helper()
	var fd, ifindex int
	var err error
	b.e.in(b.e.cliHandle, func() {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err == nil {
			var ifc *net.Interface
			if ifc, err = net.InterfaceByName(b.e.cliIf); err == nil {
				ifindex = ifc.Index
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: 0x0008 /* htons(ETH_P_IP) */}
	sent := make([]int, len(cpus))
	errs := make([]error, len(cpus))
	var wg sync.WaitGroup
	for c, cpu := range cpus {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The thread is never unlocked: it exits with the goroutine,
			// taking its CPU affinity with it.
			runtime.LockOSThread()
			var set unix.CPUSet
			set.Set(cpu)
			if errs[c] = unix.SchedSetaffinity(0, &set); errs[c] != nil {
				return
			}
			for range perFlow {
				for i := c; i < len(b.frames); i += len(cpus) {
					if unix.Sendto(fd, b.frames[i], 0, sa) == nil {
						sent[c]++
					}
				}
			}
		}()
	}
	wg.Wait()
	n := 0
	for c := range cpus {
		if errs[c] != nil {
			t.Fatalf("seed from cpu %d: %v", cpus[c], errs[c])
		}
		n += sent[c]
	}
	return n
}

// perCPU returns the bouncer's counters of each possible CPU.
func (b *bouncer) perCPU(t testing.TB) []loadgen.BounceStats {
	t.Helper()
	var per []loadgen.BounceStats
	if err := b.objs.BounceStats.Lookup(uint32(0), &per); err != nil {
		t.Fatal(err)
	}
	return per
}

// stats returns the bouncer's counters summed over CPUs.
func (b *bouncer) stats(t testing.TB) loadgen.BounceStats {
	t.Helper()
	var s loadgen.BounceStats
	for _, p := range b.perCPU(t) {
		s.Seen += p.Seen
		s.Sent += p.Sent
		s.Stopped += p.Stopped
		s.OverBudget += p.OverBudget
		s.Resize += p.Resize
		s.Stale += p.Stale
		s.Bad += p.Bad
		s.Other += p.Other
	}
	return s
}

// stop makes the bouncer drop every further response: the loop ends.
func (b *bouncer) stop(t testing.TB) {
	t.Helper()
	if err := b.objs.BounceStop.Set(uint32(1)); err != nil {
		t.Fatal(err)
	}
}

// waitStats polls the bouncer's counters until cond holds, failing after
// timeout with the last counters and what.
func (b *bouncer) waitStats(t testing.TB, timeout time.Duration, what string, cond func(loadgen.BounceStats) bool) loadgen.BounceStats {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s := b.stats(t)
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("bouncer: %s not reached in %v: %+v", what, timeout, s)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// xpsPerCPU maps transmit queue i of both ends to CPU i (XPS), so whatever a
// CPU sends on the pair lands in that CPU's receive queue on the other end.
func (e *vethEnv) xpsPerCPU(t testing.TB, queues int) {
	t.Helper()
	for _, c := range []struct{ ns, ifc string }{{e.cliNS, e.cliIf}, {e.srvNS, e.srvIf}} {
		var script strings.Builder
		for i := range queues {
			fmt.Fprintf(&script, "echo %x > /sys/class/net/%s/queues/tx-%d/xps_cpus\n", 1<<i, c.ifc, i)
		}
		sh(t, "ip", "netns", "exec", c.ns, "sh", "-ec", script.String())
	}
}

// startSTUNServer starts the daemon's userspace STUN server on the server
// end's port 3478 with its default number of sockets (one per CPU).
func (e *vethEnv) startSTUNServer(t testing.TB) (*stunserver.Server, *metrics.Registry) {
	t.Helper()
	reg := metrics.NewRegistry()
	s := stunserver.New(stunserver.Options{Metrics: reg})
	var err error
	e.in(e.srvHandle, func() { err = s.Start(context.Background(), fmt.Sprintf(":%d", DefaultSTUNPort), 0) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, reg
}

// stunRequests reads the server's stun_requests counters by disposition,
// as a scrape of /metrics would.
func stunRequests(t testing.TB, reg *metrics.Registry) map[string]uint64 {
	t.Helper()
	var buf bytes.Buffer
	if err := reg.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, `stun_requests{disposition="`)
		if !ok {
			continue
		}
		disp, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			t.Fatalf("metrics line %q", line)
		}
		v, err := strconv.ParseUint(val, 10, 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[disp] = v
	}
	return out
}

// allowedCPUs returns the CPUs this process may run on.
func allowedCPUs(t testing.TB) []int {
	t.Helper()
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	var cpus []int
	for i := range 1024 {
		if set.IsSet(i) {
			cpus = append(cpus, i)
		}
	}
	return cpus
}

// TestBouncePacketTable runs the bouncer through BPF_PROG_TEST_RUN on the
// responses xderp's program builds: each flow's response becomes exactly that
// flow's request (XDP_TX); responses that are not a flow's (another
// transaction ID, a port outside the flows) are dropped, everything else is
// passed; the budget and the stop flag drop; the counters add up.
func TestBouncePacketTable(t *testing.T) {
	x := loadTest(t, Config{})
	cli := netip.AddrPortFrom(cli4.Addr(), 20000)
	frames := bounceFrames(cli, srv4, macA, macB, 4)
	const budget = 2
	b := loadBouncer(t, frames[:3], budget) // flows 0, 1, 2; frames[3] is port 20003, not a flow
	// The budget is per CPU: run every case on one.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var old, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		t.Fatal(err)
	}
	one.Set(allowedCPUs(t)[0])
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		t.Fatal(err)
	}
	defer unix.SchedSetaffinity(0, &old)

	respond := func(req []byte) []byte {
		t.Helper()
		ret, out := run(t, x, req)
		if ret != xdpTX {
			t.Fatalf("xderp did not answer %x: action %d", req, ret)
		}
		return out
	}
	bounce := func(in []byte) (uint32, []byte) {
		t.Helper()
		return runProg(t, b.objs.BounceXdp, in)
	}
	badTx := respond(frames[0])
	badTx[14+20+8+19] ^= 1
	otherPort := frame{src: withPort(srv4, 3479), dst: cli, payload: make([]byte, 32)}.build()
	arp := append(slices.Clone(frames[0][:12]), 0x08, 0x06)
	arp = append(arp, make([]byte, 28)...)
	v6 := respond(frame{src: withPort(cli6, 20000), dst: srv6, payload: stun.AppendRequest(nil, stun.TxID{})}.build())
	for _, tc := range []struct {
		name   string
		in     []byte
		action uint32
		out    []byte // for XDP_TX
	}{
		{"flow 0", respond(frames[0]), xdpTX, frames[0]},
		{"flow 2", respond(frames[2]), xdpTX, frames[2]},
		{"another transaction ID", badTx, xdpDrop, nil},
		{"a port that is no flow", respond(frames[3]), xdpDrop, nil},
		{"a port below the flows", respond(bounceFrames(withPort(cli, 19999), srv4, macA, macB, 1)[0]), xdpDrop, nil},
		{"another source port", otherPort, xdpPass, nil},
		{"ARP", arp, xdpPass, nil},
		{"truncated", respond(frames[1])[:50], xdpPass, nil},
		{"IPv6", v6, xdpPass, nil},
		{"request, not response", frames[1], xdpPass, nil},
		{"over budget", respond(frames[1]), xdpDrop, nil},
	} {
		ret, out := bounce(tc.in)
		if ret != tc.action {
			t.Errorf("%s: action %d, want %d", tc.name, ret, tc.action)
		} else if tc.out != nil && !bytes.Equal(out, tc.out) {
			t.Errorf("%s: sent\n%x\nwant the flow's request\n%x", tc.name, out, tc.out)
		}
	}
	if err := b.objs.BounceStop.Set(uint32(1)); err != nil {
		t.Fatal(err)
	}
	if ret, _ := bounce(respond(frames[0])); ret != xdpDrop {
		t.Errorf("stopped: action %d, want drop", ret)
	}
	got := b.stats(t)
	want := loadgen.BounceStats{Seen: 4, Sent: 2, OverBudget: 1, Stopped: 1, Bad: 1, Stale: 2, Other: 5}
	if got != want {
		t.Errorf("counters %+v, want %+v", got, want)
	}
}

// TestVethBounce proves the load generator of BenchmarkVethSTUNBounce: with
// xderp answering, a few requests seeded once circulate until every CPU that
// carries one has sent its budget, and every request sent is one xderp
// answered and one response the bouncer saw (exact counts, nothing lost);
// the stop flag ends a loop with no budget in sight; with xderp detached, the
// daemon's userspace STUN server answers the same loop, and while xderp was
// attached that server saw nothing.
func TestVethBounce(t *testing.T) {
	const queues = 2
	e := newVethEnvQueues(t, queues)
	e.xpsPerCPU(t, queues)
	_, reg := e.startSTUNServer(t) // running behind XDP, as in the daemon
	cpus := allowedCPUs(t)
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	const flows, budget = 4, 300

	// Budget: with 4 requests in flight nothing is lost, so the counts are exact.
	x := e.attach(Config{})
	defer x.Close()
	b := e.newBouncer(t, flows, budget)
	answered0 := counterOf(t, x, "ipv4/tx/stun_answered")
	if n := b.seed(t, 1, cpus); n != flows {
		t.Fatalf("seeded %d requests, want %d", n, flows)
	}
	s := b.waitStats(t, 20*time.Second, "every request over budget", func(s loadgen.BounceStats) bool { return s.OverBudget == flows })
	answered := counterOf(t, x, "ipv4/tx/stun_answered") - answered0
	if s.Seen != s.Sent+s.OverBudget || s.Stopped != 0 || s.Resize != 0 || s.Bad != 0 || s.Stale != 0 {
		t.Errorf("bouncer counters do not add up: %+v", s)
	}
	if answered != flows+s.Sent || s.Seen != answered {
		t.Errorf("xderp answered %d, bouncer seeded %d, sent %d and saw %d responses: want answered = seeded + sent = seen", answered, flows, s.Sent, s.Seen)
	}
	full := 0
	for cpu, p := range b.perCPU(t) {
		if p.Sent > budget {
			t.Errorf("cpu %d sent %d requests, budget %d", cpu, p.Sent, budget)
		}
		if p.Sent == budget {
			full++
		}
	}
	if full == 0 || s.Sent > uint64(ncpu)*budget {
		t.Errorf("sent %d requests, no CPU at its budget of %d (or more than %d CPUs' worth)", s.Sent, budget, ncpu)
	}
	t.Logf("budget %d per CPU: %d requests sent by %d CPU(s) at budget, %d answered by xderp", budget, s.Sent, full, answered)

	// Stop flag: no budget in sight; once every seeded request has been
	// dropped as stopped, none is left in flight.
	b = e.newBouncer(t, flows, 1<<40)
	answered0 = counterOf(t, x, "ipv4/tx/stun_answered")
	if n := b.seed(t, 1, cpus); n != flows {
		t.Fatalf("seeded %d requests, want %d", n, flows)
	}
	b.waitStats(t, 20*time.Second, "1000 requests sent", func(s loadgen.BounceStats) bool { return s.Sent >= 1000 })
	b.stop(t)
	s = b.waitStats(t, 20*time.Second, "every request stopped", func(s loadgen.BounceStats) bool { return s.Stopped == flows })
	answered = counterOf(t, x, "ipv4/tx/stun_answered") - answered0
	if s.Seen != s.Sent+s.Stopped || s.OverBudget != 0 || answered != flows+s.Sent || s.Seen != answered {
		t.Errorf("after stop: bouncer %+v, xderp answered %d: want seen = sent + 4 stopped = answered", s, answered)
	}
	if got := stunRequests(t, reg); len(got) != 0 && (got["success"] != 0 || got["not_stun"] != 0) {
		t.Errorf("the userspace server saw requests while XDP answered: %v", got)
	}

	// The userspace server answers the same loop once xderp is detached
	// (and an XDP_PASS program takes its place: see BenchmarkVethSTUNBounce).
	x.Close()
	if err := Detach(e.srvIf, e.pinDir); err != nil {
		t.Fatal(err)
	}
	e.attachPass(t, e.srvHandle, e.srvIf)
	b = e.newBouncer(t, flows, budget)
	if n := b.seed(t, 1, cpus); n != flows {
		t.Fatalf("seeded %d requests, want %d", n, flows)
	}
	s = b.waitStats(t, 20*time.Second, "every request over budget", func(s loadgen.BounceStats) bool { return s.OverBudget == flows })
	// The server counts an answer once its send returns, possibly after
	// the bouncer has it: poll for the count.
	deadline := time.Now().Add(10 * time.Second)
	var got map[string]uint64
	for {
		got = stunRequests(t, reg)
		if got["success"] >= flows+s.Sent || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got["success"] != flows+s.Sent || s.Seen != got["success"] || s.Seen != s.Sent+s.OverBudget || s.Bad+s.Stale+s.Resize != 0 {
		t.Errorf("userspace server answered %v, bouncer seeded %d: %+v; want success = seeded + sent = seen", got, flows, s)
	}
	t.Logf("userspace: %d requests sent, %d answered by the userspace server", s.Sent, got["success"])
}
