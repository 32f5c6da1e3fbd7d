package derpserver

import (
	"bytes"
	"crypto/tls"
	"net"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// trickleConn writes one byte per system call, so the server sees TLS
// records cut into many segments (its probe finds partial records).
type trickleConn struct{ net.Conn }

func (c trickleConn) Write(p []byte) (int, error) {
	for i := range p {
		if _, err := c.Conn.Write(p[i : i+1]); err != nil {
			return i, err
		}
	}
	return len(p), nil
}

// heldConn collects writes while held and sends them in one system call on
// release, so the server reads several TLS records from one segment.
type heldConn struct {
	net.Conn
	mu   sync.Mutex
	held bool
	buf  []byte
}

func (c *heldConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *heldConn) hold() { c.mu.Lock(); c.held = true; c.mu.Unlock() }

func (c *heldConn) release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held = false
	_, err := c.Conn.Write(c.buf)
	c.buf = nil
	return err
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond) // poll interval
	}
}

// TestTLSIdleReader covers TLS connections from a TLSListener: their
// readers hand over to a fresh goroutine when idle (always, and with the
// default rule that only long waits hand over), and every frame arrives
// intact whether a record is cut into one-byte segments, several records
// share one segment, or the connection sat idle in between. Close ends
// idle readers, and a client leaving while its reader is idle is noticed.
func TestTLSIdleReader(t *testing.T) {
	for _, mode := range []string{"always", "default"} {
		t.Run(mode, func(t *testing.T) {
			k, _ := derp.NewPrivateKey()
			s, err := New(Options{PrivateKey: k})
			if err != nil {
				t.Fatal(err)
			}
			if mode == "always" {
				s.idleHandoffNs = 0
			}
			hs := httptest.NewUnstartedServer(s)
			hs.Listener = TLSListener(hs.Listener)
			hs.StartTLS()
			t.Cleanup(func() { hs.Close(); s.Close() })
			dial := func(wrap func(net.Conn) net.Conn) *testClient {
				raw, err := net.Dial("tcp", hs.Listener.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				conn := tls.Client(wrap(raw), &tls.Config{InsecureSkipVerify: true})
				t.Cleanup(func() { conn.Close() })
				c, err := handshakeClient(t, conn, clientOpts{})
				if err != nil {
					t.Fatal(err)
				}
				return c
			}
			held := &heldConn{}
			a := dial(func(c net.Conn) net.Conn { return trickleConn{c} })
			b := dial(func(c net.Conn) net.Conn { held.Conn = c; return held })
			c := dial(func(c net.Conn) net.Conn { return c })
			// Each reader goes idle after its handshake and hands over.
			waitUntil(t, "three idle hand-overs", func() bool { return s.idleHandoffs.Load() >= 3 })
			n0 := s.idleHandoffs.Load()

			// a -> b, each record cut into one-byte segments.
			for _, n := range []int{1, 1200, derp.MaxPacketSize} {
				p := randBytes(n)
				go a.send(b.pub, p)
				if src, got := b.recvPacket(); src != a.pub || !bytes.Equal(got, p) {
					t.Fatalf("%d-byte packet in one-byte segments", n)
				}
			}
			// b -> c, ten records in one segment.
			var want [][]byte
			held.hold()
			for i := range 10 {
				p := randBytes(100 + i)
				want = append(want, p)
				b.send(c.pub, p)
			}
			if err := held.release(); err != nil {
				t.Fatal(err)
			}
			for i, p := range want {
				if src, got := c.recvPacket(); src != b.pub || !bytes.Equal(got, p) {
					t.Fatalf("packet %d of one segment", i)
				}
			}
			// The readers of a and b woke for what they sent; with
			// "always" each hands over again once idle. Then c -> a.
			if mode == "always" {
				waitUntil(t, "hand-overs after waking", func() bool { return s.idleHandoffs.Load() >= n0+2 })
			}
			p := randBytes(500)
			c.send(a.pub, p)
			if src, got := a.recvPacket(); src != c.pub || !bytes.Equal(got, p) {
				t.Fatal("packet after idling")
			}
			// A client leaving while its reader waits idle.
			c.close()
			if k, _, _ := derp.ParsePeerGone(a.mustNext(derp.FramePeerGone)); k != c.pub {
				t.Fatal("PeerGone for a client that left while idle")
			}
			// Close ends the remaining idle readers.
			s.Close()
			a.expectClosed()
			b.expectClosed()
		})
	}
}

// TestProbeConnOneRecordAtATime: the socket under a TLS connection hands
// crypto/tls one record at a time, so records that arrived together wait
// in the probeConn, where more sees them.
func TestProbeConnOneRecordAtATime(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pl := TLSListener(ln)
	cert := httptest.NewTLSServer(nil) // for its certificate
	cert.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := pl.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	held := &heldConn{Conn: raw}
	client := tls.Client(held, &tls.Config{InsecureSkipVerify: true})
	defer client.Close()
	sc, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	server := tls.Server(sc, cert.TLS)
	defer server.Close()
	errc := make(chan error, 1)
	go func() { errc <- client.Handshake() }()
	if err := server.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	pc := tlsProbeOf(server)
	if pc == nil {
		t.Fatal("no probeConn under the server's connection")
	}
	// Three records in one segment.
	want := [][]byte{randBytes(100), randBytes(900), randBytes(7)} // one record each
	held.hold()
	for _, p := range want {
		if _, err := client.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	if err := held.release(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<16)
	for i, p := range want {
		n, err := server.Read(buf)
		if err != nil || !bytes.Equal(buf[:n], p) {
			t.Fatalf("record %d: %d bytes, %v", i, n, err)
		}
		if more := i < len(want)-1; pc.more() != more {
			t.Fatalf("after record %d: more() = %v, want %v", i, pc.more(), more)
		}
	}
}
