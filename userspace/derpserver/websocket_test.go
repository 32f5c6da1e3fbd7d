package derpserver

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// wsClientConn is a minimal RFC 6455 client stream for tests: Write sends
// masked frames (split into a fragmented message of the given piece
// size), Read returns binary payload and records control frames.
type wsClientConn struct {
	net.Conn
	br        *bufio.Reader
	remaining int
	piece     int
	mu        sync.Mutex
	controls  []wsFrame
	maxSeen   int // largest server frame payload
}

type wsFrame struct {
	op   byte
	data []byte
}

func (c *wsClientConn) writeRaw(fin bool, op byte, p []byte) error {
	var h []byte
	b0 := op
	if fin {
		b0 |= 0x80
	}
	h = append(h, b0)
	switch n := len(p); {
	case n <= 125:
		h = append(h, 0x80|byte(n))
	case n <= 0xffff:
		h = append(h, 0x80|126)
		h = binary.BigEndian.AppendUint16(h, uint16(n))
	default:
		h = append(h, 0x80|127)
		h = binary.BigEndian.AppendUint64(h, uint64(n))
	}
	var mask [4]byte
	rand.Read(mask[:])
	h = append(h, mask[:]...)
	body := bytes.Clone(p)
	for i := range body {
		body[i] ^= mask[i&3]
	}
	_, err := c.Conn.Write(append(h, body...))
	return err
}

func (c *wsClientConn) Write(p []byte) (int, error) {
	if c.piece <= 0 || len(p) <= c.piece {
		return len(p), c.writeRaw(true, wsBinary, p)
	}
	op := byte(wsBinary)
	for off := 0; off < len(p); off += c.piece {
		end := min(off+c.piece, len(p))
		if err := c.writeRaw(end == len(p), op, p[off:end]); err != nil {
			return off, err
		}
		op = wsContinuation
	}
	return len(p), nil
}

func (c *wsClientConn) Read(p []byte) (int, error) {
	for c.remaining == 0 {
		var h [2]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return 0, err
		}
		if h[1]&0x80 != 0 {
			return 0, fmt.Errorf("server frame is masked")
		}
		n := int(h[1] & 0x7f)
		switch n {
		case 126:
			var b [2]byte
			io.ReadFull(c.br, b[:])
			n = int(binary.BigEndian.Uint16(b[:]))
		case 127:
			var b [8]byte
			io.ReadFull(c.br, b[:])
			n = int(binary.BigEndian.Uint64(b[:]))
		}
		op := h[0] & 0x0f
		if n > c.maxSeen {
			c.maxSeen = n
		}
		if op == wsBinary || op == wsContinuation {
			c.remaining = n
			continue
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(c.br, body); err != nil {
			return 0, err
		}
		c.mu.Lock()
		c.controls = append(c.controls, wsFrame{op, body})
		c.mu.Unlock()
		if op == wsClose {
			return 0, io.EOF
		}
	}
	n, err := c.br.Read(p[:min(len(p), c.remaining)])
	c.remaining -= n
	return n, err
}

func (c *wsClientConn) control() []wsFrame {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]wsFrame(nil), c.controls...)
}

// dialWS performs the WebSocket upgrade and returns the stream.
func dialWS(t *testing.T, addr string, piece int) *wsClientConn {
	t.Helper()
	conn := dialRaw(t, addr)
	var k [16]byte
	rand.Read(k[:])
	key := base64.StdEncoding.EncodeToString(k[:])
	fmt.Fprintf(conn, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\n\r\n", key)
	br := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 101 {
		t.Fatalf("status %s", resp.Status)
	}
	if got, want := resp.Header.Get("Sec-WebSocket-Accept"), wsAccept(key); got != want {
		t.Fatalf("accept %q want %q", got, want)
	}
	if resp.Header.Get("Sec-WebSocket-Protocol") != "derp" {
		t.Fatal("subprotocol not confirmed")
	}
	conn.SetReadDeadline(time.Time{})
	return &wsClientConn{Conn: conn, br: br, piece: piece}
}

func TestWebSocketAcceptKey(t *testing.T) {
	// RFC 6455 §1.3 example.
	if got := wsAccept("dGhlIHNhbXBsZSBub25jZQ=="); got != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
		t.Fatalf("accept %q", got)
	}
}

func wsDERPClient(t *testing.T, ts *testServer, piece int) (*testClient, *wsClientConn) {
	t.Helper()
	ws := dialWS(t, ts.addr, piece)
	priv, _ := derp.NewPrivateKey()
	c := &testClient{t: t, conn: ws, priv: priv, pub: priv.Public()}
	c.br = bufio.NewReader(ws)
	c.fr = derp.NewFrameReader(c.br, 0)
	ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := c.readServerKey(); err != nil {
		t.Fatal(err)
	}
	ci, _ := derp.AppendClientInfo(nil, priv, c.serverPub, &derp.ClientInfo{Version: 2})
	ws.Write(ci)
	if err := c.readServerInfo(); err != nil {
		t.Fatal(err)
	}
	return c, ws
}

func TestWebSocketRelay(t *testing.T) {
	ts := newTestServer(t, Options{})
	a, ws := wsDERPClient(t, ts, 1000) // messages fragmented into 1000-byte frames
	b := newClient(t, ts.addr, clientOpts{})
	for _, n := range []int{0, 5, 1200, derp.MaxPacketSize} {
		p := randBytes(n)
		a.send(b.pub, p)
		if src, got := b.recvPacket(); src != a.pub || !bytes.Equal(got, p) {
			t.Fatalf("ws->tcp %d bytes", n)
		}
		p = randBytes(n)
		b.send(a.pub, p)
		if src, got := a.recvPacket(); src != b.pub || !bytes.Equal(got, p) {
			t.Fatalf("tcp->ws %d bytes", n)
		}
	}
	if ws.maxSeen > 32768 {
		t.Fatalf("server sent a %d-byte message; Tailscale's client refuses more than 32 KiB", ws.maxSeen)
	}
	// Several DERP frames in one message, and one frame over two messages.
	ws.piece = 0
	two := append(derp.AppendSendPacket(nil, b.pub, []byte("one")), derp.AppendSendPacket(nil, b.pub, []byte("two"))...)
	ws.Write(two[:len(two)-5])
	ws.Write(two[len(two)-5:])
	for _, want := range []string{"one", "two"} {
		if _, got := b.recvPacket(); string(got) != want {
			t.Fatalf("got %q want %q", got, want)
		}
	}
	// A WebSocket ping is answered with a pong carrying its data.
	ws.writeRaw(true, wsPing, []byte("wsping"))
	a.barrier()
	var ponged bool
	for _, f := range ws.control() {
		ponged = ponged || (f.op == wsPong && string(f.data) == "wsping")
	}
	if !ponged {
		t.Fatalf("no pong: %v", ws.control())
	}
	ts.waitMetric("derp_websocket_accepts", func(v float64) bool { return v == 1 })
}

// A Pong is written with a deadline of its own, from the reader; the
// writer must not inherit it. With write timeouts off, a deadline left
// behind would fail every write once it passed.
func TestWebSocketPongLeavesNoDeadline(t *testing.T) {
	ts := newTestServer(t, Options{WriteTimeout: -1})
	const control = 20 * time.Millisecond
	ts.s.wsControlTimeout = control
	a, ws := wsDERPClient(t, ts, 0)
	b := newClient(t, ts.addr, clientOpts{})
	ws.writeRaw(true, wsPing, []byte("wsping"))
	a.barrier()               // the Pong has been written by the time the Pong to the DERP ping arrives
	<-time.After(5 * control) // the Pong's deadline is long past
	for i := range 3 {
		p := []byte{byte(i)}
		b.send(a.pub, p)
		if src, got := a.recvPacket(); src != b.pub || !bytes.Equal(got, p) {
			t.Fatalf("packet %d after the Pong: %x", i, got)
		}
	}
}

func TestWebSocketTextMessageCloses(t *testing.T) {
	ts := newTestServer(t, Options{})
	a, ws := wsDERPClient(t, ts, 0)
	ws.writeRaw(true, wsText, []byte("hello"))
	a.expectClosed()
	var code uint16
	for _, f := range ws.control() {
		if f.op == wsClose && len(f.data) >= 2 {
			code = binary.BigEndian.Uint16(f.data)
		}
	}
	if code != wsCloseUnsupported {
		t.Fatalf("close code %d, want 1003", code)
	}
	ts.waitMetric(`xderp_connections_closed_total{reason="protocol_error"}`, func(v float64) bool { return v == 1 })
}

func TestWebSocketBadUpgrade(t *testing.T) {
	ts := newTestServer(t, Options{})
	req, _ := http.NewRequest("GET", "http://"+ts.addr+"/derp", nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Protocol", "chat, derp")
	req.Header.Set("Sec-WebSocket-Version", "13")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "Sec-WebSocket-Key") {
		t.Fatalf("missing key: %d %s", resp.StatusCode, body)
	}
}

func TestWebSocketRestarting(t *testing.T) {
	ts := newTestServer(t, Options{})
	a, ws := wsDERPClient(t, ts, 0)
	go ts.s.Close()
	a.mustNext(derp.FrameRestarting)
	a.expectClosed()
	var code uint16
	for _, f := range ws.control() {
		if f.op == wsClose && len(f.data) >= 2 {
			code = binary.BigEndian.Uint16(f.data)
		}
	}
	if code != wsCloseGoingAway {
		t.Fatalf("close code %d, want 1001", code)
	}
}
