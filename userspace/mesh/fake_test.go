package mesh

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// fakeNode is a scripted DERP server speaking just enough of the mesh
// protocol to drive a Mesh: it accepts the upgrade and handshake, records
// what the client proves, answers WatchConns with PeerPresent for its
// current keys, and reports every ForwardPacket it reads.
type fakeNode struct {
	t      *testing.T
	priv   derp.PrivateKey
	pub    derp.PublicKey
	ln     net.Listener
	srv    *http.Server
	conns  chan *fakeConn
	mu     sync.Mutex
	keys   []derp.PublicKey // announced on WatchConns
	noRead bool             // stop reading after the handshake (stuck peer)
	// floodFirst announces keys right after the handshake, without waiting
	// for WatchConns (with noRead, a stuck peer that still has keys).
	floodFirst bool
	live       []net.Conn
	quit       chan struct{}
	handled    sync.WaitGroup
}

type fakeConn struct {
	nc      net.Conn
	client  derp.PublicKey
	info    *derp.ClientInfo
	watch   chan struct{} // closed when WatchConns arrives
	fwd     chan fwdFrame
	pongs   chan [8]byte
	writeMu sync.Mutex
	closed  chan struct{}
}

type fwdFrame struct {
	src, dst derp.PublicKey
	pkt      []byte
}

func newFakeNode(t *testing.T, priv derp.PrivateKey, addr string) *fakeNode {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	n := &fakeNode{t: t, priv: priv, pub: priv.Public(), ln: ln, conns: make(chan *fakeConn, 16), quit: make(chan struct{})}
	n.srv = &http.Server{Handler: http.HandlerFunc(n.serveHTTP)}
	go n.srv.Serve(ln)
	t.Cleanup(n.close)
	return n
}

func (n *fakeNode) url() string { return "http://" + n.ln.Addr().String() + "/derp" }

func (n *fakeNode) close() {
	n.srv.Close()
	n.mu.Lock()
	select {
	case <-n.quit:
	default:
		close(n.quit)
	}
	for _, c := range n.live {
		c.Close()
	}
	n.mu.Unlock()
	n.handled.Wait()
}

// dropAll closes every hijacked connection (a node crash as seen by peers)
// while the listener stays up.
func (n *fakeNode) dropAll() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, c := range n.live {
		c.Close()
	}
	n.live = nil
}

func (n *fakeNode) setKeys(keys ...derp.PublicKey) {
	n.mu.Lock()
	n.keys = keys
	n.mu.Unlock()
}

func (n *fakeNode) serveHTTP(w http.ResponseWriter, r *http.Request) {
	n.handled.Add(1)
	defer n.handled.Done()
	if r.Header.Get("Upgrade") != "DERP" || r.URL.Path != "/derp" {
		http.Error(w, "want DERP upgrade on /derp", http.StatusUpgradeRequired)
		return
	}
	nc, brw, err := w.(http.Hijacker).Hijack()
	if err != nil {
		return
	}
	defer nc.Close()
	n.mu.Lock()
	n.live = append(n.live, nc)
	n.mu.Unlock()
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
	brw.Write(derp.AppendServerKey(nil, n.pub))
	if brw.Flush() != nil {
		return
	}
	fr := derp.NewFrameReader(brw.Reader, 0)
	ft, p, err := fr.ReadFrame()
	if err != nil || ft != derp.FrameClientInfo {
		return
	}
	client, info, err := derp.OpenClientInfo(n.priv, p)
	if err != nil {
		return
	}
	si, _ := derp.AppendServerInfo(nil, n.priv, client, &derp.ServerInfo{Version: 2})
	if _, err := nc.Write(si); err != nil {
		return
	}
	c := &fakeConn{nc: nc, client: client, info: info, watch: make(chan struct{}),
		fwd: make(chan fwdFrame, 1<<16), pongs: make(chan [8]byte, 16), closed: make(chan struct{})}
	defer close(c.closed)
	n.conns <- c
	n.mu.Lock()
	noRead := n.noRead
	var flood []byte
	if n.floodFirst {
		for _, k := range n.keys {
			flood = derp.AppendPeerPresent(flood, derp.PeerPresent{Key: k})
		}
	}
	n.mu.Unlock()
	if c.write(flood) != nil {
		return
	}
	if noRead {
		// Never read again: the client's writes pile up in the socket
		// buffers until its write deadline fires.
		<-n.quit
		return
	}
	br := bufio.NewReader(brw.Reader)
	fr = derp.NewFrameReader(br, 0)
	for {
		ft, p, err := fr.ReadFrame()
		if err != nil {
			return
		}
		switch ft {
		case derp.FrameWatchConns:
			n.mu.Lock()
			var out []byte
			for _, k := range n.keys {
				out = derp.AppendPeerPresent(out, derp.PeerPresent{Key: k, Flags: derp.PeerPresentIsRegular})
			}
			n.mu.Unlock()
			c.write(out)
			close(c.watch)
		case derp.FrameForwardPacket:
			src, dst, pkt, err := derp.ParseForwardPacket(p)
			if err != nil {
				return
			}
			c.fwd <- fwdFrame{src, dst, append([]byte(nil), pkt...)}
		case derp.FramePong:
			d, _ := derp.ParsePong(p)
			c.pongs <- d
		}
	}
}

func (c *fakeConn) write(b []byte) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	_, err := c.nc.Write(b)
	return err
}

// next waits for the next accepted mesh connection.
func (n *fakeNode) next(t *testing.T) *fakeConn {
	t.Helper()
	select {
	case c := <-n.conns:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no mesh connection arrived")
		return nil
	}
}

// fakeRelay records the forwarder table the mesh maintains.
type fakeRelay struct {
	mu  sync.Mutex
	fwd map[derp.PublicKey][]Forwarder
	ch  chan struct{} // signalled on every change
}

func newFakeRelay() *fakeRelay {
	return &fakeRelay{fwd: make(map[derp.PublicKey][]Forwarder), ch: make(chan struct{}, 1)}
}

func (r *fakeRelay) AddPacketForwarder(k derp.PublicKey, f Forwarder) {
	r.mu.Lock()
	r.fwd[k] = append(r.fwd[k], f)
	r.mu.Unlock()
	r.changed()
}

func (r *fakeRelay) RemovePacketForwarder(k derp.PublicKey, f Forwarder) {
	r.mu.Lock()
	l := r.fwd[k]
	for i, g := range l {
		if g == f {
			l = append(l[:i:i], l[i+1:]...)
			break
		}
	}
	if len(l) == 0 {
		delete(r.fwd, k)
	} else {
		r.fwd[k] = l
	}
	r.mu.Unlock()
	r.changed()
}

func (r *fakeRelay) changed() {
	select {
	case r.ch <- struct{}{}:
	default:
	}
}

func (r *fakeRelay) get(k derp.PublicKey) []Forwarder {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Forwarder(nil), r.fwd[k]...)
}

func (r *fakeRelay) size() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.fwd)
}

// waitFor polls cond (woken by table changes, or every 20 ms for state
// outside the table) until it holds or 10 s pass.
func waitFor(t *testing.T, r *fakeRelay, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		var ch chan struct{}
		if r != nil {
			ch = r.ch
		}
		select {
		case <-ch:
		case <-tick.C:
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func mustKey(t *testing.T) derp.PrivateKey {
	t.Helper()
	k, err := derp.NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}
