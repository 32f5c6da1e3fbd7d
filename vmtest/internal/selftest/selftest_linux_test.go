package selftest

import (
	"encoding/binary"
	"errors"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/xderp/xderp/vmtest/guest"
)

func TestMain(m *testing.M) {
	if os.Getenv("XDERP_SELFTEST_HANG") == "1" {
		// Deliberate hang for the runner's timeout test: the binary never
		// finishes, so the guest must be reported as not coming back.
		time.Sleep(24 * time.Hour)
	}
	os.Exit(m.Run())
}

const (
	xdpDrop = 1
	xdpPass = 2
	// etherTypeLocal is the IEEE local experimental EtherType 0x88b5: the
	// program drops it, so a test can see a verdict other than pass.
	etherTypeLocal = 0x88b5
)

// newCounter makes the one-slot array map the program counts IPv4 frames in.
func newCounter(t *testing.T) *ebpf.Map {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "ipv4_count", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatalf("create map: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// countingProgram returns XDP_DROP for EtherType 0x88b5, counts IPv4 frames
// in counter, and passes everything else (short frames included).
func countingProgram(counter *ebpf.Map) *ebpf.ProgramSpec {
	return &ebpf.ProgramSpec{
		Name:    "xdp_selftest",
		Type:    ebpf.XDP,
		License: "MIT",
		Instructions: asm.Instructions{
			asm.LoadMem(asm.R2, asm.R1, 0, asm.Word), // data
			asm.LoadMem(asm.R3, asm.R1, 4, asm.Word), // data_end
			asm.Mov.Reg(asm.R4, asm.R2),
			asm.Add.Imm(asm.R4, 14),
			asm.JGT.Reg(asm.R4, asm.R3, "pass"),
			asm.LoadMem(asm.R5, asm.R2, 12, asm.Half), // EtherType, network order
			asm.JEq.Imm(asm.R5, int32(swap16(etherTypeLocal)), "drop"),
			asm.JNE.Imm(asm.R5, int32(swap16(0x0800)), "pass"),
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, counter.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "pass"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, xdpPass).WithSymbol("pass"),
			asm.Return(),
			asm.Mov.Imm(asm.R0, xdpDrop).WithSymbol("drop"),
			asm.Return(),
		},
	}
}

// brokenProgram reads the packet without a bounds check: every kernel's
// verifier must reject it.
func brokenProgram() *ebpf.ProgramSpec {
	return &ebpf.ProgramSpec{
		Name:    "xdp_broken",
		Type:    ebpf.XDP,
		License: "MIT",
		Instructions: asm.Instructions{
			asm.LoadMem(asm.R2, asm.R1, 0, asm.Word),
			asm.LoadMem(asm.R0, asm.R2, 12, asm.Half),
			asm.Mov.Imm(asm.R0, xdpPass),
			asm.Return(),
		},
	}
}

func swap16(v uint16) uint16 { return v>>8 | v<<8 }

func loadProgram(t *testing.T, spec *ebpf.ProgramSpec) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(spec)
	if err != nil {
		t.Fatalf("load %s: %v", spec.Name, err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

func readCount(t *testing.T, m *ebpf.Map) uint64 {
	t.Helper()
	var v uint64
	if err := m.Lookup(uint32(0), &v); err != nil {
		t.Fatalf("read counter: %v", err)
	}
	return v
}

func frame(etherType uint16, payload int) []byte {
	f := make([]byte, 14+payload)
	copy(f[0:6], []byte{0x02, 0, 0, 0, 0, 2})
	copy(f[6:12], []byte{0x02, 0, 0, 0, 0, 1})
	binary.BigEndian.PutUint16(f[12:14], etherType)
	return f
}

func TestProgTestRunVerdicts(t *testing.T) {
	guest.RequireRoot(t)
	counter := newCounter(t)
	prog := loadProgram(t, countingProgram(counter))
	cases := []struct {
		name    string
		frame   []byte
		verdict uint32
		counted uint64
	}{
		{"ipv4 is counted and passed", frame(0x0800, 46), xdpPass, 1},
		{"arp is passed uncounted", frame(0x0806, 28), xdpPass, 0},
		{"local ethertype is dropped", frame(etherTypeLocal, 46), xdpDrop, 0},
		{"bare header ipv4 is counted", frame(0x0800, 0), xdpPass, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := readCount(t, counter)
			got, err := prog.Run(&ebpf.RunOptions{Data: tc.frame})
			if err != nil {
				t.Fatalf("BPF_PROG_TEST_RUN: %v", err)
			}
			if got != tc.verdict {
				t.Errorf("verdict = %d, want %d", got, tc.verdict)
			}
			if d := readCount(t, counter) - before; d != tc.counted {
				t.Errorf("counter moved by %d, want %d", d, tc.counted)
			}
		})
	}
}

func TestVerifierRejectsUncheckedPacketRead(t *testing.T) {
	guest.RequireRoot(t)
	prog, err := ebpf.NewProgram(brokenProgram())
	if os.Getenv("XDERP_SELFTEST_BROKEN") == "1" {
		// The runner's negative test: use the broken program as if it were
		// good. The verifier refuses it, so this test (and the run) fails.
		if err != nil {
			t.Fatalf("load deliberately broken program: %v", err)
		}
		prog.Close()
		return
	}
	if err == nil {
		prog.Close()
		t.Fatal("the verifier accepted a packet read without a bounds check")
	}
	var ve *ebpf.VerifierError
	if !errors.As(err, &ve) {
		t.Fatalf("load failed, but not in the verifier: %v", err)
	}
}

// netnsPair makes two fresh network namespaces joined by a veth pair
// (xa0 in A, xb0 in B) with 192.0.2.1/24 and 192.0.2.2/24, up, and a
// static neighbour entry in A so no ARP is needed. Everything goes away
// when the namespaces' last handles close.
type netnsPair struct {
	orig, a, b netns.NsHandle
	ha, hb     *netlink.Handle
	xa, xb     netlink.Link
}

func newNetnsPair(t *testing.T) *netnsPair {
	t.Helper()
	runtime.LockOSThread()
	t.Cleanup(runtime.UnlockOSThread)
	p := &netnsPair{}
	var err error
	if p.orig, err = netns.Get(); err != nil {
		t.Fatalf("get current netns: %v", err)
	}
	t.Cleanup(func() { p.orig.Close() })
	for _, h := range []*netns.NsHandle{&p.a, &p.b} {
		ns, err := netns.New() // also moves this thread into it
		if err != nil {
			netns.Set(p.orig)
			t.Fatalf("create netns: %v", err)
		}
		*h = ns
		t.Cleanup(func() { ns.Close() })
	}
	if err := netns.Set(p.orig); err != nil {
		t.Fatalf("return to the original netns: %v", err)
	}
	// A minimal guest has no xfrm: name the netlink family explicitly.
	if p.ha, err = netlink.NewHandleAt(p.a, unix.NETLINK_ROUTE); err != nil {
		t.Fatalf("netlink handle in A: %v", err)
	}
	t.Cleanup(p.ha.Close)
	if p.hb, err = netlink.NewHandleAt(p.b, unix.NETLINK_ROUTE); err != nil {
		t.Fatalf("netlink handle in B: %v", err)
	}
	t.Cleanup(p.hb.Close)

	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "xa0"}, PeerName: "xb0", PeerNamespace: netlink.NsFd(int(p.b))}
	if err := p.ha.LinkAdd(veth); err != nil {
		t.Fatalf("add veth pair (is the veth module loaded?): %v", err)
	}
	if p.xa, err = p.ha.LinkByName("xa0"); err != nil {
		t.Fatalf("find xa0: %v", err)
	}
	if p.xb, err = p.hb.LinkByName("xb0"); err != nil {
		t.Fatalf("find xb0 in B: %v", err)
	}
	for _, s := range []struct {
		h    *netlink.Handle
		l    netlink.Link
		addr string
	}{{p.ha, p.xa, "192.0.2.1/24"}, {p.hb, p.xb, "192.0.2.2/24"}} {
		a, err := netlink.ParseAddr(s.addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.h.AddrAdd(s.l, a); err != nil {
			t.Fatalf("add %s to %s: %v", s.addr, s.l.Attrs().Name, err)
		}
		if err := s.h.LinkSetUp(s.l); err != nil {
			t.Fatalf("set %s up: %v", s.l.Attrs().Name, err)
		}
	}
	neigh := &netlink.Neigh{LinkIndex: p.xa.Attrs().Index, State: netlink.NUD_PERMANENT,
		IP: net.ParseIP("192.0.2.2"), HardwareAddr: p.xb.Attrs().HardwareAddr}
	if err := p.ha.NeighAdd(neigh); err != nil {
		t.Fatalf("add neighbour: %v", err)
	}
	return p
}

// in runs f with this (locked) thread in namespace ns.
func (p *netnsPair) in(t *testing.T, ns netns.NsHandle, f func()) {
	t.Helper()
	if err := netns.Set(ns); err != nil {
		t.Fatalf("enter netns: %v", err)
	}
	defer func() {
		if err := netns.Set(p.orig); err != nil {
			t.Errorf("return to the original netns: %v", err)
		}
	}()
	f()
}

func TestVethXDPCountsDatagrams(t *testing.T) {
	guest.RequireRoot(t)
	counter := newCounter(t)
	prog := loadProgram(t, countingProgram(counter))
	p := newNetnsPair(t)

	// Attach where the interface index means xb0: in namespace B.
	var l link.Link
	p.in(t, p.b, func() {
		var err error
		l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: p.xb.Attrs().Index, Flags: link.XDPDriverMode})
		if err != nil {
			t.Fatalf("attach XDP to xb0 in driver mode: %v", err)
		}
	})
	t.Cleanup(func() { l.Close() })
	info, err := prog.Info()
	if err != nil {
		t.Fatalf("program info: %v", err)
	}
	id, _ := info.ID()
	got, err := p.hb.LinkByName("xb0")
	if err != nil {
		t.Fatalf("find xb0: %v", err)
	}
	if x := got.Attrs().Xdp; x == nil || !x.Attached || x.ProgId != uint32(id) {
		t.Fatalf("xb0 XDP state %+v, want our program %d attached", x, id)
	}

	var fd int
	p.in(t, p.a, func() {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			t.Fatalf("socket in A: %v", err)
		}
	})
	t.Cleanup(func() { unix.Close(fd) })
	to := &unix.SockaddrInet4{Port: 9, Addr: [4]byte{192, 0, 2, 2}}

	// Send one datagram per tick until the program has counted one, with a
	// bound on both time and count.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for sent := 0; ; {
		if readCount(t, counter) > 0 {
			return
		}
		if sent < 100 {
			if err := unix.Sendto(fd, []byte("xderp vmtest"), 0, to); err != nil {
				t.Fatalf("send to 192.0.2.2 in B: %v", err)
			}
			sent++
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("XDP on xb0 counted no IPv4 frame after %d datagrams", sent)
		}
	}
}

func TestGuestEnvironment(t *testing.T) {
	if !guest.InVM() {
		guest.Skip(t, "checks the vmtest guest environment; not in a vmtest run")
	}
	if os.Geteuid() != 0 {
		t.Errorf("euid = %d inside vmtest, want 0", os.Geteuid())
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil {
		t.Fatalf("statfs /sys/fs/bpf: %v", err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		t.Errorf("/sys/fs/bpf is filesystem type %#x, want bpffs (%#x)", st.Type, unix.BPF_FS_MAGIC)
	}
	if _, err := os.Stat("testdata/marker.txt"); err != nil {
		t.Errorf("the package's testdata is not in the working directory: %v", err)
	}
	// Tests may read files of the module packages they import, relative
	// to their own directory, as under go test.
	if _, err := os.Stat("../../guest/guest.go"); err != nil {
		t.Errorf("the imported package vmtest/guest is not mirrored beside this one: %v", err)
	}
}

// TestKernelFeatures checks the matrix against the kernel: a feature the
// kernel lacks must be declared, and a declared one must really be missing
// (so the matrix does not rot).
func TestKernelFeatures(t *testing.T) {
	if os.Getenv("XDERP_SELFTEST_BADSKIP") == "1" {
		// The runner's negative test: a skip that names no missing kernel
		// feature must fail a vmtest run even though the binary exits 0.
		t.Skip("deliberate skip without a declared missing feature")
	}
	features := []struct {
		name, path string
	}{
		{"btf", "/sys/kernel/btf/vmlinux"},
		{"jit", "/proc/sys/net/core/bpf_jit_enable"},
	}
	for _, f := range features {
		t.Run(f.name, func(t *testing.T) {
			_, err := os.Stat(f.path)
			has := err == nil
			switch {
			case has && guest.InVM() && guest.ExpectedMissing(f.name):
				t.Errorf("the kernel matrix says this kernel lacks %s, but %s exists", f.name, f.path)
			case !has:
				guest.SkipMissingFeature(t, f.name, f.path+" does not exist")
			}
		})
	}
}

// TestToolsInNetns runs the host programs the matrix copies into guests
// (ethtool, iproute2's ip) inside a test namespace, as the veth tests do to
// turn off TX checksum offload on the sending end.
func TestToolsInNetns(t *testing.T) {
	guest.RequireRoot(t)
	for _, tool := range []string{"ethtool", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			guest.Skip(t, tool+" is not installed (apt-get install ethtool iproute2)")
		}
	}
	p := newNetnsPair(t)
	// A child forked from this locked thread starts in the thread's netns.
	run := func(name string, args ...string) string {
		t.Helper()
		var out []byte
		var err error
		p.in(t, p.a, func() { out, err = exec.Command(name, args...).CombinedOutput() })
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	if out := run("ip", "-o", "link", "show", "dev", "xa0"); !strings.Contains(out, "xa0@") {
		t.Errorf("ip link show in namespace A: %q, want xa0", out)
	}
	run("ethtool", "-K", "xa0", "tx", "off")
	if out := run("ethtool", "-k", "xa0"); !strings.Contains(out, "tx-checksumming: off") {
		t.Errorf("ethtool -k after turning TX offload off:\n%s", out)
	}
}
