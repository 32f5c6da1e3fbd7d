package interop

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	tsderpserver "tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"

	xderp "github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/derpserver"
	"github.com/xderp/xderp/userspace/mesh"
	"github.com/xderp/xderp/userspace/metrics"
)

// Region tests run several relay nodes in this process, each on its own
// loopback port, and mesh them. A node is a relay core plus a mesh client:
//
//   - nodeXderp: xderp's userspace/derpserver driven by userspace/mesh (what
//     xderpd runs; the daemon's -mesh-with wiring is the same two calls);
//   - nodeDerper: Tailscale's derpserver driven by Tailscale's own mesh
//     client (derphttp RunWatchConnectionLoop, exactly as cmd/derper
//     -mesh-with sets it up);
//   - nodeXmeshOnDerper: Tailscale's derpserver driven by userspace/mesh
//     through an adapter, which checks the mesh client against the
//     reference server side of the protocol.
const regionMeshKey = "6d657368206b657920666f7220746865207265676f6e20746573747320303031"

type nodeKind int

const (
	nodeXderp nodeKind = iota
	nodeDerper
	nodeXmeshOnDerper
)

func (k nodeKind) String() string {
	return [...]string{"xderp", "derper", "xmesh-on-derper"}[k]
}

type regionNode struct {
	t       *testing.T
	name    string
	kind    nodeKind
	priv    key.NodePrivate
	addr    string // host:port, stable across restarts
	meshKey string

	mu      sync.Mutex
	srv     *tsderpserver.Server // Tailscale core (nodeDerper, nodeXmeshOnDerper)
	xsrv    *derpserver.Server   // xderp core (nodeXderp)
	hs      *httptest.Server
	mesh    *mesh.Mesh
	reg     *metrics.Registry // xderp core and mesh metrics
	tsMesh  []context.CancelFunc
	tsMeshC []*derphttp.Client
	peers   []string
}

func (n *regionNode) url() string { return "http://" + n.addr + "/derp" }

func newRegionNode(t *testing.T, name string, kind nodeKind) *regionNode {
	t.Helper()
	return newRegionNodeKey(t, name, kind, regionMeshKey)
}

func newRegionNodeKey(t *testing.T, name string, kind nodeKind, meshKey string) *regionNode {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &regionNode{t: t, name: name, kind: kind, priv: key.NewNode(), addr: ln.Addr().String(), meshKey: meshKey}
	n.serve(ln)
	t.Cleanup(n.kill)
	return n
}

func (n *regionNode) serve(ln net.Listener) {
	var h http.Handler
	reg := metrics.NewRegistry()
	var ts *tsderpserver.Server
	var xs *derpserver.Server
	if n.kind == nodeXderp {
		var err error
		xs, err = derpserver.New(derpserver.Options{PrivateKey: xderp.PrivateKey(n.priv.Raw32()), MeshKey: n.meshKey, Metrics: reg})
		if err != nil {
			n.t.Fatal(err)
		}
		mux := http.NewServeMux()
		mux.Handle("/derp", xs)
		h = mux
	} else {
		ts = tsderpserver.New(n.priv, n.t.Logf)
		if err := ts.SetMeshKey(n.meshKey); err != nil {
			n.t.Fatal(err)
		}
		h = tsderpserver.Handler(ts)
	}
	hs := httptest.NewUnstartedServer(h)
	hs.Listener.Close()
	hs.Listener = ln
	hs.Start()
	n.mu.Lock()
	n.srv, n.xsrv, n.hs, n.reg = ts, xs, hs, reg
	n.mu.Unlock()
}

// meshWith starts this node's mesh client towards peers (given as URLs).
func (n *regionNode) meshWith(peers ...*regionNode) {
	n.t.Helper()
	n.peers = n.peers[:0]
	for _, p := range peers {
		n.peers = append(n.peers, p.url())
	}
	n.startMesh()
}

func (n *regionNode) startMesh() {
	n.t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	switch n.kind {
	case nodeXderp, nodeXmeshOnDerper:
		var relay mesh.Relay = n.xsrv
		if n.kind == nodeXmeshOnDerper {
			relay = &tsRelay{s: n.srv, wrap: map[mesh.Forwarder]*tsForwarder{}}
		}
		m, err := mesh.New(mesh.Options{
			Server:       relay,
			PrivateKey:   xderp.PrivateKey(n.priv.Raw32()),
			MeshKey:      n.meshKey,
			Peers:        n.peers,
			Metrics:      n.reg,
			ReconnectMin: 20 * time.Millisecond,
			ReconnectMax: 500 * time.Millisecond,
		})
		if err != nil {
			n.t.Fatal(err)
		}
		m.Start(context.Background())
		n.mesh = m
	case nodeDerper:
		s := n.srv
		for _, u := range n.peers {
			c, err := derphttp.NewClient(s.PrivateKey(), u, n.t.Logf, netmon.NewStatic())
			if err != nil {
				n.t.Fatal(err)
			}
			c.MeshKey = s.MeshKey()
			c.WatchConnectionChanges = true
			ctx, cancel := context.WithCancel(context.Background())
			add := func(m derp.PeerPresentMessage) { s.AddPacketForwarder(m.Key, c) }
			remove := func(m derp.PeerGoneMessage) { s.RemovePacketForwarder(m.Peer, c) }
			go c.RunWatchConnectionLoop(ctx, s.PublicKey(), n.t.Logf, add, remove, nil)
			n.tsMesh = append(n.tsMesh, cancel)
			n.tsMeshC = append(n.tsMeshC, c)
		}
	}
}

// kill stops the node abruptly: mesh client, every connection, listener.
func (n *regionNode) kill() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mesh != nil {
		n.mesh.Close()
		n.mesh = nil
	}
	for _, c := range n.tsMesh {
		c()
	}
	for _, c := range n.tsMeshC {
		c.Close()
	}
	n.tsMesh, n.tsMeshC = nil, nil
	if n.hs != nil {
		if n.srv != nil {
			n.srv.Close()
		}
		if n.xsrv != nil {
			n.xsrv.Close()
		}
		n.hs.Close()
		n.srv, n.xsrv, n.hs = nil, nil, nil
	}
}

// restart brings a killed node back on the same address with the same key
// and mesh configuration.
func (n *regionNode) restart() {
	n.t.Helper()
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp", n.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond) // the port is briefly in use after close
	}
	if err != nil {
		n.t.Fatalf("relisten %s: %v", n.addr, err)
	}
	n.serve(ln)
	n.startMesh()
}

// tsRelay adapts Tailscale's derpserver forwarder table to mesh.Relay.
type tsRelay struct {
	s    *tsderpserver.Server
	mu   sync.Mutex
	wrap map[mesh.Forwarder]*tsForwarder
}

type tsForwarder struct{ f mesh.Forwarder }

func (f *tsForwarder) ForwardPacket(src, dst key.NodePublic, payload []byte) error {
	return f.f.ForwardPacket(xderp.PublicKey(src.Raw32()), xderp.PublicKey(dst.Raw32()), payload)
}
func (f *tsForwarder) String() string { return f.f.String() }

func (r *tsRelay) get(f mesh.Forwarder) *tsForwarder {
	r.mu.Lock()
	defer r.mu.Unlock()
	w := r.wrap[f]
	if w == nil {
		w = &tsForwarder{f}
		r.wrap[f] = w
	}
	return w
}

func tsKey(k xderp.PublicKey) key.NodePublic { return key.NodePublicFromRaw32(mem.B(k[:])) }

func (r *tsRelay) AddPacketForwarder(k xderp.PublicKey, f mesh.Forwarder) {
	r.s.AddPacketForwarder(tsKey(k), r.get(f))
}
func (r *tsRelay) RemovePacketForwarder(k xderp.PublicKey, f mesh.Forwarder) {
	r.s.RemovePacketForwarder(tsKey(k), r.get(f))
}

// regionClient is a Tailscale derphttp client homed on one node.
type regionClient struct {
	t    *testing.T
	priv key.NodePrivate
	pub  key.NodePublic
	c    *derphttp.Client
	msgs chan derp.ReceivedMessage
	// pending holds messages a helper read past (data from other flows
	// while waiting for a probe or a PeerGone); nextData returns them first.
	pending []derp.ReceivedMessage
}

// recv returns the next message, pending ones first.
func (rc *regionClient) recv(timer <-chan time.Time) (derp.ReceivedMessage, error) {
	if len(rc.pending) > 0 {
		m := rc.pending[0]
		rc.pending = rc.pending[1:]
		return m, nil
	}
	select {
	case m, ok := <-rc.msgs:
		if !ok {
			return nil, fmt.Errorf("connection closed")
		}
		return m, nil
	case <-timer:
		return nil, errTimeout
	}
}

var errTimeout = fmt.Errorf("timed out")

func dialRegion(t *testing.T, n *regionNode, priv key.NodePrivate) *regionClient {
	t.Helper()
	c, err := derphttp.NewClient(priv, n.url(), t.Logf, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("connect %s: %v", n.name, err)
	}
	rc := &regionClient{t: t, priv: priv, pub: priv.Public(), c: c, msgs: make(chan derp.ReceivedMessage, 1<<14)}
	go func() {
		defer close(rc.msgs)
		for {
			m, err := c.Recv()
			if err != nil {
				return
			}
			if rp, ok := m.(derp.ReceivedPacket); ok {
				rp.Data = bytes.Clone(rp.Data)
				m = rp
			}
			select {
			case rc.msgs <- m:
			default: // test reader fell behind; the test will notice a gap
			}
		}
	}()
	t.Cleanup(func() { c.Close() })
	return rc
}

// reach sends probe packets from a to b until one arrives (the mesh needs
// a moment to learn b's key). Other messages b receives meanwhile are kept
// for later reads; stray probes are discarded by nextData.
func reach(t *testing.T, a, b *regionClient, within time.Duration) {
	t.Helper()
	probe := []byte("reach-probe")
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	var kept []derp.ReceivedMessage
	defer func() { b.pending = append(kept, b.pending...) }()
	for {
		if err := a.c.Send(b.pub, probe); err != nil {
			t.Fatalf("send: %v", err)
		}
		tick := time.NewTimer(10 * time.Millisecond)
		for {
			m, err := b.recv(tick.C)
			if err == errTimeout {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if rp, ok := m.(derp.ReceivedPacket); ok && bytes.Equal(rp.Data, probe) {
				if rp.Source == a.pub {
					tick.Stop()
					return
				}
				continue
			}
			kept = append(kept, m)
		}
		select {
		case <-deadline.C:
			t.Fatalf("%s could not reach %s within %v", a.pub.ShortString(), b.pub.ShortString(), within)
		default:
		}
	}
}

// exchange sends n numbered packets of varying size from a to b in windows
// of 16 (below the relay's per-client queue of 32, so nothing is dropped
// for lack of room) and checks each arrives once, byte-exact and in order.
func exchange(t *testing.T, a, b *regionClient, n int) {
	t.Helper()
	const window = 16
	for i := range n {
		if err := a.c.Send(b.pub, regionPayload(i)); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		if i%window == window-1 {
			expectPackets(t, b, a.pub, i-window+1, i+1)
		}
	}
	if n%window != 0 {
		expectPackets(t, b, a.pub, n-n%window, n)
	}
}

func regionPayload(i int) []byte {
	size := 1 + (i*997)%1400
	p := make([]byte, size)
	for j := range p {
		p[j] = byte(i + j)
	}
	if size >= 4 {
		binary.BigEndian.PutUint32(p, uint32(i))
	}
	return p
}

func expectPackets(t *testing.T, b *regionClient, src key.NodePublic, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		m, err := nextData(b, 5*time.Second)
		if err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if m.Source != src || !bytes.Equal(m.Data, regionPayload(i)) {
			t.Fatalf("packet %d: got %d bytes from %s, want %d bytes from %s (duplicate, loss or corruption)", i, len(m.Data), m.Source.ShortString(), len(regionPayload(i)), src.ShortString())
		}
	}
}

// nextData returns the next data packet that is not a reach probe.
func nextData(b *regionClient, d time.Duration) (derp.ReceivedPacket, error) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		m, err := b.recv(timer.C)
		if err != nil {
			return derp.ReceivedPacket{}, fmt.Errorf("no packet within %v: %w", d, err)
		}
		if rp, ok := m.(derp.ReceivedPacket); ok && !bytes.Equal(rp.Data, []byte("reach-probe")) {
			return rp, nil
		}
	}
}

// noMoreData checks that nothing else (a duplicate) arrives for a while.
func noMoreData(t *testing.T, b *regionClient, d time.Duration) {
	t.Helper()
	if m, err := nextData(b, d); err == nil {
		t.Fatalf("unexpected extra packet (%d bytes from %s)", len(m.Data), m.Source.ShortString())
	}
}

func fullMesh(nodes ...*regionNode) {
	for _, n := range nodes {
		var others []*regionNode
		for _, o := range nodes {
			others = append(others, o) // including self, as derper's -mesh-with does
		}
		n.meshWith(others...)
	}
}

func TestMeshThreeNodes(t *testing.T) {
	for _, kind := range []nodeKind{nodeXderp, nodeXmeshOnDerper} {
		t.Run(kind.String(), func(t *testing.T) { testThreeNodes(t, kind) })
	}
}

func testThreeNodes(t *testing.T, kind nodeKind) {
	a, b, c := newRegionNode(t, "a", kind), newRegionNode(t, "b", kind), newRegionNode(t, "c", kind)
	fullMesh(a, b, c)
	ca := dialRegion(t, a, key.NewNode())
	cb := dialRegion(t, b, key.NewNode())
	cc := dialRegion(t, c, key.NewNode())
	pairs := [][2]*regionClient{{ca, cb}, {cb, ca}, {ca, cc}, {cc, ca}, {cb, cc}, {cc, cb}}
	for _, p := range pairs {
		reach(t, p[0], p[1], 10*time.Second)
	}
	for _, p := range pairs {
		exchange(t, p[0], p[1], 300)
	}
	noMoreData(t, ca, 200*time.Millisecond)
	noMoreData(t, cb, 10*time.Millisecond)
	noMoreData(t, cc, 10*time.Millisecond)
	// Self entries were dropped: every node has two peers.
	for _, n := range []*regionNode{a, b, c} {
		if got := n.mesh.PeerAddrs(); len(got) != 1 { // all on 127.0.0.1
			t.Errorf("%s: PeerAddrs %v", n.name, got)
		}
		self := 0
		for _, p := range n.mesh.Peers() {
			if p.Self {
				self++
			}
		}
		if self != 1 {
			t.Errorf("%s: %d self peers, want 1", n.name, self)
		}
	}

	// A client moves from a to b; a sender on c follows it within a second.
	moverKey := key.NewNode()
	mover := dialRegion(t, a, moverKey)
	reach(t, cc, mover, 10*time.Second)
	mover.c.Close()
	start := time.Now()
	moved := dialRegion(t, b, moverKey)
	reach(t, cc, moved, time.Second)
	t.Logf("traffic followed the moved client after %v", time.Since(start))
	exchange(t, cc, moved, 100)
}

// TestMeshMixedRegion meshes an xderp node with a derper node (Tailscale's
// relay core and mesh client) using the same key.
func TestMeshMixedRegion(t *testing.T) {
	x := newRegionNode(t, "xderp", nodeXderp)
	d := newRegionNode(t, "derper", nodeDerper)
	x.meshWith(d)
	d.meshWith(x)
	cx := dialRegion(t, x, key.NewNode())
	cd := dialRegion(t, d, key.NewNode())
	reach(t, cx, cd, 15*time.Second)
	reach(t, cd, cx, 15*time.Second)
	exchange(t, cx, cd, 300)
	exchange(t, cd, cx, 300)
	noMoreData(t, cx, 100*time.Millisecond)
	noMoreData(t, cd, 10*time.Millisecond)
}

// TestMeshNodeFailure kills node c while clients on a and b talk, checks
// that a's and b's clients get PeerGone for c's client and that their
// traffic never stops, then restarts c and checks the mesh heals. The
// mixed cases put a derper node in the region, as the dying node and as a
// survivor.
func TestMeshNodeFailure(t *testing.T) {
	for _, tc := range []struct {
		name  string
		kinds [3]nodeKind
	}{
		{"xderp", [3]nodeKind{nodeXderp, nodeXderp, nodeXderp}},
		{"derper-dies", [3]nodeKind{nodeXderp, nodeXderp, nodeDerper}},
		{"derper-survives", [3]nodeKind{nodeDerper, nodeXderp, nodeXderp}},
	} {
		t.Run(tc.name, func(t *testing.T) { testNodeFailure(t, tc.kinds) })
	}
}

func testNodeFailure(t *testing.T, kinds [3]nodeKind) {
	a, b, c := newRegionNode(t, "a", kinds[0]), newRegionNode(t, "b", kinds[1]), newRegionNode(t, "c", kinds[2])
	fullMesh(a, b, c)
	ca := dialRegion(t, a, key.NewNode())
	cb := dialRegion(t, b, key.NewNode())
	cc := dialRegion(t, c, key.NewNode())
	reach(t, ca, cc, 10*time.Second)
	reach(t, cb, cc, 10*time.Second)
	reach(t, cc, ca, 10*time.Second)
	reach(t, cc, cb, 10*time.Second)

	// Survivors a and b keep talking while c dies and comes back.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sent, lost int
	var sentN atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 100000; i++ { // bounded; stopped long before
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			if err := ca.c.Send(cb.pub, regionPayload(i)); err != nil {
				lost++
				continue
			}
			sent++
			sentN.Add(1)
		}
	}()

	c.kill()
	// Clients on a and b received from cc, so they must learn it left.
	for _, rc := range []*regionClient{ca, cb} {
		waitGone(t, rc, cc.pub, 10*time.Second)
	}
	c.restart()
	cc2 := dialRegion(t, c, key.NewNode())
	reach(t, ca, cc2, 15*time.Second)
	reach(t, cc2, cb, 15*time.Second)
	// Keep the survivors' flow going a little past the heal.
	for deadline := time.Now().Add(10 * time.Second); sentN.Load() < 300 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond) // polling a counter, not synchronising
	}
	close(stop)
	wg.Wait()
	if lost != 0 {
		t.Errorf("%d sends between survivors failed", lost)
	}
	// Every packet between survivors arrived, in order, once.
	got := 0
	for got < sent {
		m, err := nextData(cb, 5*time.Second)
		if err != nil {
			t.Fatalf("survivor traffic: %d of %d packets: %v", got, sent, err)
		}
		if m.Source == cc2.pub { // probe from the restarted node
			continue
		}
		if m.Source != ca.pub || !bytes.Equal(m.Data, regionPayload(got)) {
			t.Fatalf("survivor packet %d wrong (%d bytes from %s)", got, len(m.Data), m.Source.ShortString())
		}
		got++
	}
}

func waitGone(t *testing.T, rc *regionClient, k key.NodePublic, d time.Duration) {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	var kept []derp.ReceivedMessage
	defer func() { rc.pending = append(kept, rc.pending...) }()
	for {
		m, err := rc.recv(timer.C)
		if err != nil {
			t.Fatalf("client %s got no PeerGone for %s: %v", rc.pub.ShortString(), k.ShortString(), err)
		}
		if pg, ok := m.(derp.PeerGoneMessage); ok && pg.Peer == k {
			return
		}
		kept = append(kept, m)
	}
}

func TestMeshWrongKey(t *testing.T) {
	// a is configured with another key than b (both its server and its
	// mesh client).
	a := newRegionNodeKey(t, "a", nodeXderp, "0000000000000000000000000000000000000000000000000000000000000001")
	b := newRegionNode(t, "b", nodeXderp)
	a.meshWith(b)
	b.meshWith(a)
	ca := dialRegion(t, a, key.NewNode())
	cb := dialRegion(t, b, key.NewNode())
	// b (right key) learns a's keys... but a's server has a different key,
	// so b's mesh client is an ordinary client at a and gets no watch
	// stream; a's mesh client is ordinary at b. Nobody learns anything.
	ctl := dialRegion(t, b, key.NewNode())
	reach(t, cb, ctl, 5*time.Second) // b works locally
	for range 50 {
		ca.c.Send(cb.pub, []byte("must not arrive"))
		cb.c.Send(ca.pub, []byte("must not arrive"))
	}
	// Give any (wrong) forwarding the time a correct mesh needs: a local
	// round trip through b after the sends proves b processed them.
	reach(t, ctl, cb, 5*time.Second)
	noMoreData(t, ca, 300*time.Millisecond)
	noMoreData(t, cb, 10*time.Millisecond)
	if v := a.metric(t, `xderp_mesh_remote_keys`); v != "0" {
		t.Errorf("a: learned %s remote keys with a wrong mesh key", v)
	}
}

func (n *regionNode) metric(t *testing.T, name string) string {
	t.Helper()
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
