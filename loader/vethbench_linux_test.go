//go:build linux

package loader

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xderp/xderp/userspace/stun"
)

func reusePort(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	})
	return errors.Join(err, serr)
}

// BenchmarkVethSTUNRate measures how many STUN requests per second each
// path answers over a veth pair. A packet socket in the client namespace
// sends valid binding requests as fast as it can for 2 s (the offered load,
// far above what a socket-based client reaches on this machine); answers are
// counted by the XDP program's counters, then, with the program detached, by
// a userspace responder built on userspace/stun with two SO_REUSEPORT
// sockets (one per core: the shape of userspace/stunserver). It reports
// both rates and their ratio.
func BenchmarkVethSTUNRate(b *testing.B) {
	e := newVethEnv(b)
	var srvMAC, cliMAC net.HardwareAddr
	var fd, ifindex int
	var err error
	e.in(e.srvHandle, func() {
		ifc, _ := net.InterfaceByName(e.srvIf)
		srvMAC = ifc.HardwareAddr
	})
	e.in(e.cliHandle, func() {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		ifc, _ := net.InterfaceByName(e.cliIf)
		ifindex, cliMAC = ifc.Index, ifc.HardwareAddr
	})
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	req := frame{src: netip.AddrPortFrom(e.cli4, 40000), dst: netip.AddrPortFrom(e.srv4, 3478), payload: tsRequest()}.build()
	copy(req[0:6], srvMAC)
	copy(req[6:12], cliMAC)
	sa := &unix.SockaddrLinklayer{Ifindex: ifindex, Protocol: 0x0008 /* htons(ETH_P_IP) */}
	const dur = 2 * time.Second
	// Two senders (one per core of this machine), each bounded in count and time.
	flood := func() (sent int64, elapsed time.Duration) {
		start := time.Now()
		var n atomic.Int64
		var wg sync.WaitGroup
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 2_000_000 && time.Since(start) < dur; i++ {
					if unix.Sendto(fd, req, 0, sa) == nil {
						n.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		return n.Load(), time.Since(start)
	}

	for b.Loop() {
		x := e.attach(Config{})
		before := counterOf(b, x, "ipv4/tx/stun_answered")
		sent, el := flood()
		xdpRate := float64(counterOf(b, x, "ipv4/tx/stun_answered")-before) / el.Seconds()
		offered := float64(sent) / el.Seconds()
		x.Close()
		if err := Detach(e.srvIf, e.pinDir); err != nil {
			b.Fatal(err)
		}
		var answered atomic.Int64
		stop := e.userspaceResponder(b, &answered)
		sent, el = flood()
		stop()
		userRate := float64(answered.Load()) / el.Seconds()
		b.ReportMetric(offered, "offered-req/s")
		b.ReportMetric(xdpRate, "xdp-answers/s")
		b.ReportMetric(float64(sent)/el.Seconds(), "offered2-req/s")
		b.ReportMetric(userRate, "userspace-answers/s")
		b.ReportMetric(xdpRate/userRate, "ratio")
	}
}

// userspaceResponder answers STUN on the server's 3478 with two sockets
// (SO_REUSEPORT) and returns a stop function.
func (e *vethEnv) userspaceResponder(b *testing.B, answered *atomic.Int64) func() {
	var conns []net.PacketConn
	for range 2 {
		var c net.PacketConn
		var err error
		e.in(e.srvHandle, func() {
			lc := net.ListenConfig{Control: reusePort}
			c, err = lc.ListenPacket(context.Background(), "udp", ":3478")
		})
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c)
	}
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1500)
			out := make([]byte, 0, 64)
			for {
				n, addr, err := c.ReadFrom(buf)
				if err != nil {
					return
				}
				tx, err := stun.ParseBindingRequest(buf[:n])
				if err != nil {
					continue
				}
				ua := addr.(*net.UDPAddr)
				if _, err := c.WriteTo(stun.AppendResponse(out[:0], tx, ua.AddrPort()), addr); err == nil {
					answered.Add(1)
				}
			}
		}()
	}
	return func() {
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	}
}
