package interop

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
	"tailscale.com/net/stun"
)

// stunRoundTrip sends Tailscale's binding request from a socket bound to
// localIP and checks the answer with Tailscale's parser: same transaction
// ID, mapped address equal to the socket's own address.
func stunRoundTrip(t *testing.T, localIP, server string) {
	t.Helper()
	conn, err := net.ListenPacket("udp", net.JoinHostPort(localIP, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dst, err := net.ResolveUDPAddr("udp", server)
	if err != nil {
		t.Fatal(err)
	}
	self := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	buf := make([]byte, 1500)
	for i := range 5 {
		txID := stun.NewTxID()
		req := stun.Request(txID)
		if _, err := conn.WriteTo(req, dst); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			t.Fatalf("request %d: no answer from %s: %v", i, server, err)
		}
		if got := from.(*net.UDPAddr).AddrPort(); got.Port() != dst.AddrPort().Port() || got.Addr().Unmap() != dst.AddrPort().Addr().Unmap() {
			t.Fatalf("answer from %v, want %v", got, dst)
		}
		if !stun.Is(buf[:n]) {
			t.Fatalf("answer is not STUN: % x", buf[:n])
		}
		gotTx, mapped, err := stun.ParseResponse(buf[:n])
		if err != nil {
			t.Fatalf("ParseResponse: %v (% x)", err, buf[:n])
		}
		if gotTx != txID {
			t.Fatalf("txid %x, want %x", gotTx, txID)
		}
		want := netip.AddrPortFrom(self.Addr().Unmap(), self.Port())
		if mapped != want {
			t.Fatalf("mapped address %v, want the client socket's %v", mapped, want)
		}
	}
}

func TestSTUNIPv4(t *testing.T) {
	stunRoundTrip(t, "127.0.0.1", srv.STUNAddr())
	requireAlive(t)
}

func TestSTUNIPv6(t *testing.T) {
	s6 := startServer(t, target.Options{Host: "::1"})
	stunRoundTrip(t, "::1", s6.STUNAddr())
	// DERP over IPv6 loopback works too.
	a, b := newPeer(t, s6), newPeer(t, s6)
	syncPeers(t, a, b)
	if err := s6.Stop(10 * time.Second); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
}

// TestSTUNIgnoresGarbage: datagrams that are not Tailscale binding
// requests get no answer and do not stop the server answering real ones.
func TestSTUNIgnoresGarbage(t *testing.T) {
	conn, err := net.Dial("udp", srv.STUNAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	junk := [][]byte{
		{},
		{0x00},
		[]byte("GET / HTTP/1.1\r\n\r\n"),
		make([]byte, 20),
		make([]byte, 1400),
	}
	// A binding request with its FINGERPRINT broken.
	bad := stun.Request(stun.NewTxID())
	bad[len(bad)-1] ^= 0xff
	junk = append(junk, bad)
	for _, j := range junk {
		if _, err := conn.Write(j); err != nil {
			t.Fatal(err)
		}
	}
	stunRoundTrip(t, "127.0.0.1", srv.STUNAddr())
	requireAlive(t)
}
