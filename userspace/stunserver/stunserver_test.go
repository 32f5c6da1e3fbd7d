package stunserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"hash/crc32"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/metrics"
)

// tailscaleStyleRequest builds a binding request the way Tailscale clients
// do: SOFTWARE "tailnode" followed by FINGERPRINT. It is written here from
// RFC 5389 rather than with our codec, so the test does not grade itself.
func tailscaleStyleRequest(tx [12]byte) []byte {
	b := make([]byte, 0, 48)
	b = binary.BigEndian.AppendUint16(b, 0x0001)
	b = binary.BigEndian.AppendUint16(b, 12+8)
	b = binary.BigEndian.AppendUint32(b, 0x2112A442)
	b = append(b, tx[:]...)
	b = binary.BigEndian.AppendUint16(b, 0x8022)
	b = binary.BigEndian.AppendUint16(b, 8)
	b = append(b, "tailnode"...)
	fp := crc32.ChecksumIEEE(b) ^ 0x5354554e
	b = binary.BigEndian.AppendUint16(b, 0x8028)
	b = binary.BigEndian.AppendUint16(b, 4)
	b = binary.BigEndian.AppendUint32(b, fp)
	return b
}

// decodeResponse returns the XOR-MAPPED-ADDRESS of a binding success
// response with the given transaction ID, and its family code.
func decodeResponse(t *testing.T, b []byte, tx [12]byte) (netip.AddrPort, byte) {
	t.Helper()
	if len(b) < 20 || binary.BigEndian.Uint16(b) != 0x0101 || binary.BigEndian.Uint32(b[4:]) != 0x2112A442 {
		t.Fatalf("not a binding success response: % x", b)
	}
	if !bytes.Equal(b[8:20], tx[:]) {
		t.Fatalf("transaction ID mismatch")
	}
	if int(binary.BigEndian.Uint16(b[2:])) != len(b)-20 {
		t.Fatalf("length field %d, body %d", binary.BigEndian.Uint16(b[2:]), len(b)-20)
	}
	attrs := b[20:]
	for len(attrs) >= 4 {
		typ, l := binary.BigEndian.Uint16(attrs), int(binary.BigEndian.Uint16(attrs[2:]))
		v := attrs[4 : 4+l]
		if typ == 0x0020 {
			port := binary.BigEndian.Uint16(v[2:]) ^ 0x2112
			key := append(binary.BigEndian.AppendUint32(nil, 0x2112A442), tx[:]...)
			ip := make([]byte, len(v)-4)
			for i := range ip {
				ip[i] = v[4+i] ^ key[i]
			}
			a, _ := netip.AddrFromSlice(ip)
			return netip.AddrPortFrom(a, port), v[1]
		}
		attrs = attrs[4+(l+3)&^3:]
	}
	t.Fatalf("no XOR-MAPPED-ADDRESS in % x", b)
	return netip.AddrPort{}, 0
}

func startServer(t *testing.T, addr string) (*Server, *metrics.Registry) {
	t.Helper()
	reg := metrics.NewRegistry()
	s := New(Options{Metrics: reg})
	if err := s.Start(context.Background(), addr, 2); err != nil {
		if strings.Contains(addr, "::1") {
			t.Skipf("no IPv6 loopback: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, reg
}

func exchange(t *testing.T, c *net.UDPConn, to netip.AddrPort, req []byte) []byte {
	t.Helper()
	if _, err := c.WriteToUDPAddrPort(req, to); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	return buf[:n]
}

func TestAnswersIPv4AndIPv6(t *testing.T) {
	for _, tc := range []struct {
		listen, dial string
		family       byte
	}{
		{"127.0.0.1:0", "127.0.0.1", 1},
		{"[::1]:0", "::1", 2},
		{":0", "127.0.0.1", 1}, // dual-stack socket: IPv4 clients still get the IPv4 family
	} {
		t.Run(tc.listen, func(t *testing.T) {
			s, _ := startServer(t, tc.listen)
			to := netip.AddrPortFrom(netip.MustParseAddr(tc.dial), s.LocalAddr().Port())
			c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(tc.dial)})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var tx [12]byte
			rand.Read(tx[:])
			got, fam := decodeResponse(t, exchange(t, c, to, tailscaleStyleRequest(tx)), tx)
			if got != c.LocalAddr().(*net.UDPAddr).AddrPort() {
				t.Errorf("mapped %v, client is %v", got, c.LocalAddr())
			}
			if fam != tc.family {
				t.Errorf("family %d, want %d", fam, tc.family)
			}
		})
	}
}

func TestIgnoresGarbageAndCounts(t *testing.T) {
	s, reg := startServer(t, "127.0.0.1:0")
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	to := s.LocalAddr()
	for _, junk := range [][]byte{{}, {1, 2, 3}, bytes.Repeat([]byte{0xff}, 100), make([]byte, 20)} {
		c.WriteToUDPAddrPort(junk, to)
	}
	var tx [12]byte
	rand.Read(tx[:])
	// UDP on loopback keeps order per socket pair, and reuseport hashes this
	// client's 4-tuple to one socket, so the junk is read before the request.
	decodeResponse(t, exchange(t, c, to, tailscaleStyleRequest(tx)), tx)
	// The success counter is bumped once the send call returns, which may be
	// just after the client has the answer: wait for it with a deadline.
	want := []string{`stun_requests{disposition="not_stun"} 4`, `stun_requests{disposition="success"} 1`, `stun_addrfamily{family="ipv4"} 1`}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var sb strings.Builder
		reg.WriteText(&sb)
		missing := ""
		for _, w := range want {
			if !strings.Contains(sb.String(), w) {
				missing = w
			}
		}
		if missing == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics lack %q:\n%s", missing, sb.String())
		}
		runtime.Gosched()
	}
}

func TestCloseStopsServing(t *testing.T) {
	s, _ := startServer(t, "127.0.0.1:0")
	addr := s.LocalAddr()
	s.Close()
	// After Close the port is free again: binding it proves the sockets are gone.
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatalf("port still held after Close: %v", err)
	}
	c.Close()
}

// TestCloseWakesIdleServer closes a server whose goroutines have answered a
// request and gone back to waiting for the next: Close must wake them (on
// Linux they sleep in recvmmsg, which closing the descriptor alone would not
// interrupt) and return.
func TestCloseWakesIdleServer(t *testing.T) {
	reg := metrics.NewRegistry()
	s := New(Options{Metrics: reg})
	if err := s.Start(context.Background(), "127.0.0.1:0", 4); err != nil {
		t.Fatal(err)
	}
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	defer c.Close()
	var tx [12]byte
	rand.Read(tx[:])
	decodeResponse(t, exchange(t, c, s.LocalAddr(), tailscaleStyleRequest(tx)), tx)
	done := make(chan struct{})
	go func() {
		s.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return within 10s")
	}
}
