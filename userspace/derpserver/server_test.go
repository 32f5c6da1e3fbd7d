package derpserver

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/internal/lograte"
	"github.com/xderp/xderp/userspace/internal/testlog"
)

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func discoPacket(n int) []byte {
	return append([]byte(derp.DiscoMagic), randBytes(n-len(derp.DiscoMagic))...)
}

func TestNewValidates(t *testing.T) {
	if _, err := New(Options{}); err == nil {
		t.Fatal("New without a key succeeded")
	}
	k, _ := derp.NewPrivateKey()
	if _, err := New(Options{PrivateKey: k, MeshKey: "abc"}); err == nil || !strings.Contains(err.Error(), "MeshKey") {
		t.Fatalf("bad mesh key: err = %v", err)
	}
}

func TestUpgradeRequired(t *testing.T) {
	ts := newTestServer(t, Options{})
	resp, err := http.Get("http://" + ts.addr + "/derp")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("no upgrade: status %d, want 426", resp.StatusCode)
	}
	// Upgrade: websocket without the derp subprotocol is a raw DERP upgrade.
	conn := dialRaw(t, ts.addr)
	io.WriteString(conn, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
	resp, err = http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil || resp.StatusCode != 101 || resp.Header.Get("Upgrade") != "DERP" {
		t.Fatalf("legacy websocket upgrade: %v %v", resp, err)
	}
}

func TestHandshakeAndSelfSend(t *testing.T) {
	ts := newTestServer(t, Options{})
	// Lower-case upgrade token is accepted.
	conn := dialRaw(t, ts.addr)
	io.WriteString(conn, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: dErP\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	conn.Close()

	c := newClient(t, ts.addr, clientOpts{})
	if c.serverPub != ts.s.PublicKey() {
		t.Fatal("ServerKey frame carries the wrong key")
	}
	if got := c.header.Get("Derp-Public-Key"); got != ts.s.PublicKey().String() {
		t.Fatalf("Derp-Public-Key %q", got)
	}
	if got := c.header.Get("Derp-Version"); got != "2" {
		t.Fatalf("Derp-Version %q", got)
	}
	c.send(c.pub, []byte{0xde, 0xad, 0xbe, 0xef})
	src, pkt := c.recvPacket()
	if src != c.pub || !bytes.Equal(pkt, []byte{0xde, 0xad, 0xbe, 0xef}) {
		t.Fatalf("got %v %x", src, pkt)
	}
	ts.waitMetric("derp_current_connections", func(v float64) bool { return v == 1 })
	ts.waitMetric("derp_packets_sent", func(v float64) bool { return v == 1 })
	ts.waitMetric("derp_packets_received", func(v float64) bool { return v == 1 })
	ts.waitMetric("derp_accepts", func(v float64) bool { return v == 2 })
}

func TestFastStartKeepsPipelinedBytes(t *testing.T) {
	ts := newTestServer(t, Options{})
	priv, _ := derp.NewPrivateKey()
	ci, _ := derp.AppendClientInfo(nil, priv, ts.s.PublicKey(), &derp.ClientInfo{Version: 2})
	// Request, ClientInfo and a first packet to ourselves in one write.
	req := []byte("GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n")
	req = append(req, ci...)
	req = derp.AppendSendPacket(req, priv.Public(), []byte("pipelined"))
	conn := dialRaw(t, ts.addr)
	conn.Write(req)
	c := &testClient{t: t, conn: conn, priv: priv, pub: priv.Public(), serverPub: ts.s.PublicKey()}
	c.br = bufio.NewReader(conn)
	c.fr = derp.NewFrameReader(c.br, 0)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	first := make([]byte, 5)
	if _, err := io.ReadFull(c.br, first); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first, []byte{1, 0, 0, 0, 40}) {
		t.Fatalf("fast start: first bytes %q, want a ServerKey frame", first)
	}
	c.br.Discard(40)
	if err := c.readServerInfo(); err != nil {
		t.Fatalf("fast start (server key taken on faith): %v", err)
	}
	_, pkt := c.recvPacket()
	if string(pkt) != "pipelined" {
		t.Fatalf("pipelined packet %q", pkt)
	}
}

func TestPacketsBothWaysAllSizes(t *testing.T) {
	ts := newTestServer(t, Options{QueueDepth: 256})
	a := newClient(t, ts.addr, clientOpts{})
	b := newClient(t, ts.addr, clientOpts{})
	sizes := []int{0, 1, 31, 62, 1200, 1500, 9000, 9217, 32 << 10, derp.MaxPacketSize}
	for _, pair := range [][2]*testClient{{a, b}, {b, a}} {
		from, to := pair[0], pair[1]
		var sent [][]byte
		for _, n := range sizes {
			sent = append(sent, randBytes(n))
		}
		go func() {
			for _, p := range sent {
				from.send(to.pub, p)
			}
		}()
		for i := range sizes {
			src, pkt := to.recvPacket()
			if src != from.pub {
				t.Fatalf("packet %d: source %v, want %v", i, src, from.pub)
			}
			if len(pkt) != sizes[i] {
				t.Fatalf("packet %d: %d bytes, want %d (out of order?)", i, len(pkt), sizes[i])
			}
			if !bytes.Equal(pkt, sent[i]) {
				t.Fatalf("packet %d differs", i)
			}
		}
	}
	// Oversized packet closes only the sender.
	a.write(derp.AppendFrameHeader(nil, derp.FrameSendPacket, derp.KeyLen+derp.MaxPacketSize+1))
	a.expectClosed()
	// b received from a, so it hears that a is gone, and is still served.
	if k, _, _ := derp.ParsePeerGone(b.mustNext(derp.FramePeerGone)); k != a.pub {
		t.Fatal("PeerGone for the wrong key")
	}
	b.send(b.pub, []byte("still here"))
	if _, pkt := b.recvPacket(); string(pkt) != "still here" {
		t.Fatal("other client disturbed")
	}
	ts.waitMetric(`xderp_connections_closed_total{reason="protocol_error"}`, func(v float64) bool { return v == 1 })
}

func TestPeerGoneToReceivers(t *testing.T) {
	ts := newTestServer(t, Options{})
	a := newClient(t, ts.addr, clientOpts{})
	b := newClient(t, ts.addr, clientOpts{})
	c := newClient(t, ts.addr, clientOpts{})
	a.send(b.pub, []byte("hi"))
	b.recvPacket()
	a.close()
	p := b.mustNext(derp.FramePeerGone)
	k, reason, err := derp.ParsePeerGone(p)
	if err != nil || k != a.pub || reason != derp.PeerGoneDisconnected || len(p) != 33 {
		t.Fatalf("PeerGone %x %v", p, err)
	}
	// c never received from a: nothing for it.
	if got := c.barrier(); len(got) != 0 {
		t.Fatalf("bystander got %v", got)
	}
	ts.waitMetric("derp_peer_gone_disconnected_frames", func(v float64) bool { return v == 1 })

	// A key that reconnects and leaves again is reported again.
	a2 := newClient(t, ts.addr, clientOpts{priv: a.priv})
	a2.send(b.pub, []byte("back"))
	if _, pkt := b.recvPacket(); string(pkt) != "back" {
		t.Fatal("packet after reconnect")
	}
	a2.close()
	if k, _, _ := derp.ParsePeerGone(b.mustNext(derp.FramePeerGone)); k != a.pub {
		t.Fatal("second PeerGone for the wrong key")
	}
}

func TestPingPong(t *testing.T) {
	ts := newTestServer(t, Options{})
	c := newClient(t, ts.addr, clientOpts{})
	var d [8]byte
	copy(d[:], "12345678")
	c.ping(d)
	if p := c.mustNext(derp.FramePong); string(p) != "12345678" {
		t.Fatalf("pong %q", p)
	}
	long := append(d[:], randBytes(992)...)
	c.write(derp.AppendFrame(nil, derp.FramePing, long))
	if p := c.mustNext(derp.FramePong); string(p) != "12345678" {
		t.Fatalf("pong to 1000-byte ping %q", p)
	}
	// Unsolicited Pong and KeepAlive from a client are skipped.
	c.write(derp.AppendPong(nil, d))
	c.write(derp.AppendKeepAlive(nil))
	if got := c.barrier(); len(got) != 0 {
		t.Fatalf("unexpected frames %v", got)
	}
	c.write(derp.AppendFrame(nil, derp.FramePing, d[:7]))
	c.expectClosed()
	ts.waitMetric("derp_got_ping", func(v float64) bool { return v == 4 })
	ts.waitMetric("derp_sent_pong", func(v float64) bool { return v == 3 })
}

func TestDuplicateKeysLastWriterActive(t *testing.T) {
	ts := newTestServer(t, Options{})
	b := newClient(t, ts.addr, clientOpts{})
	a1 := newClient(t, ts.addr, clientOpts{})
	a2 := newClient(t, ts.addr, clientOpts{priv: a1.priv})
	ts.waitMetric("derp_current_dup_client_keys", func(v float64) bool { return v == 1 })
	ts.waitMetric("derp_current_dup_client_conns", func(v float64) bool { return v == 2 })

	deliver := func(want, other *testClient, msg string) {
		t.Helper()
		b.send(a1.pub, []byte(msg))
		if _, pkt := want.recvPacket(); string(pkt) != msg {
			t.Fatalf("got %q want %q", pkt, msg)
		}
		if got := other.barrier(); len(got) != 0 {
			t.Fatalf("duplicate delivery to the inactive connection: %v", got)
		}
	}
	deliver(a2, a1, "to newest")
	// a1 speaks (its barrier above was a frame, so it is active now).
	deliver(a1, a2, "to last writer")
	a2.barrier()
	deliver(a2, a1, "back to a2")
	a2.close()
	ts.waitMetric("derp_current_dup_client_keys", func(v float64) bool { return v == 0 })
	deliver(a1, b, "only one left")
	// The key still has a connection: no PeerGone for it.
	if got := b.barrier(); len(got) != 0 {
		t.Fatalf("b got %v", got)
	}
}

func TestUnknownDestination(t *testing.T) {
	ts := newTestServer(t, Options{})
	c := newClient(t, ts.addr, clientOpts{})
	unknown := derp.PublicKey{7, 7, 7}
	c.send(unknown, []byte("not disco"))
	if got := c.barrier(); len(got) != 0 {
		t.Fatalf("reply to non-disco: %v", got)
	}
	start := time.Now()
	for range 6 {
		c.send(unknown, discoPacket(80))
	}
	got := c.barrier()
	elapsed := time.Since(start)
	// Burst of 3, then 1/s.
	maxGone := 3 + int(elapsed/time.Second)
	if len(got) < 3 || len(got) > maxGone {
		t.Fatalf("%d PeerGone frames in %v, want 3..%d", len(got), elapsed, maxGone)
	}
	for _, f := range got {
		k, r, _ := derp.ParsePeerGone(f.p)
		if f.typ != derp.FramePeerGone || k != unknown || r != derp.PeerGoneNotHere {
			t.Fatalf("frame %v %x", f.typ, f.p)
		}
	}
	ts.waitMetric(`derp_packets_dropped{reason="unknown_dest",kind="other"}`, func(v float64) bool { return v == 1 })
	ts.waitMetric(`derp_packets_dropped{reason="unknown_dest",kind="disco"}`, func(v float64) bool { return v == 6 })
	ts.waitMetric(`derp_bytes_dropped{reason="unknown_dest",kind="disco"}`, func(v float64) bool { return v == 6*80 })
}

// A writer goroutine arms a write deadline; once it has exited, a packet
// written inline by the sender's reader must still go out. (The runtime
// fails every write on a descriptor whose armed deadline has passed.)
func TestInlineWriteAfterWriterExit(t *testing.T) {
	const wt = 50 * time.Millisecond
	ts := newTestServer(t, Options{WriteTimeout: wt})
	ts.s.writerLinger = wt // the writer exits at least 2*wt after its last write
	sender := newClient(t, ts.addr, clientOpts{})
	recv := newClient(t, ts.addr, clientOpts{})
	for round := range 3 {
		starts := ts.metric("xderp_writer_starts_total")
		// A burst in one write goes through a writer goroutine.
		var burst []byte
		for range 200 {
			burst = append(burst, derp.AppendSendPacket(nil, recv.pub, randBytes(1200))...)
		}
		sender.write(burst)
		for range 200 {
			recv.recvPacket()
		}
		ts.waitMetric("xderp_writer_starts_total", func(v float64) bool { return v > starts })
		ts.waitMetric("xderp_writers_active", func(v float64) bool { return v == 0 })
		// One packet alone is written inline, past the old deadline.
		sender.send(recv.pub, []byte{byte(round)})
		if _, p := recv.recvPacket(); !bytes.Equal(p, []byte{byte(round)}) {
			t.Fatalf("round %d: got %x", round, p)
		}
	}
	if v := ts.metric(`derp_packets_dropped{reason="write_error",kind="other"}`); v != 0 {
		t.Fatalf("%v write errors", v)
	}
}

func TestSlowReceiverDoesNotBlockSender(t *testing.T) {
	ts := newTestServer(t, Options{WriteTimeout: 300 * time.Millisecond})
	sender := newClient(t, ts.addr, clientOpts{})
	fast := newClient(t, ts.addr, clientOpts{})
	// The slow receiver never reads; shrink its socket buffer so the
	// server's writes stall quickly.
	slow := ts.clientWithReadBuffer(4096)
	pkt := randBytes(1200)
	frame := derp.AppendSendPacket(nil, slow.pub, pkt)
	var burst []byte
	for range 100 {
		burst = append(burst, frame...)
	}
	for range 200 { // 20,000 packets, 24 MB
		sender.write(burst)
	}
	// The sender is still served promptly...
	start := time.Now()
	sender.barrier()
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("sender's ping took %v", d)
	}
	// ...and so is everyone else.
	sender.send(fast.pub, []byte("fast"))
	if _, p := fast.recvPacket(); string(p) != "fast" {
		t.Fatal("fast receiver")
	}
	var drops float64
	for _, r := range []string{"queue_head", "write_error", "gone_disconnected"} {
		drops += ts.metric(`derp_packets_dropped{reason="` + r + `",kind="other"}`)
	}
	if drops == 0 {
		t.Fatal("no drops counted for a receiver that never reads")
	}
	_ = slow
}

func TestHostileInputKeepsServing(t *testing.T) {
	ts := newTestServer(t, Options{HandshakeTimeout: 500 * time.Millisecond})
	a := newClient(t, ts.addr, clientOpts{})
	b := newClient(t, ts.addr, clientOpts{})
	alive := func(msg string) {
		t.Helper()
		a.send(b.pub, []byte(msg))
		if _, p := b.recvPacket(); string(p) != msg {
			t.Fatalf("after %s: got %q", msg, p)
		}
	}
	upgrade := func() (net.Conn, *bufio.Reader) {
		conn := dialRaw(t, ts.addr)
		io.WriteString(conn, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
		br := bufio.NewReader(conn)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != 101 {
			t.Fatalf("upgrade: %v", err)
		}
		return conn, br
	}

	t.Run("garbage after upgrade", func(t *testing.T) {
		conn, br := upgrade()
		conn.Write(randBytes(4096))
		expectClosed(t, conn, br)
		alive("garbage")
	})
	t.Run("wrong magic instead of HTTP", func(t *testing.T) {
		conn := dialRaw(t, ts.addr)
		conn.Write([]byte(derp.Magic + "\x01\x02\x03 not http\r\n\r\n"))
		expectClosed(t, conn, conn)
		alive("not http")
	})
	t.Run("wrong first frame", func(t *testing.T) {
		conn, br := upgrade()
		conn.Write(derp.AppendPing(nil, [8]byte{}))
		expectClosed(t, conn, br)
		alive("first frame")
	})
	t.Run("huge ClientInfo", func(t *testing.T) {
		conn, br := upgrade()
		conn.Write(derp.AppendFrameHeader(nil, derp.FrameClientInfo, 1<<30))
		expectClosed(t, conn, br)
		alive("huge")
	})
	t.Run("wrong server key in ClientInfo", func(t *testing.T) {
		conn, br := upgrade()
		priv, _ := derp.NewPrivateKey()
		other, _ := derp.NewPrivateKey()
		ci, _ := derp.AppendClientInfo(nil, priv, other.Public(), &derp.ClientInfo{})
		conn.Write(ci)
		expectClosed(t, conn, br)
		alive("wrong key")
	})
	t.Run("stalled handshake", func(t *testing.T) {
		conn, br := upgrade()
		conn.Write([]byte{2, 0, 0}) // half a header, then nothing
		start := time.Now()
		expectClosed(t, conn, br)
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("stalled client held for %v", d)
		}
		alive("stalled")
	})
	t.Run("stalled before upgrade response is read", func(t *testing.T) {
		conn := dialRaw(t, ts.addr)
		io.WriteString(conn, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
		expectClosed(t, conn, conn)
		alive("stalled2")
	})
	t.Run("oversized unknown frame", func(t *testing.T) {
		c := newClient(t, ts.addr, clientOpts{})
		c.write(derp.AppendFrame(nil, 0x42, []byte("small unknown frames are skipped")))
		c.barrier()
		c.write(derp.AppendFrameHeader(nil, 0x42, 2<<20))
		c.expectClosed()
		alive("unknown")
	})
	t.Run("privileged frames without mesh key", func(t *testing.T) {
		for _, f := range [][]byte{
			derp.AppendWatchConns(nil),
			derp.AppendClosePeer(nil, a.pub),
			derp.AppendForwardPacket(nil, a.pub, b.pub, []byte("x")),
		} {
			c := newClient(t, ts.addr, clientOpts{})
			c.write(f)
			c.expectClosed()
		}
		alive("privileged")
	})
	t.Run("bad NotePreferred", func(t *testing.T) {
		c := newClient(t, ts.addr, clientOpts{})
		c.write(derp.AppendFrame(nil, derp.FrameNotePreferred, []byte{1, 1}))
		c.expectClosed()
		alive("notepreferred")
	})
	t.Run("short SendPacket", func(t *testing.T) {
		c := newClient(t, ts.addr, clientOpts{})
		c.write(derp.AppendFrame(nil, derp.FrameSendPacket, make([]byte, 31)))
		c.expectClosed()
		alive("short")
	})
	t.Run("many connections opened and dropped", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range 200 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				conn, err := net.Dial("tcp", ts.addr)
				if err != nil {
					return
				}
				if i%2 == 0 {
					io.WriteString(conn, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
				}
				conn.Close()
			}()
		}
		wg.Wait()
		alive("churn")
		ts.waitMetric("xderp_handshakes_in_progress", func(v float64) bool { return v == 0 })
	})
	if v := ts.metric(`xderp_handshake_errors_total{reason="client_info"}`); v != 1 {
		t.Errorf("client_info handshake errors = %v", v)
	}
}

func TestAdmission(t *testing.T) {
	refused, _ := derp.NewPrivateKey()
	mk := strings.Repeat("5a", 32)
	var seen []netip.AddrPort
	var mu sync.Mutex
	ts := newTestServer(t, Options{MeshKey: mk, Admit: func(_ context.Context, k derp.PublicKey, info *derp.ClientInfo, remote netip.AddrPort) error {
		mu.Lock()
		seen = append(seen, remote)
		mu.Unlock()
		if k == refused.Public() {
			return errors.New("not on the list")
		}
		return nil
	}})
	if _, err := tryClient(t, ts.addr, clientOpts{priv: refused}); err == nil {
		t.Fatal("refused client got ServerInfo")
	}
	newClient(t, ts.addr, clientOpts{})
	// Mesh peers bypass admission even with a refused key.
	mkey, _ := derp.ParseMeshKey(mk)
	newClient(t, ts.addr, clientOpts{priv: refused, info: &derp.ClientInfo{MeshKey: mkey}})
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || !seen[0].Addr().IsLoopback() || seen[0].Addr().Is4In6() {
		t.Fatalf("admission calls %v", seen)
	}
	ts.waitMetric(`xderp_handshake_errors_total{reason="admission"}`, func(v float64) bool { return v == 1 })
}

// Refused clients are logged, but a stream of them cannot flood the log:
// a burst is written, then one line per interval that counts the rest.
func TestRefusalLogIsRateLimited(t *testing.T) {
	var logs testlog.Buffer
	ts := newTestServer(t, Options{
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		Admit: func(context.Context, derp.PublicKey, *derp.ClientInfo, netip.AddrPort) error {
			return errors.New("not on the list")
		},
	})
	// A short interval keeps the test quick; the limiter is the server's.
	interval := 20 * time.Millisecond
	ts.s.connLog = lograte.New(connLogBurst, interval)
	const n = 60
	start := time.Now()
	for range n {
		if _, err := tryClient(t, ts.addr, clientOpts{}); err == nil {
			t.Fatal("refused client got ServerInfo")
		}
	}
	ts.waitMetric(`xderp_handshake_errors_total{reason="admission"}`, func(v float64) bool { return v == n })
	elapsed := time.Since(start)
	lines := strings.Count(logs.String(), "derp: client refused")
	if most := connLogBurst + int(elapsed/interval) + 1; lines > most || lines < connLogBurst {
		t.Errorf("%d refusals in %v logged %d lines; want the burst of %d and at most %d", n, elapsed, lines, connLogBurst, most)
	}
	// The next line written after the interval says how many were left
	// out (each try is one more refusal, so one is written soon).
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "suppressed="); {
		if time.Now().After(deadline) {
			t.Fatalf("no line counted the suppressed ones:\n%s", logs.String())
		}
		tryClient(t, ts.addr, clientOpts{})
	}
}

func TestKeepAliveAndHealth(t *testing.T) {
	ts := newTestServer(t, Options{KeepAlive: 50 * time.Millisecond})
	c := newClient(t, ts.addr, clientOpts{})
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	typ, _, err := c.fr.ReadFrame()
	if err != nil || typ != derp.FrameKeepAlive {
		t.Fatalf("got %v %v, want KeepAlive", typ, err)
	}
	ts.s.SetHealth("something is wrong")
	if p := c.mustNext(derp.FrameHealth); string(p) != "something is wrong" {
		t.Fatalf("health %q", p)
	}
	late := newClient(t, ts.addr, clientOpts{})
	if p := late.mustNext(derp.FrameHealth); string(p) != "something is wrong" {
		t.Fatalf("late health %q", p)
	}
	ts.s.SetHealth("")
	if p := c.mustNext(derp.FrameHealth); len(p) != 0 {
		t.Fatalf("healthy again %q", p)
	}
}

func TestCloseSendsRestarting(t *testing.T) {
	ts := newTestServer(t, Options{RestartReconnectIn: 250 * time.Millisecond, RestartTryFor: 3 * time.Second})
	c := newClient(t, ts.addr, clientOpts{})
	c2 := newClient(t, ts.addr, clientOpts{})
	done := make(chan struct{})
	go func() { ts.s.Close(); close(done) }()
	for _, cl := range []*testClient{c, c2} {
		p := cl.mustNext(derp.FrameRestarting)
		r, tf, err := derp.ParseRestarting(p)
		if err != nil || r != 250*time.Millisecond || tf != 3*time.Second {
			t.Fatalf("restarting %v %v %v", r, tf, err)
		}
		cl.expectClosed()
		cl.close()
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if _, err := tryClient(t, ts.addr, clientOpts{}); err == nil {
		t.Fatal("handshake succeeded after Close")
	}
	if v := ts.metric("derp_current_connections"); v != 0 {
		t.Fatalf("connections after Close: %v", v)
	}
}

func TestNotePreferredGauge(t *testing.T) {
	ts := newTestServer(t, Options{})
	c := newClient(t, ts.addr, clientOpts{})
	c.write(derp.AppendNotePreferred(nil, true))
	ts.waitMetric("derp_current_home_connections", func(v float64) bool { return v == 1 })
	c.write(derp.AppendNotePreferred(nil, false))
	ts.waitMetric("derp_current_home_connections", func(v float64) bool { return v == 0 })
	c.write(derp.AppendNotePreferred(nil, true))
	ts.waitMetric("derp_current_home_connections", func(v float64) bool { return v == 1 })
	c.close()
	ts.waitMetric("derp_current_home_connections", func(v float64) bool { return v == 0 })
}

// TestOverPipe runs the handshake and relay over net.Pipe, which exercises
// the plain-read path used for TLS and wrapped connections.
func TestOverPipe(t *testing.T) {
	k, _ := derp.NewPrivateKey()
	s, err := New(Options{PrivateKey: k})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	clients := []*testClient{pipeClient(t, s, false), pipeClient(t, s, false)}
	a, b := clients[0], clients[1]
	big := randBytes(derp.MaxPacketSize)
	go a.send(b.pub, big)
	if _, p := b.recvPacket(); !bytes.Equal(p, big) {
		t.Fatal("big packet over pipe")
	}
	go a.send(b.pub, []byte("small"))
	if _, p := b.recvPacket(); string(p) != "small" {
		t.Fatal("small packet over pipe")
	}
}

// TestInlineWritesKeepOrder: a packet that arrives alone for a destination
// with nothing queued is written directly by the sender's goroutine; when
// the destination stops reading, those direct writes fill its socket, are
// cut short, and hand the rest to a writer goroutine. Every packet must
// still arrive once, whole, in order; over TLS, every record must also
// still decrypt.
func TestInlineWritesKeepOrder(t *testing.T) {
	eachTransport(t, Options{WriteTimeout: 20 * time.Second, QueueDepth: 1024}, testInlineWritesKeepOrder)
}

func testInlineWritesKeepOrder(t *testing.T, ts *testServer) {
	sender := ts.client(clientOpts{})
	recv := ts.clientWithReadBuffer(32 << 10)
	size := func(i int) int {
		if i < 10 {
			return 1200
		}
		return 60000
	}
	pkt := func(i int) []byte {
		p := make([]byte, size(i))
		p[0], p[1] = byte(i>>8), byte(i)
		return p
	}
	check := func(i int) {
		t.Helper()
		_, p := recv.recvPacket()
		if len(p) != size(i) || int(p[0])<<8|int(p[1]) != i {
			t.Fatalf("packet %d: got sequence %d (len %d)", i, int(p[0])<<8|int(p[1]), len(p))
		}
	}
	// A packet that races the end of the handshake is queued and starts a
	// writer; let any such writer finish its idle period.
	sender.send(recv.pub, pkt(0))
	check(0)
	ts.waitMetric("xderp_writers_active", func(v float64) bool { return v == 0 })
	// One at a time, receiver reading: written inline.
	for i := 1; i < 10; i++ {
		sender.send(recv.pub, pkt(i))
		check(i)
	}
	ts.waitMetric("xderp_inline_writes_total", func(v float64) bool { return v >= 9 })
	// Receiver not reading: each packet still processed alone (wait until
	// the server has counted it) until the socket is full.
	const n = 150
	for i := 10; i < n; i++ {
		sender.send(recv.pub, pkt(i))
		ts.waitMetric("derp_packets_received", func(v float64) bool { return v == float64(i+1) })
	}
	for i := 10; i < n; i++ {
		check(i)
	}
	ts.waitMetric("derp_packets_sent", func(v float64) bool { return v == n })
	if ts.metric("xderp_writer_starts_total") == 0 {
		t.Fatal("the socket never filled: test did not exercise the hand-over")
	}
	// Every writer flush is one observation of its frame count, every
	// inline write one of a single frame.
	flushes, frames := ts.metric("xderp_write_flushes_total"), ts.metric("xderp_write_frames_total")
	inline := ts.metric("xderp_inline_writes_total")
	if flushes == 0 || ts.metric("derp_buffered_write_frames_count") != flushes+inline ||
		ts.metric("derp_buffered_write_frames_sum") != frames+inline ||
		ts.metric(`derp_buffered_write_frames_bucket{le="+Inf"}`) != flushes+inline ||
		ts.metric(`derp_buffered_write_frames_bucket{le="0"}`) != 0 {
		t.Fatalf("derp_buffered_write_frames count %v sum %v, want %v flushes of %v frames and %v inline writes",
			ts.metric("derp_buffered_write_frames_count"), ts.metric("derp_buffered_write_frames_sum"), flushes, frames, inline)
	}
}

// TestInlineWriteRestAlone: an inline write that the destination's socket
// takes only in part, with nothing queued after it, must still be finished
// by the writer goroutine it hands over to.
func TestInlineWriteRestAlone(t *testing.T) {
	eachTransport(t, Options{WriteTimeout: 20 * time.Second}, func(t *testing.T, ts *testServer) {
		sender := ts.client(clientOpts{})
		recv := ts.clientWithReadBuffer(32 << 10)
		// Settle any writer a packet racing the handshake started.
		sender.send(recv.pub, []byte("first"))
		recv.recvPacket()
		// The sender's reader counts an inline write when it next parks,
		// which can be after recv has the packet: wait for the count.
		ts.waitMetric("derp_packets_sent", func(v float64) bool { return v == 1 })
		ts.waitMetric("xderp_writers_active", func(v float64) bool { return v == 0 })
		starts := ts.metric("xderp_writer_starts_total")
		inline := ts.metric("xderp_inline_writes_total")
		// The receiver does not read: send one packet at a time, each
		// written inline, until one is cut short.
		pkt := func(i int) []byte { p := randBytes(derp.MaxPacketSize); p[0] = byte(i); return p }
		var sent [][]byte
		for i := 0; ts.metric("xderp_writer_starts_total") == starts; i++ {
			if i == 100 {
				t.Fatal("100 packets of 64 KiB never filled the socket")
			}
			sent = append(sent, pkt(i))
			sender.send(recv.pub, sent[i])
			// Done with it: written inline, or cut short and handed over.
			ts.waitMetric("xderp_inline_writes_total", func(v float64) bool {
				return v == inline+float64(i+1) || ts.metric("xderp_writer_starts_total") > starts
			})
		}
		for i, want := range sent {
			if _, got := recv.recvPacket(); !bytes.Equal(got, want) {
				t.Fatalf("packet %d of %d differs", i, len(sent))
			}
		}
	})
}

// TestOverTLS runs two clients over TLS (the production transport), which
// uses the plain-read path with its idle small-buffer reads.
func TestOverTLS(t *testing.T) {
	k, _ := derp.NewPrivateKey()
	s, err := New(Options{PrivateKey: k})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewTLSServer(s)
	t.Cleanup(func() { hs.Close(); s.Close() })
	dial := func() *testClient {
		conn, err := tls.Dial("tcp", hs.Listener.Addr().String(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		c, err := handshakeClient(t, conn, clientOpts{})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := dial(), dial()
	for _, n := range []int{1, 1200, derp.MaxPacketSize} {
		p := randBytes(n)
		go a.send(b.pub, p)
		if src, got := b.recvPacket(); src != a.pub || !bytes.Equal(got, p) {
			t.Fatalf("%d-byte packet over TLS", n)
		}
	}
	a.close()
	if k, _, _ := derp.ParsePeerGone(b.mustNext(derp.FramePeerGone)); k != a.pub {
		t.Fatal("PeerGone over TLS")
	}
}

// pipeClient connects a test client to s over a net.Pipe (a connection
// with no socket under it) and completes the handshake.
func pipeClient(t *testing.T, s *Server, fastStart bool) *testClient {
	t.Helper()
	cs, ss := net.Pipe()
	t.Cleanup(func() { cs.Close() })
	go s.serveConn(bg, ss, bufio.NewReader(ss), fastStart, false, "192.0.2.1:1234", 0)
	c := &testClient{t: t, conn: cs, br: bufio.NewReader(cs)}
	c.fr = derp.NewFrameReader(c.br, 0)
	c.priv, _ = derp.NewPrivateKey()
	c.pub = c.priv.Public()
	cs.SetReadDeadline(time.Now().Add(5 * time.Second))
	if !fastStart { // skip the 101 response
		if _, err := http.ReadResponse(c.br, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.readServerKey(); err != nil {
		t.Fatal(err)
	}
	ci, _ := derp.AppendClientInfo(nil, c.priv, c.serverPub, &derp.ClientInfo{})
	go cs.Write(ci)
	if err := c.readServerInfo(); err != nil {
		t.Fatal(err)
	}
	return c
}
