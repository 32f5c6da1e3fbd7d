package derpserver

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/xderp/xderp/userspace/derp"
)

var testMeshKey = strings.Repeat("3c", 32)

func meshInfo(t testing.TB) *derp.ClientInfo {
	k, err := derp.ParseMeshKey(testMeshKey)
	if err != nil {
		t.Fatal(err)
	}
	return &derp.ClientInfo{MeshKey: k, Version: 2}
}

// fakeForwarder records forwarded packets.
type fakeForwarder struct {
	name string
	mu   sync.Mutex
	got  []fwdCall
	err  error
}

type fwdCall struct {
	src, dst derp.PublicKey
	pkt      []byte
}

func (f *fakeForwarder) ForwardPacket(src, dst derp.PublicKey, payload []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.got = append(f.got, fwdCall{src, dst, bytes.Clone(payload)})
	return f.err
}

func (f *fakeForwarder) String() string { return f.name }

func (f *fakeForwarder) calls() []fwdCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fwdCall(nil), f.got...)
}

func TestWatchConns(t *testing.T) {
	ts := newTestServer(t, Options{MeshKey: testMeshKey})
	a := newClient(t, ts.addr, clientOpts{})
	w := newClient(t, ts.addr, clientOpts{info: meshInfo(t)})
	w.write(derp.AppendWatchConns(nil))
	// Initial flood: a and the watcher itself.
	present := map[derp.PublicKey]derp.PeerPresent{}
	for _, f := range w.barrier() {
		if f.typ != derp.FramePeerPresent || len(f.p) != derp.PeerPresentLen {
			t.Fatalf("flood frame %v len %d", f.typ, len(f.p))
		}
		pp, _ := derp.ParsePeerPresent(f.p)
		present[pp.Key] = pp
	}
	if len(present) != 2 {
		t.Fatalf("flood has %d keys, want 2", len(present))
	}
	if pp := present[a.pub]; pp.Flags != derp.PeerPresentIsRegular || !pp.Addr.Addr().IsLoopback() || pp.Addr.Port() == 0 {
		t.Fatalf("a's PeerPresent %+v", pp)
	}
	if present[w.pub].Flags != derp.PeerPresentIsMeshPeer {
		t.Fatalf("watcher flags %v", present[w.pub].Flags)
	}
	ts.waitMetric("derp_watchers", func(v float64) bool { return v == 1 })

	// A new connection, a prober with an Ideal-Node header.
	b := newClient(t, ts.addr, clientOpts{info: &derp.ClientInfo{IsProber: true}, extraHdr: "Ideal-Node: 900a\r\n"})
	pp, _ := derp.ParsePeerPresent(w.mustNext(derp.FramePeerPresent))
	if pp.Key != b.pub || pp.Flags != derp.PeerPresentIsProber|derp.PeerPresentNotIdeal {
		t.Fatalf("delta %+v", pp)
	}
	// A duplicate connection is announced again; PeerGone only for the last.
	b2 := newClient(t, ts.addr, clientOpts{priv: b.priv})
	if pp, _ := derp.ParsePeerPresent(w.mustNext(derp.FramePeerPresent)); pp.Key != b.pub {
		t.Fatal("dup not announced")
	}
	b.close()
	if got := w.barrier(); len(got) != 0 {
		t.Fatalf("PeerGone before the last connection left: %v", got)
	}
	b2.close()
	k, r, _ := derp.ParsePeerGone(w.mustNext(derp.FramePeerGone))
	if k != b.pub || r != derp.PeerGoneDisconnected {
		t.Fatal("PeerGone to watcher")
	}
	// derper's mesh update histograms: the five presence frames the
	// watcher got (two in the flood, b, b2, b gone) in some batches, and
	// every such batch counted in one drain or another.
	ts.waitMetric("derp_mesh_update_batch_size_sum", func(v float64) bool { return v == 5 })
	batches := ts.metric("derp_mesh_update_batch_size_count")
	ts.waitMetric("derp_mesh_update_loop_count_sum", func(v float64) bool { return v == batches })
	if batches < 1 || batches > 5 {
		t.Errorf("%v batches for 5 presence frames", batches)
	}
}

func TestWrongMeshKeyIsRegularClient(t *testing.T) {
	ts := newTestServer(t, Options{MeshKey: testMeshKey})
	info := meshInfo(t)
	info.MeshKey[0] ^= 1
	c := newClient(t, ts.addr, clientOpts{info: info})
	c.write(derp.AppendWatchConns(nil))
	c.expectClosed()
	ts.waitMetric("xderp_privileged_frames_rejected_total", func(v float64) bool { return v == 1 })
	// Without a configured mesh key nobody is a mesh peer.
	ts2 := newTestServer(t, Options{})
	c2 := newClient(t, ts2.addr, clientOpts{info: meshInfo(t)})
	c2.write(derp.AppendWatchConns(nil))
	c2.expectClosed()
}

func TestForwardPacketAndClosePeer(t *testing.T) {
	ts := newTestServer(t, Options{MeshKey: testMeshKey})
	mesh := newClient(t, ts.addr, clientOpts{info: meshInfo(t)})
	local := newClient(t, ts.addr, clientOpts{})
	remote := derp.PublicKey{0xaa}
	mesh.write(derp.AppendForwardPacket(nil, remote, local.pub, []byte("via mesh")))
	src, pkt := local.recvPacket()
	if src != remote || string(pkt) != "via mesh" {
		t.Fatalf("forwarded packet %v %q", src, pkt)
	}
	// Unknown destination: dropped, disco gets NotHere back to the peer.
	mesh.write(derp.AppendForwardPacket(nil, remote, derp.PublicKey{0xbb}, discoPacket(70)))
	got := mesh.barrier()
	if len(got) != 1 || got[0].typ != derp.FramePeerGone {
		t.Fatalf("reply to forward to unknown: %v", got)
	}
	ts.waitMetric(`derp_packets_dropped{reason="unknown_dest_on_fwd",kind="disco"}`, func(v float64) bool { return v == 1 })
	ts.waitMetric("derp_packets_forwarded_in", func(v float64) bool { return v == 2 })

	// A forwarded-in packet is never forwarded again.
	fwd := &fakeForwarder{name: "peer"}
	far := derp.PublicKey{0xcc}
	ts.s.AddPacketForwarder(far, fwd)
	mesh.write(derp.AppendForwardPacket(nil, remote, far, []byte("loop?")))
	mesh.barrier()
	if n := len(fwd.calls()); n != 0 {
		t.Fatalf("re-forwarded %d packets", n)
	}

	// ClosePeer closes every connection of the key.
	dup := newClient(t, ts.addr, clientOpts{priv: local.priv})
	mesh.write(derp.AppendClosePeer(nil, local.pub))
	local.expectClosed()
	dup.expectClosed()
	ts.waitMetric(`xderp_connections_closed_total{reason="close_peer"}`, func(v float64) bool { return v == 2 })
}

func TestPacketForwarders(t *testing.T) {
	ts := newTestServer(t, Options{})
	a := newClient(t, ts.addr, clientOpts{})
	k := derp.PublicKey{0x42}
	f1 := &fakeForwarder{name: "f1"}
	f2 := &fakeForwarder{name: "f2", err: errors.New("broken")}
	ts.s.AddPacketForwarder(k, f1)
	ts.s.AddPacketForwarder(k, f1) // duplicate registration is ignored
	ts.s.AddPacketForwarder(k, f2)
	ts.waitMetric("derp_clients_remote", func(v float64) bool { return v == 1 })
	ts.waitMetric("derp_multiforwarder_created", func(v float64) bool { return v == 1 })
	a.send(k, []byte("one"))
	a.barrier()
	if c := f1.calls(); len(c) != 1 || c[0].src != a.pub || c[0].dst != k || string(c[0].pkt) != "one" {
		t.Fatalf("f1 calls %+v", c)
	}
	if len(f2.calls()) != 0 {
		t.Fatal("later forwarder used while the earliest is registered")
	}
	ts.s.RemovePacketForwarder(k, f1)
	a.send(k, []byte("two"))
	a.barrier()
	if c := f2.calls(); len(c) != 1 || string(c[0].pkt) != "two" {
		t.Fatalf("f2 calls %+v", c)
	}
	ts.waitMetric("xderp_packets_forward_errors_total", func(v float64) bool { return v == 1 })
	ts.waitMetric("derp_packets_forwarded_out", func(v float64) bool { return v == 2 })

	// A local connection wins over the forwarder.
	kp, _ := derp.NewPrivateKey()
	ts.s.AddPacketForwarder(kp.Public(), f1)
	lc := newClient(t, ts.addr, clientOpts{priv: kp})
	a.send(kp.Public(), []byte("local"))
	if _, p := lc.recvPacket(); string(p) != "local" {
		t.Fatal("local delivery")
	}
	if len(f1.calls()) != 1 {
		t.Fatal("forwarded although a local connection exists")
	}
	// When the local connection leaves, the key is still reachable: no
	// PeerGone to a (which never received from it anyway) and packets go
	// to the forwarder again.
	lc.close()
	ts.waitMetric("derp_clients_local", func(v float64) bool { return v == 1 })
	a.send(kp.Public(), []byte("remote again"))
	a.barrier()
	if c := f1.calls(); len(c) != 2 || string(c[1].pkt) != "remote again" {
		t.Fatalf("f1 calls after local left %+v", c)
	}

	// Removing a forwarder that is not registered is counted, not fatal.
	ts.s.RemovePacketForwarder(k, f1)
	ts.waitMetric("derp_packet_forwarder_delete_other_value", func(v float64) bool { return v == 1 })
	ts.s.RemovePacketForwarder(k, f2)
	a.send(k, []byte("three"))
	a.barrier()
	ts.waitMetric(`derp_packets_dropped{reason="unknown_dest",kind="other"}`, func(v float64) bool { return v == 1 })
}

func TestPeerGoneWhenRemoteKeyLeavesRegion(t *testing.T) {
	ts := newTestServer(t, Options{MeshKey: testMeshKey})
	mesh := newClient(t, ts.addr, clientOpts{info: meshInfo(t)})
	b := newClient(t, ts.addr, clientOpts{})
	remote := derp.PublicKey{0xdd}
	fwd := &fakeForwarder{name: "mesh"}
	ts.s.AddPacketForwarder(remote, fwd)
	mesh.write(derp.AppendForwardPacket(nil, remote, b.pub, []byte("from afar")))
	b.recvPacket()
	ts.s.RemovePacketForwarder(remote, fwd)
	k, r, _ := derp.ParsePeerGone(b.mustNext(derp.FramePeerGone))
	if k != remote || r != derp.PeerGoneDisconnected {
		t.Fatal("PeerGone for remote key")
	}
}
