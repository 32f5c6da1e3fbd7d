package mesh

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/metrics"
)

const testMeshKey = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

func TestParseTarget(t *testing.T) {
	tests := []struct {
		in                                   string
		tls                                  bool
		host, hostPort, dialHost, port, path string
	}{
		{"derp1.example.com", true, "derp1.example.com", "derp1.example.com", "derp1.example.com", "443", "/derp"},
		{"derp1.example.com/10.0.0.1", true, "derp1.example.com", "derp1.example.com", "10.0.0.1", "443", "/derp"},
		{"derp1.example.com:8443/10.0.0.1", true, "derp1.example.com", "derp1.example.com:8443", "10.0.0.1", "8443", "/derp"},
		{"http://127.0.0.1:3340/derp", false, "127.0.0.1", "127.0.0.1:3340", "127.0.0.1", "3340", "/derp"},
		{"http://127.0.0.1:3340", false, "127.0.0.1", "127.0.0.1:3340", "127.0.0.1", "3340", "/derp"},
		{"https://derp.example.com/derp", true, "derp.example.com", "derp.example.com", "derp.example.com", "443", "/derp"},
		{"http://[::1]:3340/derp", false, "::1", "[::1]:3340", "::1", "3340", "/derp"},
		{"http://nodes.example.com", false, "nodes.example.com", "nodes.example.com", "nodes.example.com", "80", "/derp"},
	}
	for _, tc := range tests {
		got, err := parseTarget(tc.in)
		if err != nil {
			t.Errorf("parseTarget(%q): %v", tc.in, err)
			continue
		}
		if got.tls != tc.tls || got.host != tc.host || got.hostPort != tc.hostPort || got.dialHost != tc.dialHost || got.port != tc.port || got.path != tc.path {
			t.Errorf("parseTarget(%q) = %+v", tc.in, *got)
		}
	}
	for _, bad := range []string{"", "a/b/c", "/x", "a/", "ftp://x/derp", "http:///derp", "http://u@h/derp", "http://h/derp?x=1", "a:443/b:444", "a b"} {
		if _, err := parseTarget(bad); err == nil {
			t.Errorf("parseTarget(%q) succeeded, want error", bad)
		}
	}
	if a, ok := (&target{dialHost: "::1"}).literal(); !ok || a != netip.MustParseAddr("::1") {
		t.Errorf("literal(::1) = %v %v", a, ok)
	}
}

func TestNewValidation(t *testing.T) {
	priv := mustKey(t)
	ok := Options{Server: newFakeRelay(), PrivateKey: priv, MeshKey: testMeshKey, Peers: []string{"a.example"}}
	if _, err := New(ok); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		field string
		mod   func(*Options)
	}{
		{"Server", func(o *Options) { o.Server = nil }},
		{"PrivateKey", func(o *Options) { o.PrivateKey = derp.PrivateKey{} }},
		{"MeshKey", func(o *Options) { o.MeshKey = "abc" }},
		{"MeshKey", func(o *Options) { o.MeshKey = strings.Repeat("0", 64) }},
		{"Peers[1]", func(o *Options) { o.Peers = []string{"a", "x/y/z"} }},
		{"ReconnectMax", func(o *Options) { o.ReconnectMin, o.ReconnectMax = time.Second, time.Millisecond }},
	}
	for _, tc := range tests {
		o := ok
		tc.mod(&o)
		_, err := New(o)
		if err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%s: err = %v, want one naming the field", tc.field, err)
		}
	}
}

type testMesh struct {
	*Mesh
	relay *fakeRelay
	reg   *metrics.Registry
	priv  derp.PrivateKey
}

func startMesh(t *testing.T, priv derp.PrivateKey, peers []string, mod func(*Options)) *testMesh {
	t.Helper()
	relay := newFakeRelay()
	reg := metrics.NewRegistry()
	o := Options{
		Server: relay, PrivateKey: priv, MeshKey: testMeshKey, Peers: peers, Metrics: reg,
		ReconnectMin: 10 * time.Millisecond, ReconnectMax: 200 * time.Millisecond,
	}
	if mod != nil {
		mod(&o)
	}
	m, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	m.Start(context.Background())
	t.Cleanup(func() { m.Close() })
	return &testMesh{Mesh: m, relay: relay, reg: reg, priv: priv}
}

func (tm *testMesh) metric(t *testing.T, line string) bool {
	t.Helper()
	var b bytes.Buffer
	if err := tm.reg.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	return strings.Contains(b.String(), "\n"+line+"\n")
}

func TestWatchAndForward(t *testing.T) {
	node := newFakeNode(t, mustKey(t), "")
	k1, k2 := mustKey(t).Public(), mustKey(t).Public()
	node.setKeys(k1, k2)
	tm := startMesh(t, mustKey(t), []string{node.url()}, nil)

	c := node.next(t)
	if c.client != tm.priv.Public() {
		t.Errorf("mesh client key %s, want the server's own key %s", c.client, tm.priv.Public())
	}
	if c.info.MeshKey.String() != testMeshKey {
		t.Errorf("ClientInfo mesh key %q, want the configured key", c.info.MeshKey)
	}
	waitFor(t, tm.relay, "both keys registered", func() bool { return tm.relay.size() == 2 })
	fw := tm.relay.get(k1)
	if len(fw) != 1 {
		t.Fatalf("forwarders for k1: %v", fw)
	}
	if !tm.metric(t, "xderp_mesh_peers_connected 1") {
		t.Error("peers_connected is not 1")
	}

	src := mustKey(t).Public()
	pkts := [][]byte{[]byte("hello"), bytes.Repeat([]byte{0xab}, 1200), {}, bytes.Repeat([]byte{7}, derp.MaxPacketSize)}
	for _, p := range pkts {
		if err := fw[0].ForwardPacket(src, k1, p); err != nil {
			t.Fatal(err)
		}
	}
	for i, want := range pkts {
		select {
		case got := <-c.fwd:
			if got.src != src || got.dst != k1 || !bytes.Equal(got.pkt, want) {
				t.Fatalf("frame %d: src %s dst %s %d bytes, want %s %s %d bytes", i, got.src.ShortString(), got.dst.ShortString(), len(got.pkt), src.ShortString(), k1.ShortString(), len(want))
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("frame %d not forwarded", i)
		}
	}
	waitFor(t, nil, "forwarded counters", func() bool {
		return tm.metric(t, `xderp_mesh_forwarded_packets_total{direction="out"} 4`) &&
			tm.metric(t, `xderp_mesh_forwarded_bytes_total{direction="out"} 66741`)
	})

	// PeerGone removes exactly that key; a duplicate PeerPresent for a
	// known key registers nothing twice.
	c.write(derp.AppendPeerGone(nil, k1, derp.PeerGoneDisconnected))
	c.write(derp.AppendPeerPresent(nil, derp.PeerPresent{Key: k2}))
	waitFor(t, tm.relay, "k1 removed", func() bool { return len(tm.relay.get(k1)) == 0 })
	if got := tm.relay.get(k2); len(got) != 1 {
		t.Errorf("k2 forwarders %d, want 1", len(got))
	}
	// NotHere (reply to a forwarded packet for a departed key) also removes.
	c.write(derp.AppendPeerGone(nil, k2, derp.PeerGoneNotHere))
	waitFor(t, tm.relay, "k2 removed", func() bool { return tm.relay.size() == 0 })
	if !tm.metric(t, `xderp_mesh_watch_updates_total{kind="not_here"} 1`) {
		t.Error("not_here update not counted")
	}

	// The own key is never registered (it is our own connection there).
	c.write(derp.AppendPeerPresent(nil, derp.PeerPresent{Key: tm.priv.Public()}))
	// Ping is answered with the same bytes.
	c.write(derp.AppendPing(nil, [8]byte{1, 2, 3, 4, 5, 6, 7, 8}))
	select {
	case d := <-c.pongs:
		if d != [8]byte{1, 2, 3, 4, 5, 6, 7, 8} {
			t.Errorf("pong %x", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no pong")
	}
	if tm.relay.size() != 0 {
		t.Error("own server key was registered as a remote key")
	}
}

func TestBrokenConnectionClearsKeysAndReconnects(t *testing.T) {
	node := newFakeNode(t, mustKey(t), "")
	k1, k2 := mustKey(t).Public(), mustKey(t).Public()
	node.setKeys(k1, k2)
	tm := startMesh(t, mustKey(t), []string{node.url()}, nil)
	node.next(t)
	waitFor(t, tm.relay, "keys registered", func() bool { return tm.relay.size() == 2 })
	fw := tm.relay.get(k1)[0]

	node.setKeys(k2) // k1 leaves while the link is down
	node.dropAll()
	waitFor(t, tm.relay, "keys cleared", func() bool { return tm.relay.size() == 0 || len(tm.relay.get(k1)) == 0 })

	c := node.next(t)
	waitFor(t, tm.relay, "re-learned", func() bool { return len(tm.relay.get(k2)) == 1 })
	if len(tm.relay.get(k1)) != 0 {
		t.Error("k1 still registered after the node forgot it")
	}
	if !tm.metric(t, `xderp_mesh_watch_updates_total{kind="conn_broke"} 2`) {
		t.Error("conn_broke removals not counted")
	}
	// The forwarder identity is stable across reconnects.
	if tm.relay.get(k2)[0] != fw {
		t.Error("forwarder changed across reconnect")
	}
	src := mustKey(t).Public()
	if err := fw.ForwardPacket(src, k2, []byte("after")); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-c.fwd:
		if string(got.pkt) != "after" {
			t.Errorf("got %q", got.pkt)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no packet after reconnect")
	}
}

func TestPeerDownDrops(t *testing.T) {
	// A listener that is closed: nothing answers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	tm := startMesh(t, mustKey(t), []string{"http://" + addr + "/derp"}, nil)
	waitFor(t, nil, "dial errors", func() bool { return !tm.metric(t, `xderp_mesh_dials_total{result="error"} 0`) })
	p := tm.peerList()[0]
	if err := p.ForwardPacket(derp.PublicKey{1}, derp.PublicKey{2}, []byte("x")); !errors.Is(err, ErrPeerDown) {
		t.Fatalf("err = %v, want ErrPeerDown", err)
	}
	if !tm.metric(t, `xderp_mesh_forward_drops_total{reason="peer_down"} 1`) {
		t.Error("peer_down drop not counted")
	}
	if got := tm.PeerAddrs(); len(got) != 1 || got[0] != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("PeerAddrs = %v", got)
	}
}

func (m *Mesh) peerList() []*peer {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*peer
	for _, p := range m.peers {
		out = append(out, p)
	}
	return out
}

func TestSelfConnectionDropped(t *testing.T) {
	priv := mustKey(t)
	self := newFakeNode(t, priv, "")
	other := newFakeNode(t, mustKey(t), "")
	k := mustKey(t).Public()
	other.setKeys(k)
	self.setKeys(mustKey(t).Public())
	tm := startMesh(t, priv, []string{self.url(), other.url()}, nil)
	waitFor(t, tm.relay, "other peer's key", func() bool { return tm.relay.size() == 1 && len(tm.relay.get(k)) == 1 })
	waitFor(t, nil, "self detected", func() bool { return tm.metric(t, `xderp_mesh_dials_total{result="self"} 1`) })
	// Nothing privileged was ever sent to ourselves: the handshake stopped
	// at ServerKey, so no connection got as far as ClientInfo.
	select {
	case c := <-self.conns:
		t.Fatalf("self-connection completed a handshake (client %s)", c.client.ShortString())
	default:
	}
	got := tm.PeerAddrs()
	if len(got) != 1 {
		t.Errorf("PeerAddrs = %v, want only the other node", got)
	}
	st := tm.Peers()
	selfSeen := 0
	for _, s := range st {
		if s.Self {
			selfSeen++
		}
	}
	if selfSeen != 1 || len(st) != 2 {
		t.Errorf("Peers() = %+v", st)
	}
}

func TestStuckPeerDoesNotBlockSenders(t *testing.T) {
	node := newFakeNode(t, mustKey(t), "")
	node.noRead = true
	k := mustKey(t).Public()
	tm := startMesh(t, mustKey(t), []string{node.url()}, func(o *Options) {
		o.QueueLen = 64
		o.WriteTimeout = 300 * time.Millisecond
	})
	node.next(t)
	// The node never reads, so it never sees WatchConns and announces
	// nothing: use the peer directly as the relay would.
	var p *peer
	waitFor(t, nil, "connected", func() bool {
		l := tm.peerList()
		if len(l) == 1 && l[0].up.Load() {
			p = l[0]
			return true
		}
		return false
	})
	pkt := bytes.Repeat([]byte{1}, 1200)
	// Keep sending (bounded) until the kernel buffers are full and the
	// writer's deadline fires; every call must return without waiting.
	const maxCalls = 5_000_000
	var stop atomic.Bool
	done := make(chan [3]int)
	go func() {
		var ok, full, down int
		for i := 0; i < maxCalls && !stop.Load(); i++ {
			switch err := p.ForwardPacket(derp.PublicKey{1}, k, pkt); {
			case err == nil:
				ok++
			case errors.Is(err, ErrQueueFull):
				full++
			case errors.Is(err, ErrPeerDown):
				down++
			}
		}
		done <- [3]int{ok, full, down}
	}()
	// The writer gives up on the stuck peer after WriteTimeout, counts the
	// batch as write_error and reconnects.
	waitFor(t, nil, "write timeout", func() bool {
		return !tm.metric(t, `xderp_mesh_forward_drops_total{reason="write_error"} 0`)
	})
	stop.Store(true)
	var res [3]int
	select {
	case res = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("ForwardPacket blocked on a stuck peer")
	}
	if res[1] == 0 || res[0] == 0 {
		t.Fatalf("sent %d, queue_full %d, peer_down %d: want both queued and dropped packets", res[0], res[1], res[2])
	}
	t.Logf("sent %d, queue_full %d, peer_down %d", res[0], res[1], res[2])
	node.next(t)
}

func TestMultiAddressName(t *testing.T) {
	// Two nodes on the same port of two loopback addresses, found through
	// one name.
	var a, b *fakeNode
	for try := 0; ; try++ {
		a = newFakeNode(t, mustKey(t), "127.0.0.1:0")
		_, port, _ := net.SplitHostPort(a.ln.Addr().String())
		ln, err := net.Listen("tcp", "127.0.0.2:"+port)
		if err == nil {
			ln.Close()
			b = newFakeNode(t, mustKey(t), "127.0.0.2:"+port)
			break
		}
		if try > 10 {
			t.Skip("cannot bind 127.0.0.2 on a shared port:", err)
		}
	}
	_, port, _ := net.SplitHostPort(a.ln.Addr().String())
	ka, kb := mustKey(t).Public(), mustKey(t).Public()
	a.setKeys(ka)
	b.setKeys(kb)
	res := &fakeResolver{addrs: map[string][]netip.Addr{"region.test": {netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")}}}
	tm := startMesh(t, mustKey(t), []string{"http://region.test:" + port + "/derp"}, func(o *Options) {
		o.Resolver = res
		o.ResolveInterval = 20 * time.Millisecond
	})
	waitFor(t, tm.relay, "both nodes' keys", func() bool { return tm.relay.size() == 2 })
	if got := tm.PeerAddrs(); len(got) != 2 {
		t.Fatalf("PeerAddrs = %v", got)
	}
	c := a.next(t)
	if !strings.HasPrefix(c.info.MeshKey.String(), "0011") {
		t.Error("mesh key not sent")
	}
	// 127.0.0.2 leaves the name: its peer and its keys go away.
	res.set("region.test", netip.MustParseAddr("127.0.0.1"))
	waitFor(t, tm.relay, "b's key removed", func() bool { return tm.relay.size() == 1 && len(tm.relay.get(ka)) == 1 })
	if got := tm.PeerAddrs(); len(got) != 1 || got[0] != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("PeerAddrs = %v", got)
	}
	// A failing lookup keeps what we have.
	res.set("region.test")
	waitFor(t, nil, "resolve error counted", func() bool { return !tm.metric(t, "xderp_mesh_resolve_errors_total 0") })
	if tm.relay.size() != 1 {
		t.Error("a failed lookup removed peers")
	}
}

type fakeResolver struct {
	mu    sync.Mutex
	addrs map[string][]netip.Addr
}

func (r *fakeResolver) set(name string, a ...netip.Addr) {
	r.mu.Lock()
	r.addrs[name] = a
	r.mu.Unlock()
}

func (r *fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	a := r.addrs[host]
	if len(a) == 0 {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return append([]netip.Addr(nil), a...), nil
}

func TestCloseRemovesEverything(t *testing.T) {
	node := newFakeNode(t, mustKey(t), "")
	node.setKeys(mustKey(t).Public(), mustKey(t).Public(), mustKey(t).Public())
	tm := startMesh(t, mustKey(t), []string{node.url()}, nil)
	waitFor(t, tm.relay, "keys", func() bool { return tm.relay.size() == 3 })
	if err := tm.Close(); err != nil {
		t.Fatal(err)
	}
	if n := tm.relay.size(); n != 0 {
		t.Errorf("%d keys still registered after Close", n)
	}
	if !tm.metric(t, "xderp_mesh_peers_connected 0") {
		t.Error("peers_connected not 0 after Close")
	}
	tm.Close()
}

func TestInterleaver(t *testing.T) {
	k := func(b byte) derp.PublicKey { return derp.PublicKey{b} }
	frame := func(dst byte, seq byte) []byte {
		return derp.AppendForwardPacket(nil, derp.PublicKey{9}, k(dst), []byte{seq})
	}
	var in [][]byte
	// A burst for 1, then 2, then one for 3, then more for 1.
	for i := range 4 {
		in = append(in, frame(1, byte(i)))
	}
	for i := range 2 {
		in = append(in, frame(2, byte(i)))
	}
	in = append(in, frame(3, 0), frame(1, 4))
	var il interleaver
	for range 2 { // twice: reused state must not leak between batches
		out := il.order(append([][]byte(nil), in...))
		var got []string
		for _, f := range out {
			got = append(got, fmt.Sprintf("%d.%d", f[derp.FrameHeaderLen+derp.KeyLen], f[len(f)-1]))
		}
		want := "1.0 2.0 3.0 1.1 2.1 1.2 1.3 1.4"
		if s := strings.Join(got, " "); s != want {
			t.Fatalf("order %s, want %s", s, want)
		}
	}
	one := [][]byte{frame(1, 0), frame(1, 1), frame(1, 2)}
	if out := il.order(one); &out[0] != &one[0] {
		t.Error("a single-destination batch was copied")
	}
}

// TestTLSPeerWithDialHost meshes over TLS using derper's host/dialhost
// form: the certificate is checked for the host name while the connection
// goes to the loopback address.
func TestTLSPeerWithDialHost(t *testing.T) {
	node := newFakeNode(t, mustKey(t), "")
	k := mustKey(t).Public()
	node.setKeys(k)
	ts := httptest.NewUnstartedServer(http.HandlerFunc(node.serveHTTP))
	ts.Config.ErrorLog = log.New(io.Discard, "", 0) // the failing case below logs handshake errors
	ts.StartTLS()
	t.Cleanup(func() { node.dropAll(); ts.Close() })
	_, port, _ := net.SplitHostPort(ts.Listener.Addr().String())
	roots := ts.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs

	// Without the test CA the handshake fails and nothing is learned.
	bad := startMesh(t, mustKey(t), []string{"example.com:" + port + "/127.0.0.1"}, nil)
	waitFor(t, nil, "failed TLS dial", func() bool { return !bad.metric(t, `xderp_mesh_dials_total{result="error"} 0`) })
	if bad.relay.size() != 0 {
		t.Fatal("learned keys over an unverified TLS connection")
	}

	tm := startMesh(t, mustKey(t), []string{"example.com:" + port + "/127.0.0.1"}, func(o *Options) {
		o.TLSConfig = &tls.Config{RootCAs: roots}
	})
	waitFor(t, tm.relay, "key learned over TLS", func() bool { return len(tm.relay.get(k)) == 1 })
	if got := tm.PeerAddrs(); len(got) != 1 || got[0] != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("PeerAddrs = %v", got)
	}
	c := node.next(t)
	if err := tm.relay.get(k)[0].ForwardPacket(derp.PublicKey{7}, k, []byte("tls")); err != nil {
		t.Fatal(err)
	}
	select {
	case f := <-c.fwd:
		if string(f.pkt) != "tls" {
			t.Errorf("got %q", f.pkt)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing forwarded over TLS")
	}
}
