//go:build linux

package loader

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/xderp/xderp/userspace/stun"
	"github.com/xderp/xderp/vmtest/guest"
)

var reuseportWarm sync.Once

// warmReuseportHash sends one datagram to a SO_REUSEPORT group on ::1 and
// on 127.0.0.1 before any veth test loads both CPUs with UDP. The kernel
// seeds the reuseport hash secrets on first use and then patches a static
// branch from a workqueue; under QEMU without KVM, a 6.12 guest crashed
// with an unhandled int3 in udp_ehashfn when that patching raced both
// vCPUs running the function under a flood. Done once, quietly, and well
// before the flood (namespace setup follows), the patching has no
// concurrent callers.
func warmReuseportHash(t testing.TB) {
	reuseportWarm.Do(func() {
		for _, network := range []string{"udp4", "udp6"} {
			if err := reuseportExchange(network); err != nil {
				t.Logf("warming the %s reuseport hash: %v", network, err)
			}
		}
	})
}

// reuseportExchange binds two SO_REUSEPORT sockets to one loopback port and
// delivers one datagram to the group.
func reuseportExchange(network string) error {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	host := "127.0.0.1"
	if network == "udp6" {
		host = "::1"
	}
	a, err := lc.ListenPacket(context.Background(), network, net.JoinHostPort(host, "0"))
	if err != nil {
		return err
	}
	defer a.Close()
	b, err := lc.ListenPacket(context.Background(), network, a.LocalAddr().String())
	if err != nil {
		return err
	}
	defer b.Close()
	c, err := net.Dial(network, a.LocalAddr().String())
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write([]byte("warm")); err != nil {
		return err
	}
	got := make(chan error, 2)
	for _, pc := range []net.PacketConn{a, b} {
		go func() {
			pc.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, _, err := pc.ReadFrom(make([]byte, 16))
			got <- err
		}()
	}
	// One of the two sockets receives it; closing both ends the other read.
	first := <-got
	a.Close()
	b.Close()
	if second := <-got; first != nil && second != nil {
		return first
	}
	return nil
}

// vethEnv is a client namespace and a server namespace joined by a veth
// pair; the test creates both and deletes them in Cleanup.
type vethEnv struct {
	t            testing.TB
	cliNS, srvNS string
	cliIf, srvIf string
	cli4, srv4   netip.Addr
	cli6, srv6   netip.Addr
	pinDir       string
	srvHandle    netns.NsHandle
	cliHandle    netns.NsHandle
	// cliXDP is the link of the client end's XDP program (XDP_PASS until a
	// test swaps in another program with Update).
	cliXDP link.Link
	// bounces counts the bouncers loaded (newBouncer), to give each its
	// own client ports.
	bounces uint16
}

// privateBPFFS mounts a bpf filesystem of the test's own (the host's
// /sys/fs/bpf is left alone) and unmounts it in Cleanup.
func privateBPFFS(t testing.TB) string {
	dir := filepath.Join(t.TempDir(), "bpffs")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		guest.SkipMissingFeature(t, "bpffs", err.Error())
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

func sh(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
}

func newVethEnv(t testing.TB) *vethEnv { return newVethEnvQueues(t, 1) }

// newVethEnvQueues is newVethEnv with queues receive and transmit queues on
// each end of the pair.
func newVethEnvQueues(t testing.TB, queues int) *vethEnv {
	guest.RequireRoot(t)
	warmReuseportHash(t)
	for _, tool := range []string{"ip", "ethtool"} {
		if _, err := exec.LookPath(tool); err != nil {
			guest.Skip(t, tool+" not installed (apt-get install iproute2 ethtool)")
		}
	}
	var rb [3]byte
	rand.Read(rb[:])
	id := hex.EncodeToString(rb[:])
	e := &vethEnv{
		t: t, cliNS: "xdc" + id, srvNS: "xds" + id, cliIf: "xc" + id, srvIf: "xs" + id,
		cli4: netip.MustParseAddr("10.201.0.1"), srv4: netip.MustParseAddr("10.201.0.2"),
		cli6: netip.MustParseAddr("fd00:201::1"), srv6: netip.MustParseAddr("fd00:201::2"),
	}
	e.pinDir = privateBPFFS(t) + "/" + e.srvIf
	sh(t, "ip", "netns", "add", e.cliNS)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", e.cliNS).Run() })
	sh(t, "ip", "netns", "add", e.srvNS)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", e.srvNS).Run() })
	t.Cleanup(func() { Detach(e.srvIf, e.pinDir) })
	q := strconv.Itoa(queues)
	sh(t, "ip", "link", "add", e.cliIf, "numtxqueues", q, "numrxqueues", q, "netns", e.cliNS,
		"type", "veth", "peer", "name", e.srvIf, "numtxqueues", q, "numrxqueues", q, "netns", e.srvNS)
	for _, c := range []struct{ ns, ifc, a4, a6 string }{{e.cliNS, e.cliIf, "10.201.0.1/24", "fd00:201::1/64"}, {e.srvNS, e.srvIf, "10.201.0.2/24", "fd00:201::2/64"}} {
		sh(t, "ip", "-n", c.ns, "addr", "add", c.a4, "dev", c.ifc)
		sh(t, "ip", "-n", c.ns, "addr", "add", c.a6, "dev", c.ifc, "nodad")
		sh(t, "ip", "-n", c.ns, "link", "set", c.ifc, "up")
		sh(t, "ip", "-n", c.ns, "link", "set", "lo", "up")
		// Local sockets leave UDP checksums partial on veth: the program
		// (like a NIC on the wire) needs full ones.
		sh(t, "ip", "netns", "exec", c.ns, "ethtool", "-K", c.ifc, "tx", "off")
	}
	var err error
	if e.srvHandle, err = netns.GetFromName(e.srvNS); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.srvHandle.Close() })
	if e.cliHandle, err = netns.GetFromName(e.cliNS); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.cliHandle.Close() })
	// Native XDP_TX on veth needs a program on the peer too.
	e.cliXDP = e.attachPass(t, e.cliHandle, e.cliIf)
	return e
}

// attachPass attaches a program that returns XDP_PASS to ifname in namespace
// h and returns its link (closing it detaches the program; Cleanup closes
// it). On veth, frames the other end sends with XDP_TX reach only an end with
// an XDP program: without one the frames are dropped, and with GRO on (which
// gives the end NAPI but no program) they are queued but the kernel (through
// 6.18 at least) never schedules the poll that would take them.
func (e *vethEnv) attachPass(t testing.TB, h netns.NsHandle, ifname string) link.Link {
	t.Helper()
	// AttachXDP as in a SEC("xdp") program, so that a test can swap one in
	// with a link update (which wants equal attach types).
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, AttachType: ebpf.AttachXDP, License: "BSD",
		Instructions: asm.Instructions{asm.LoadImm(asm.R0, 2, asm.DWord), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	var l link.Link
	e.in(h, func() {
		ifc, ierr := net.InterfaceByName(ifname)
		if ierr != nil {
			err = ierr
			return
		}
		l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifc.Index})
	})
	if err != nil {
		prog.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close(); prog.Close() })
	return l
}

// in runs f with the calling thread in namespace h.
func (e *vethEnv) in(h netns.NsHandle, f func()) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		e.t.Fatal(err)
	}
	defer orig.Close()
	if err := netns.Set(h); err != nil {
		e.t.Fatal(err)
	}
	defer netns.Set(orig)
	f()
}

func (e *vethEnv) attach(cfg Config) *XDP {
	var x *XDP
	var err error
	e.in(e.srvHandle, func() { x, err = Attach(e.srvIf, ModeAuto, cfg, e.pinDir) })
	if err != nil {
		e.t.Fatal(err)
	}
	return x
}

// client returns a UDP socket in the client namespace connected to dst.
func (e *vethEnv) client(dst netip.AddrPort) *net.UDPConn {
	var c *net.UDPConn
	var err error
	e.in(e.cliHandle, func() { c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst)) })
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

// exchange sends one binding request and checks the answer byte for byte.
func exchange(c *net.UDPConn, timeout time.Duration) error {
	var tx stun.TxID
	rand.Read(tx[:])
	if _, err := c.Write(stun.AppendRequest(nil, tx)); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	want := stun.AppendResponse(nil, tx, netip.MustParseAddrPort(c.LocalAddr().String()))
	if !bytes.Equal(buf[:n], want) {
		return fmt.Errorf("response %x, want %x", buf[:n], want)
	}
	return nil
}

func counterOf(t testing.TB, x *XDP, key string) uint64 {
	return counterMap(t, x)[key].Packets
}

// TestVethSTUN: a real UDP client in one namespace gets its answers from
// XDP (the counters say so, and a socket listening on the STUN port in the
// server namespace sees none of those requests); a request XDP does not
// answer (no FINGERPRINT) is passed up to that socket.
func TestVethSTUN(t *testing.T) {
	e := newVethEnv(t)
	x := e.attach(Config{})
	defer x.Close()
	t.Logf("attached in %v mode", x.Mode())

	// The "userspace server": a socket on the STUN port that reports what
	// reaches it.
	var srv net.PacketConn
	var err error
	e.in(e.srvHandle, func() { srv, err = net.ListenPacket("udp", ":3478") })
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	got := make(chan []byte, 64)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, _, err := srv.ReadFrom(buf)
			if err != nil {
				close(got)
				return
			}
			got <- append([]byte(nil), buf[:n]...)
		}
	}()

	for _, fam := range []struct {
		af  string
		dst netip.Addr
	}{{"ipv4", e.srv4}, {"ipv6", e.srv6}} {
		c := e.client(netip.AddrPortFrom(fam.dst, 3478))
		before := counterOf(t, x, fam.af+"/tx/stun_answered")
		const n = 20
		for i := range n {
			if err := exchange(c, 2*time.Second); err != nil {
				t.Fatalf("%s request %d: %v", fam.af, i, err)
			}
		}
		if d := counterOf(t, x, fam.af+"/tx/stun_answered") - before; d != n {
			t.Errorf("%s: stun_answered moved by %d, want %d", fam.af, d, n)
		}
		// Not answerable in XDP: the first 32 bytes of a request (no
		// FINGERPRINT, length field fixed up). It must reach the socket, and
		// be the first thing that does.
		req := stun.AppendRequest(nil, stun.TxID{9})[:32]
		req[3] = 12
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
		select {
		case b := <-got:
			if !bytes.Equal(b, req) {
				t.Fatalf("%s: the server socket got %x first, want the passed request %x (did an answered request leak?)", fam.af, b, req)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: the passed request never reached the server socket", fam.af)
		}
		if d := counterOf(t, x, fam.af+"/pass/stun_fingerprint"); d == 0 {
			t.Errorf("%s: no stun_fingerprint pass counted", fam.af)
		}
	}
}

// TestVethAdoptReplaceDetach restarts the "daemon" (Close, Attach) three
// times while a STUN loop runs: no response may be lost, counters survive;
// then Detach removes everything and STUN goes unanswered.
func TestVethAdoptReplaceDetach(t *testing.T) {
	e := newVethEnv(t)
	x := e.attach(Config{})
	mode := x.Mode()
	if err := x.Check(); err != nil {
		t.Fatalf("fresh attach: %v", err)
	}
	c := e.client(netip.AddrPortFrom(e.srv4, 3478))
	if err := exchange(c, 2*time.Second); err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var answered int
	var loopErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-stop:
				return
			default:
			}
			if err := exchange(c, time.Second); err != nil {
				loopErr = err
				return
			}
			answered++
		}
	}()
	for range 3 {
		x.Close()
		x = e.attach(Config{})
		if x.Mode() != mode {
			t.Errorf("adopted link reports mode %v, was %v", x.Mode(), mode)
		}
	}
	close(stop)
	wg.Wait()
	if loopErr != nil {
		t.Fatalf("STUN loop lost a response after %d: %v", answered, loopErr)
	}
	got := counterOf(t, x, "ipv4/tx/stun_answered")
	if got != uint64(answered)+1 {
		t.Errorf("pinned counter says %d answered, client saw %d", got, answered+1)
	}
	if err := x.Check(); err != nil {
		t.Errorf("after adopting the pinned link: %v", err)
	}
	// A second daemon's program takes over the link while this one runs:
	// this one's check must say so, the newcomer's must pass.
	y := e.attach(Config{})
	if err := x.Check(); err == nil || !strings.Contains(err.Error(), "replaced") {
		t.Errorf("replaced program's check: %v", err)
	}
	if err := y.Check(); err != nil {
		t.Errorf("replacing program's check: %v", err)
	}
	y.Close()
	x.Close()

	if err := Detach(e.srvIf, e.pinDir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory still there: %v", err)
	}
	e.in(e.srvHandle, func() {
		l, err := netlink.LinkByName(e.srvIf)
		if err != nil {
			t.Fatal(err)
		}
		if l.Attrs().Xdp != nil && l.Attrs().Xdp.Attached {
			t.Errorf("program still attached after Detach (id %d)", l.Attrs().Xdp.ProgId)
		}
	})
	if err := exchange(c, 300*time.Millisecond); err == nil {
		t.Error("STUN answered after Detach")
	}
	if err := Detach(e.srvIf, e.pinDir); err != nil {
		t.Errorf("second Detach: %v", err)
	}
}
