package derpserver

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/metrics"
)

// testServer is a Server behind an http.Server on a loopback listener.
type testServer struct {
	t    testing.TB
	s    *Server
	addr string
	reg  *metrics.Registry
	tls  bool // served over TLS from a TLSListener (newTLSTestServer)
}

func newTestServer(t testing.TB, opts Options) *testServer {
	return startTestServer(t, opts, false)
}

// newTLSTestServer is newTestServer over TLS (httptest's self-signed
// certificate) through a TLSListener, as the daemon serves.
func newTLSTestServer(t testing.TB, opts Options) *testServer {
	return startTestServer(t, opts, true)
}

func startTestServer(t testing.TB, opts Options, overTLS bool) *testServer {
	t.Helper()
	if opts.PrivateKey.IsZero() {
		k, err := derp.NewPrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		opts.PrivateKey = k
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.NewRegistry()
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/derp", s)
	hs := httptest.NewUnstartedServer(mux)
	if overTLS {
		hs.Listener = TLSListener(hs.Listener)
		hs.StartTLS()
	} else {
		hs.Start()
	}
	t.Cleanup(func() {
		hs.Close()
		s.Close()
	})
	return &testServer{t: t, s: s, addr: hs.Listener.Addr().String(), reg: opts.Metrics, tls: overTLS}
}

// wrap returns conn, a TCP connection to the server, ready for the DERP
// upgrade: over TLS for a TLS server.
func (ts *testServer) wrap(conn net.Conn) net.Conn {
	if !ts.tls {
		return conn
	}
	tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true})
	ts.t.Cleanup(func() { tc.Close() })
	return tc
}

// eachTransport runs f against a fresh server over plain HTTP and over TLS.
func eachTransport(t *testing.T, opts Options, f func(*testing.T, *testServer)) {
	t.Run("plain", func(t *testing.T) { f(t, newTestServer(t, opts)) })
	t.Run("tls", func(t *testing.T) { f(t, newTLSTestServer(t, opts)) })
}

// clientWithReadBuffer connects a test client whose socket receive
// buffer is n bytes, so that the server's writes to it stall early.
func (ts *testServer) clientWithReadBuffer(n int) *testClient {
	ts.t.Helper()
	conn := dialRaw(ts.t, ts.addr)
	conn.(*net.TCPConn).SetReadBuffer(n)
	c, err := handshakeClient(ts.t, ts.wrap(conn), clientOpts{})
	if err != nil {
		ts.t.Fatal(err)
	}
	return c
}

// client connects a test client to the server.
func (ts *testServer) client(o clientOpts) *testClient {
	ts.t.Helper()
	c, err := handshakeClient(ts.t, ts.wrap(dialRaw(ts.t, ts.addr)), o)
	if err != nil {
		ts.t.Fatal(err)
	}
	return c
}

// metric returns the value of one sample line of the Prometheus text.
func (ts *testServer) metric(name string) float64 {
	ts.t.Helper()
	var b bytes.Buffer
	ts.reg.WriteText(&b)
	for line := range strings.SplitSeq(b.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			var v float64
			fmt.Sscan(rest, &v)
			return v
		}
	}
	ts.t.Fatalf("metric %s not found", name)
	return 0
}

// waitMetric polls until cond holds for the metric, or fails after 5s.
func (ts *testServer) waitMetric(name string, cond func(float64) bool) {
	ts.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		v := ts.metric(name)
		if cond(v) {
			return
		}
		if time.Now().After(deadline) {
			ts.t.Fatalf("metric %s = %v: condition not met", name, v)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testClient is a minimal DERP client written from the protocol document.
type testClient struct {
	t         testing.TB
	conn      net.Conn
	br        *bufio.Reader
	fr        *derp.FrameReader
	wmu       sync.Mutex
	priv      derp.PrivateKey
	pub       derp.PublicKey
	serverPub derp.PublicKey
	header    http.Header
}

type clientOpts struct {
	priv     derp.PrivateKey
	info     *derp.ClientInfo
	extraHdr string
}

func dialRaw(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newClient(t testing.TB, addr string, o clientOpts) *testClient {
	t.Helper()
	c, err := tryClient(t, addr, o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func tryClient(t testing.TB, addr string, o clientOpts) (*testClient, error) {
	conn := dialRaw(t, addr)
	return handshakeClient(t, conn, o)
}

func handshakeClient(t testing.TB, conn net.Conn, o clientOpts) (*testClient, error) {
	if o.priv.IsZero() {
		k, err := derp.NewPrivateKey()
		if err != nil {
			return nil, err
		}
		o.priv = k
	}
	if o.info == nil {
		o.info = &derp.ClientInfo{Version: 2, CanAckPings: true}
	}
	c := &testClient{t: t, conn: conn, priv: o.priv, pub: o.priv.Public()}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	c.br = bufio.NewReader(conn)
	c.fr = derp.NewFrameReader(c.br, derp.MaxFrameSize)
	req := "GET /derp HTTP/1.1\r\nHost: test\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n" + o.extraHdr
	if _, err := io.WriteString(conn, req+"\r\n"); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return nil, fmt.Errorf("read response: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	c.header = resp.Header
	if err := c.readServerKey(); err != nil {
		return nil, err
	}
	ci, err := derp.AppendClientInfo(nil, c.priv, c.serverPub, o.info)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Write(ci); err != nil {
		return nil, err
	}
	if err := c.readServerInfo(); err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	return c, nil
}

func (c *testClient) readServerKey() error {
	typ, p, err := c.fr.ReadFrame()
	if err != nil {
		return fmt.Errorf("read server key: %w", err)
	}
	if typ != derp.FrameServerKey {
		return fmt.Errorf("first frame %v", typ)
	}
	c.serverPub, err = derp.ParseServerKey(p)
	return err
}

func (c *testClient) readServerInfo() error {
	typ, p, err := c.fr.ReadFrame()
	if err != nil {
		return fmt.Errorf("read server info: %w", err)
	}
	if typ != derp.FrameServerInfo {
		return fmt.Errorf("frame after ClientInfo is %v, want ServerInfo", typ)
	}
	info, err := derp.OpenServerInfo(c.priv, c.serverPub, p)
	if err != nil {
		return err
	}
	if info.Version != 2 {
		return fmt.Errorf("server version %d", info.Version)
	}
	return nil
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatalf("client write: %v", err)
	}
}

func (c *testClient) send(dst derp.PublicKey, pkt []byte) {
	c.t.Helper()
	c.write(derp.AppendSendPacket(nil, dst, pkt))
}

func (c *testClient) ping(data [8]byte) { c.t.Helper(); c.write(derp.AppendPing(nil, data)) }

// next reads the next frame, skipping KeepAlives, within a deadline.
func (c *testClient) next(d time.Duration) (derp.FrameType, []byte, error) {
	c.conn.SetReadDeadline(time.Now().Add(d))
	for {
		typ, p, err := c.fr.ReadFrame()
		if err != nil || typ != derp.FrameKeepAlive {
			return typ, p, err
		}
	}
}

func (c *testClient) mustNext(typ derp.FrameType) []byte {
	c.t.Helper()
	got, p, err := c.next(5 * time.Second)
	if err != nil {
		c.t.Fatalf("waiting for %v: %v", typ, err)
	}
	if got != typ {
		c.t.Fatalf("got %v frame (%x), want %v", got, p, typ)
	}
	return bytes.Clone(p)
}

func (c *testClient) recvPacket() (derp.PublicKey, []byte) {
	c.t.Helper()
	p := c.mustNext(derp.FrameRecvPacket)
	src, pkt, err := derp.ParseRecvPacket(p)
	if err != nil {
		c.t.Fatal(err)
	}
	return src, pkt
}

// barrier pings the server and returns every frame received before the
// Pong: the server processes a connection's frames in order, so anything
// caused by earlier frames that is destined to this client and already
// queued comes first.
func (c *testClient) barrier() []frame {
	c.t.Helper()
	var tag [8]byte
	copy(tag[:], "barrier!")
	c.ping(tag)
	var out []frame
	for {
		typ, p, err := c.next(5 * time.Second)
		if err != nil {
			c.t.Fatalf("barrier: %v", err)
		}
		if typ == derp.FramePong && string(p) == "barrier!" {
			return out
		}
		out = append(out, frame{typ, bytes.Clone(p)})
	}
}

type frame struct {
	typ derp.FrameType
	p   []byte
}

// expectClosed waits for the server to close the connection.
func (c *testClient) expectClosed() {
	c.t.Helper()
	expectClosed(c.t, c.conn, c.br)
}

func expectClosed(t testing.TB, conn net.Conn, r io.Reader) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, r)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("server did not close the connection")
		}
	}
}

func (c *testClient) close() { c.conn.Close() }

var bg = context.Background()
