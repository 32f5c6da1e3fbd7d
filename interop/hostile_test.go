package interop

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"go4.org/mem"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// stillServes checks, after something hostile happened, that the process is
// alive and that a fresh pair of Tailscale clients still exchanges packets.
func stillServes(t *testing.T) {
	t.Helper()
	requireAlive(t)
	a, b := newPeer(t, srv), newPeer(t, srv)
	syncPeers(t, a, b)
	msg := []byte("after hostile input")
	if err := a.c.Send(b.pub, msg); err != nil {
		t.Fatal(err)
	}
	rp, err := b.nextPacket(5 * time.Second)
	if err != nil {
		t.Fatalf("packet after hostile input: %v", err)
	}
	if string(rp.Data) != string(msg) || rp.Source != a.pub {
		t.Fatalf("got %q from %v", rp.Data, rp.Source.ShortString())
	}
	a.c.Close()
	b.c.Close()
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestHostileGarbageAfterUpgrade(t *testing.T) {
	t.Run("before ClientInfo", func(t *testing.T) {
		c := dialRaw(t)
		c.upgrade(t)
		g := randBytes(4096)
		g[0] = 0xab // not ClientInfo
		c.Write(g)
		c.expectClosed(t, 10*time.Second, "garbage instead of ClientInfo")
	})
	t.Run("after handshake", func(t *testing.T) {
		c := dialRaw(t)
		c.handshake(t, key.NewNode())
		for range 16 {
			if _, err := c.Write(randBytes(4096)); err != nil {
				break // the server may close on an absurd frame length
			}
		}
		c.Close()
	})
	stillServes(t)
}

func TestHostileWrongMagic(t *testing.T) {
	t.Run("not HTTP", func(t *testing.T) {
		c := dialRaw(t)
		// A TLS ClientHello-like record to a plain-HTTP port, then junk.
		c.Write(append([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}, randBytes(512)...))
		c.expectClosed(t, 35*time.Second, "non-HTTP bytes")
	})
	t.Run("ServerKey frame with wrong magic as first frame", func(t *testing.T) {
		c := dialRaw(t)
		c.upgrade(t)
		p := append([]byte("DERQ\xf0\x9f\x94\x92"), randBytes(32)...)
		writeFrame(c, frameServerKey, p)
		c.expectClosed(t, 10*time.Second, "wrong first frame")
	})
	t.Run("ClientInfo too short", func(t *testing.T) {
		c := dialRaw(t)
		c.upgrade(t)
		writeFrame(c, frameClientInfo, randBytes(40))
		c.expectClosed(t, 10*time.Second, "short ClientInfo")
	})
	stillServes(t)
}

func TestHostileClientInfoWrongKey(t *testing.T) {
	claimed, other := key.NewNode(), key.NewNode()
	c := dialRaw(t)
	_, serverPub := c.upgrade(t)
	// Claims to be claimed.Public(), but the box is sealed by another key.
	writeFrame(c, frameClientInfo, clientInfo(claimed.Public(), other, serverPub))
	c.expectClosed(t, 10*time.Second, "ClientInfo sealed with the wrong key")

	// The claimed key must not have been registered: a disco packet to it
	// is answered with PeerGone(not here).
	a := newPeer(t, srv)
	if err := a.c.Send(claimed.Public(), discoPacket(t)); err != nil {
		t.Fatal(err)
	}
	m, err := a.next(10*time.Second, skipControl)
	if err != nil {
		t.Fatalf("waiting for PeerGone(not here): %v", err)
	}
	if pg, ok := m.(derp.PeerGoneMessage); !ok || pg.Peer != claimed.Public() || pg.Reason != derp.PeerGoneReasonNotHere {
		t.Fatalf("got %T %+v, want PeerGone(not here) for the claimed key", m, m)
	}
	stillServes(t)
}

func TestHostileOversizedFrames(t *testing.T) {
	t.Run("SendPacket one byte over the maximum", func(t *testing.T) {
		c := dialRaw(t)
		c.handshake(t, key.NewNode())
		body := append(key.NewNode().Public().AppendTo(nil), randBytes(derp.MaxPacketSize+1)...)
		go writeFrame(c, frameSendPacket, body) // may fail once the server closes
		c.expectClosed(t, 10*time.Second, "oversized SendPacket")
	})
	t.Run("SendPacket announcing 4 GiB", func(t *testing.T) {
		c := dialRaw(t)
		c.handshake(t, key.NewNode())
		hdr := []byte{frameSendPacket, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(hdr[1:], 0xffffffff)
		c.Write(append(hdr, randBytes(1024)...))
		c.expectClosed(t, 10*time.Second, "4 GiB SendPacket")
	})
	t.Run("ClientInfo of 1 MiB", func(t *testing.T) {
		c := dialRaw(t)
		c.upgrade(t)
		go writeFrame(c, frameClientInfo, randBytes(1<<20))
		c.expectClosed(t, 10*time.Second, "1 MiB ClientInfo")
	})
	t.Run("unknown frame type is skipped", func(t *testing.T) {
		c := dialRaw(t)
		c.handshake(t, key.NewNode())
		writeFrame(c, 0x7e, randBytes(1000))
		ping := [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
		writeFrame(c, framePing, ping[:])
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			typ, b, err := readFrame(c.br, 1<<20)
			if err != nil {
				t.Fatalf("connection dropped after an unknown frame type: %v", err)
			}
			if typ == framePong {
				if string(b) != string(ping[:]) {
					t.Fatalf("pong %x, want %x", b, ping)
				}
				break
			}
		}
	})
	stillServes(t)
}

// TestHostileStalledHandshake: clients that stop mid-handshake do not stop
// others being served, and are disconnected by the server's deadlines.
func TestHostileStalledHandshake(t *testing.T) {
	afterKey := dialRaw(t)
	afterKey.upgrade(t) // then silence
	partialInfo := dialRaw(t)
	_, serverPub := partialInfo.upgrade(t)
	ci := clientInfo(key.NewNode().Public(), key.NewNode(), serverPub)
	hdr := []byte{frameClientInfo, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(ci)))
	partialInfo.Write(append(hdr, ci[:10]...)) // then silence
	partialHTTP := dialRaw(t)
	io.WriteString(partialHTTP, "GET /derp HTTP/1.1\r\nHost: localhost\r\nUpg") // then silence

	stillServes(t) // while all three hang

	var wg sync.WaitGroup
	check := func(c *rawConn, d time.Duration, what string) {
		defer wg.Done()
		c.expectClosed(t, d, what)
	}
	wg.Add(2)
	go check(afterKey, 30*time.Second, "stalled after ServerKey")
	go check(partialInfo, 30*time.Second, "stalled inside ClientInfo")
	if !testing.Short() {
		wg.Add(1)
		go check(partialHTTP, 45*time.Second, "stalled inside the HTTP request")
	}
	wg.Wait()
	stillServes(t)
}

// TestHostileManyConnections opens and drops 10,000 connections (256 at a
// time) that stop at various points, then checks that the server's
// connection gauge and descriptor count come back down and clients are
// still served.
func TestHostileManyConnections(t *testing.T) {
	const total, parallel = 10_000, 256
	raiseNoFile(t, 4*parallel+1024)
	fdsBefore, err := countFDs(srv.PID())
	if err != nil {
		t.Fatal(err)
	}
	var next, failed atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(2 * time.Minute)
	var wg sync.WaitGroup
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= total || time.Now().After(deadline) {
					return
				}
				if err := openAndDrop(int(i % 4)); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		}()
	}
	wg.Wait()
	if n := next.Load(); n < total {
		t.Fatalf("only %d of %d connections within the time bound", n, total)
	}
	// A few refused dials under a burst are tolerable (listen backlog);
	// more than 1% means the server stopped accepting.
	if f := failed.Load(); f > total/100 {
		t.Fatalf("%d of %d connections failed; first: %v", f, total, firstErr.Load())
	} else if f > 0 {
		t.Logf("%d connections failed (first: %v)", f, firstErr.Load())
	}
	// Everything the server held for them is released.
	waitFor(t, 30*time.Second, "descriptors released", func() (bool, string) {
		n, err := countFDs(srv.PID())
		return err == nil && n <= fdsBefore+8, "fds " + itoa(n) + " (before " + itoa(fdsBefore) + ")"
	})
	stillServes(t)
}

// openAndDrop opens one connection and drops it at stage: 0 right after
// connecting, 1 inside the HTTP request, 2 after the ServerKey frame, 3
// after a complete handshake.
func openAndDrop(stage int) error {
	c, err := dialQuiet()
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	switch stage {
	case 0:
		return nil
	case 1:
		_, err := io.WriteString(c, "GET /derp HTTP/1.1\r\nHost: local")
		return err
	}
	if _, err := io.WriteString(c, upgradeRequest); err != nil {
		return err
	}
	if err := skipHTTPResponse(c); err != nil {
		return err
	}
	typ, b, err := readFrame(c.br, 1024)
	if err != nil {
		return err
	}
	if typ != frameServerKey || len(b) < 40 {
		return errFrame(typ)
	}
	if stage == 2 {
		return nil
	}
	var raw [32]byte
	copy(raw[:], b[8:40])
	priv := key.NewNode()
	if err := writeFrame(c, frameClientInfo, clientInfo(priv.Public(), priv, keyFromRaw(raw))); err != nil {
		return err
	}
	typ, _, err = readFrame(c.br, 1<<20)
	if err != nil {
		return err
	}
	if typ != frameServerInfo {
		return errFrame(typ)
	}
	return nil
}

// TestSIGTERM: a server with connected clients exits with status 0 on
// SIGTERM and the clients see their connections end.
func TestSIGTERM(t *testing.T) {
	s := startServer(t, target.Options{})
	a, b := newPeer(t, s), newPeer(t, s)
	syncPeers(t, a, b)
	if err := s.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.ExitErr() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v, want status 0", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no exit within 15s of SIGTERM")
	}
	for _, p := range []*peer{a, b} {
		if !p.waitClosed(10 * time.Second) {
			t.Fatal("client connection still open 10s after the server exited")
		}
	}
}

// waitClosed reports whether the peer's connection ends within d.
func (p *peer) waitClosed(d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case _, ok := <-p.msgs:
			if !ok {
				return true
			}
		case <-timer.C:
			return false
		}
	}
}

// raiseNoFile lifts the soft descriptor limit of the test process to at
// least n (up to the hard limit).
func raiseNoFile(t *testing.T, n uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	if lim.Max < n {
		t.Fatalf("RLIMIT_NOFILE hard limit %d < %d needed", lim.Max, n)
	}
	lim.Cur = n
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v (%s)", what, d, state)
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func errFrame(typ byte) error { return fmt.Errorf("unexpected frame type %#x", typ) }

func keyFromRaw(raw [32]byte) key.NodePublic { return key.NodePublicFromRaw32(mem.B(raw[:])) }

// dialQuiet is dialRaw without a test to fail.
func dialQuiet() (*rawConn, error) {
	c, err := net.DialTimeout("tcp", srv.HostPort(), 10*time.Second)
	if err != nil {
		return nil, err
	}
	return &rawConn{Conn: c, br: bufio.NewReader(c)}, nil
}

// skipHTTPResponse reads a 101 response head.
func skipHTTPResponse(c *rawConn) error {
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return fmt.Errorf("upgrade: %s", resp.Status)
	}
	return nil
}
