package derpserver

import (
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// A mesh peer can deliver a packet before this node has learned its source
// from the peer's watch stream. The receiver must still get PeerGone when
// that key, learned afterwards, leaves the region (derper registers
// peer-gone interest by key, known or not).
func TestPeerGoneForSourceLearnedAfterDelivery(t *testing.T) {
	ts := newTestServer(t, Options{MeshKey: testMeshKey})
	mesh := newClient(t, ts.addr, clientOpts{info: meshInfo(t)})
	b := newClient(t, ts.addr, clientOpts{})
	remote := derp.PublicKey{0xde}
	mesh.write(derp.AppendForwardPacket(nil, remote, b.pub, []byte("early")))
	if src, _ := b.recvPacket(); src != remote {
		t.Fatalf("source %s", src.ShortString())
	}
	b.barrier() // the writer has noted the source by now
	fwd := &fakeForwarder{name: "mesh"}
	ts.s.AddPacketForwarder(remote, fwd) // the PeerPresent arrives late
	ts.s.RemovePacketForwarder(remote, fwd)
	k, r, _ := derp.ParsePeerGone(b.mustNext(derp.FramePeerGone))
	if k != remote || r != derp.PeerGoneDisconnected {
		t.Fatalf("PeerGone for %s reason %d", k.ShortString(), r)
	}

	// A receiver that leaves takes its pending interest with it.
	other := derp.PublicKey{0xdf}
	mesh.write(derp.AppendForwardPacket(nil, other, b.pub, []byte("early")))
	b.recvPacket()
	b.barrier()
	b.close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ts.s.mu.RLock()
		n := len(ts.s.pendingRecv)
		ts.s.mu.RUnlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pending receiver sets left after the receiver closed", n)
		}
		time.Sleep(10 * time.Millisecond) // polling server state with a deadline
	}
}
