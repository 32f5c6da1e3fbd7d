package mesh

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/derpserver"
	"github.com/xderp/xderp/userspace/internal/testlog"
	"github.com/xderp/xderp/userspace/metrics"
)

// node is an in-process region node: a derpserver on a loopback port and
// a Mesh towards the other nodes.
type node struct {
	t       *testing.T
	name    string
	priv    derp.PrivateKey
	addr    string
	meshKey string

	mu   sync.Mutex
	srv  *derpserver.Server
	hs   *http.Server
	mesh *Mesh
	reg  *metrics.Registry
}

func newNode(t *testing.T, name, meshKey string) *node {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{t: t, name: name, priv: mustKey(t), addr: ln.Addr().String(), meshKey: meshKey}
	n.serve(ln)
	t.Cleanup(n.kill)
	return n
}

func (n *node) url() string { return "http://" + n.addr + "/derp" }

func (n *node) serve(ln net.Listener) {
	reg := metrics.NewRegistry()
	s, err := derpserver.New(derpserver.Options{PrivateKey: n.priv, MeshKey: n.meshKey, Metrics: reg})
	if err != nil {
		n.t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/derp", s)
	hs := &http.Server{Handler: mux}
	go hs.Serve(ln)
	n.mu.Lock()
	n.srv, n.hs, n.reg = s, hs, reg
	n.mu.Unlock()
}

func (n *node) meshWith(opts func(*Options), peers ...*node) {
	n.t.Helper()
	var urls []string
	for _, p := range peers {
		urls = append(urls, p.url())
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	o := Options{
		Server: n.srv, PrivateKey: n.priv, MeshKey: n.meshKey, Peers: urls, Metrics: n.reg,
		ReconnectMin: 10 * time.Millisecond, ReconnectMax: 300 * time.Millisecond,
	}
	if opts != nil {
		opts(&o)
	}
	m, err := New(o)
	if err != nil {
		n.t.Fatal(err)
	}
	m.Start(context.Background())
	n.mesh = m
}

// kill stops the node at once: mesh, every connection, the listener.
func (n *node) kill() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mesh != nil {
		n.mesh.Close()
	}
	if n.srv != nil {
		n.hs.Close()
		n.srv.Close()
		n.srv, n.hs = nil, nil
	}
}

// restart serves again on the same address with the same key; the mesh
// is restarted with the same peers.
func (n *node) restart() {
	n.t.Helper()
	var ln net.Listener
	var err error
	for range 100 {
		if ln, err = net.Listen("tcp", n.addr); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond) // the port can stay busy briefly after close
	}
	if err != nil {
		n.t.Fatal(err)
	}
	n.serve(ln)
	n.mu.Lock()
	old := n.mesh
	n.mu.Unlock()
	if old != nil {
		o := old.opts
		o.Server, o.Metrics = n.srv, n.reg
		m, err := New(o)
		if err != nil {
			n.t.Fatal(err)
		}
		m.Start(context.Background())
		n.mu.Lock()
		n.mesh = m
		n.mu.Unlock()
	}
}

func (n *node) metric(name string) string {
	n.mu.Lock()
	reg := n.reg
	n.mu.Unlock()
	var b bytes.Buffer
	reg.WriteText(&b)
	for _, l := range bytes.Split(b.Bytes(), []byte("\n")) {
		if bytes.HasPrefix(l, []byte(name+" ")) {
			return string(l[len(name)+1:])
		}
	}
	return ""
}

// tclient is a minimal DERP client written with the codec.
type tclient struct {
	t      *testing.T
	pub    derp.PublicKey
	cc     *clientConn
	frames chan tframe
	wmu    sync.Mutex
	held   []tframe
}

type tframe struct {
	typ derp.FrameType
	p   []byte
}

func dialClient(t *testing.T, n *node, priv derp.PrivateKey, meshKey derp.MeshKey) *tclient {
	t.Helper()
	tg, err := parseTarget(n.url())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cc, err := dialMesh(ctx, tg, n.addr, nil, priv, derp.PublicKey{}, meshKey, false)
	if err != nil {
		t.Fatalf("client to %s: %v", n.name, err)
	}
	c := &tclient{t: t, pub: priv.Public(), cc: cc, frames: make(chan tframe, 1<<15)}
	go func() {
		defer close(c.frames)
		for {
			ft, p, err := cc.fr.ReadFrame()
			if err != nil {
				return
			}
			select {
			case c.frames <- tframe{ft, bytes.Clone(p)}:
			default:
			}
		}
	}()
	t.Cleanup(func() { cc.nc.Close() })
	return c
}

func (c *tclient) write(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.cc.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := c.cc.nc.Write(b)
	return err
}

func (c *tclient) send(dst derp.PublicKey, pkt []byte) {
	c.t.Helper()
	if err := c.write(derp.AppendSendPacket(nil, dst, pkt)); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// next returns the next frame of type typ (others are held back for later
// calls), or fails after d.
func (c *tclient) next(typ derp.FrameType, d time.Duration) (tframe, error) {
	for i, f := range c.held {
		if f.typ == typ {
			c.held = append(c.held[:i:i], c.held[i+1:]...)
			return f, nil
		}
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case f, ok := <-c.frames:
			if !ok {
				return tframe{}, fmt.Errorf("connection closed")
			}
			if f.typ == typ {
				return f, nil
			}
			if f.typ != derp.FrameKeepAlive {
				c.held = append(c.held, f)
			}
		case <-timer.C:
			return tframe{}, fmt.Errorf("no %v within %v", typ, d)
		}
	}
}

// recvData returns the next RecvPacket that is not a probe.
func (c *tclient) recvData(d time.Duration) (derp.PublicKey, []byte, error) {
	for {
		f, err := c.next(derp.FrameRecvPacket, d)
		if err != nil {
			return derp.PublicKey{}, nil, err
		}
		src, pkt, err := derp.ParseRecvPacket(f.p)
		if err != nil {
			return src, nil, err
		}
		if string(pkt) != "probe" {
			return src, pkt, nil
		}
	}
}

// reachT sends probes from a to b until one arrives. Stale probes are
// discarded; other packets b receives meanwhile are kept for later reads.
func reachT(t *testing.T, a, b *tclient, within time.Duration) {
	t.Helper()
	var kept []tframe
	defer func() { b.held = append(b.held, kept...) }()
	deadline := time.Now().Add(within)
	for {
		a.send(b.pub, []byte("probe"))
		f, err := b.next(derp.FrameRecvPacket, 10*time.Millisecond)
		if err == nil {
			src, pkt, _ := derp.ParseRecvPacket(f.p)
			if string(pkt) == "probe" {
				if src == a.pub {
					return
				}
			} else {
				kept = append(kept, f)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s cannot reach %s within %v", a.pub.ShortString(), b.pub.ShortString(), within)
		}
	}
}

func numbered(i, size int) []byte {
	p := bytes.Repeat([]byte{byte(i)}, size)
	binary.BigEndian.PutUint32(p, uint32(i))
	return p
}

// stream sends n packets a->b in windows of 16 and checks order, content
// and that nothing is duplicated.
func stream(t *testing.T, a, b *tclient, n int) {
	t.Helper()
	const window = 16
	for i := 0; i < n; i += window {
		end := min(i+window, n)
		for j := i; j < end; j++ {
			a.send(b.pub, numbered(j, 4+j%1300))
		}
		for j := i; j < end; j++ {
			src, pkt, err := b.recvData(5 * time.Second)
			if err != nil {
				t.Fatalf("packet %d: %v", j, err)
			}
			if src != a.pub || !bytes.Equal(pkt, numbered(j, 4+j%1300)) {
				t.Fatalf("packet %d: %d bytes from %s, want %d bytes from %s", j, len(pkt), src.ShortString(), 4+j%1300, a.pub.ShortString())
			}
		}
	}
	if _, _, err := b.recvData(50 * time.Millisecond); err == nil {
		t.Fatal("extra (duplicate) packet delivered")
	}
}

func TestRegionForwarding(t *testing.T) {
	a, b, c := newNode(t, "a", testMeshKey), newNode(t, "b", testMeshKey), newNode(t, "c", testMeshKey)
	for _, n := range []*node{a, b, c} {
		n.meshWith(nil, a, b, c) // includes itself, as derper configurations do
	}
	ca := dialClient(t, a, mustKey(t), derp.MeshKey{})
	cb := dialClient(t, b, mustKey(t), derp.MeshKey{})
	cc := dialClient(t, c, mustKey(t), derp.MeshKey{})
	pairs := [][2]*tclient{{ca, cb}, {cb, ca}, {ca, cc}, {cc, ca}, {cb, cc}, {cc, cb}}
	for _, p := range pairs {
		reachT(t, p[0], p[1], 10*time.Second)
	}
	for _, p := range pairs {
		stream(t, p[0], p[1], 200)
	}
	for _, n := range []*node{a, b, c} {
		if v := n.metric("xderp_mesh_peers_connected"); v != "2" {
			t.Errorf("%s: peers_connected %s, want 2", n.name, v)
		}
		if v := n.metric(`xderp_mesh_dials_total{result="self"}`); v != "1" {
			t.Errorf("%s: self dials %s, want 1", n.name, v)
		}
	}
	if v := a.metric(`xderp_mesh_forwarded_packets_total{direction="out"}`); v == "" || v == "0" {
		t.Errorf("a: forwarded out %q", v)
	}
}

func TestRegionPeerDeathAndHeal(t *testing.T) {
	a, b := newNode(t, "a", testMeshKey), newNode(t, "b", testMeshKey)
	a.meshWith(nil, b)
	b.meshWith(nil, a)
	ca := dialClient(t, a, mustKey(t), derp.MeshKey{})
	cb := dialClient(t, b, mustKey(t), derp.MeshKey{})
	ca2 := dialClient(t, a, mustKey(t), derp.MeshKey{})
	// cb->ca first: cb's packets may reach a before a has learned cb from
	// b's watch stream; a must still report cb gone later.
	reachT(t, cb, ca, 10*time.Second) // ca has now received from cb
	reachT(t, ca, cb, 10*time.Second)

	b.kill()
	f, err := ca.next(derp.FramePeerGone, 10*time.Second)
	if err != nil {
		t.Fatalf("no PeerGone after b died: %v", err)
	}
	k, reason, _ := derp.ParsePeerGone(f.p)
	if k != cb.pub || reason != derp.PeerGoneDisconnected {
		t.Errorf("PeerGone for %s reason %d, want %s reason 0", k.ShortString(), reason, cb.pub.ShortString())
	}
	// Local traffic on a is unaffected.
	reachT(t, ca2, ca, 5*time.Second)
	stream(t, ca2, ca, 64)

	b.restart()
	cb2 := dialClient(t, b, mustKey(t), derp.MeshKey{})
	reachT(t, ca, cb2, 15*time.Second)
	reachT(t, cb2, ca, 15*time.Second)
	stream(t, ca, cb2, 100)
	stream(t, cb2, ca, 100)
}

func TestRegionStuckPeerDoesNotBlockLocal(t *testing.T) {
	a := newNode(t, "a", testMeshKey)
	stuck := newFakeNode(t, mustKey(t), "")
	remote := mustKey(t).Public()
	stuck.setKeys(remote)
	stuck.noRead = true
	stuck.floodFirst = true
	a.meshWith(func(o *Options) { o.Peers = []string{stuck.url()}; o.QueueLen = 256 })
	stuck.next(t)
	sender := dialClient(t, a, mustKey(t), derp.MeshKey{})
	local := dialClient(t, a, mustKey(t), derp.MeshKey{})
	// Wait until the relay forwards to the stuck peer: its queue fills and
	// drops start.
	big := bytes.Repeat([]byte{9}, 1200)
	deadline := time.Now().Add(10 * time.Second)
	for a.metric(`xderp_mesh_forward_drops_total{reason="queue_full"}`) == "0" || a.metric(`xderp_mesh_forward_drops_total{reason="queue_full"}`) == "" {
		for range 256 {
			sender.send(remote, big)
		}
		if time.Now().After(deadline) {
			t.Fatal("the stuck peer's queue never filled")
		}
	}
	// With the peer stuck, the same sender interleaves packets for the
	// stuck peer and for a local client; every local packet arrives.
	for i := range 400 {
		sender.send(remote, big)
		sender.send(remote, big)
		sender.send(local.pub, numbered(i, 100))
		if i%16 == 15 {
			for j := i - 15; j <= i; j++ {
				src, pkt, err := local.recvData(5 * time.Second)
				if err != nil {
					t.Fatalf("local packet %d: %v", j, err)
				}
				if src != sender.pub || !bytes.Equal(pkt, numbered(j, 100)) {
					t.Fatalf("local packet %d wrong", j)
				}
			}
		}
	}
}

func TestRegionWrongMeshKey(t *testing.T) {
	a := newNode(t, "a", testMeshKey)
	b := newNode(t, "b", "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100")
	var logs testlog.Buffer
	a.meshWith(func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) }, b)
	b.meshWith(nil, a)
	ca := dialClient(t, a, mustKey(t), derp.MeshKey{})
	cb := dialClient(t, b, mustKey(t), derp.MeshKey{})
	cb2 := dialClient(t, b, mustKey(t), derp.MeshKey{})
	// Both nodes dial each other; each is an ordinary client at the other
	// and is disconnected when it asks to watch (the connection may even
	// end before ServerInfo is read, which counts as a failed dial).
	tried := func(n *node) bool {
		return n.metric(`xderp_mesh_dials_total{result="ok"}`) != "0" || n.metric(`xderp_mesh_dials_total{result="error"}`) != "0"
	}
	waitFor(t, nil, "rejected watches", func() bool { return tried(a) && tried(b) })
	for range 20 {
		ca.send(cb.pub, []byte("nope"))
		cb.send(ca.pub, []byte("nope"))
	}
	reachT(t, cb2, cb, 5*time.Second) // b is alive and has processed cb's sends
	reachT(t, ca, ca, 5*time.Second)  // same for a
	if _, _, err := cb.recvData(200 * time.Millisecond); err == nil {
		t.Fatal("packet crossed nodes with mismatched mesh keys")
	}
	if _, _, err := ca.recvData(10 * time.Millisecond); err == nil {
		t.Fatal("packet crossed nodes with mismatched mesh keys")
	}
	if v := a.metric("xderp_mesh_remote_keys"); v != "0" {
		t.Errorf("a learned %s keys from b", v)
	}
	// The operator is told what is probably wrong.
	waitFor(t, nil, "mesh key hint in the log", func() bool {
		return strings.Contains(logs.String(), "is the mesh key the same on both nodes?")
	})

	// A client holding a wrong mesh key may not forward: the connection
	// is closed and nothing is delivered.
	wrong, _ := derp.ParseMeshKey("0102030405060708090a0b0c0d0e0f100102030405060708090a0b0c0d0e0f10")
	intruder := dialClient(t, a, mustKey(t), wrong)
	intruder.write(derp.AppendForwardPacket(nil, cb.pub, ca.pub, []byte("forged")))
	if _, err := intruder.next(derp.FrameRecvPacket, 5*time.Second); err == nil || err.Error() != "connection closed" {
		t.Errorf("intruder connection not closed: %v", err)
	}
	if _, _, err := ca.recvData(100 * time.Millisecond); err == nil {
		t.Error("forged ForwardPacket delivered")
	}
}
