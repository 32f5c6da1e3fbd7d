//go:build ts_debug_websockets

package interop

import (
	"context"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/envknob"
)

// TestWebSocket: Tailscale's own client, built with its WebSocket transport
// (the one browsers and js/wasm clients use; `make interop` runs this file
// with -tags ts_debug_websockets), connects to xderpd over WebSocket with
// the "derp" subprotocol and exchanges packets of a range of sizes both
// ways, byte-exact and in order; the server counts the upgrades as
// WebSocket ones, and a peer leaving is reported with PeerGone.
func TestWebSocket(t *testing.T) {
	envknob.SetenvForTest(t, "TS_DEBUG_DERP_WS_CLIENT", "true")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	before, err := srv.Metric(ctx, "derp_websocket_accepts")
	if err != nil {
		t.Fatal(err)
	}
	a, b := newPeer(t, srv), newPeer(t, srv)
	syncPeers(t, a, b)
	if after, err := srv.Metric(ctx, "derp_websocket_accepts"); err != nil || after != before+2 {
		t.Fatalf("derp_websocket_accepts went from %v to %v (%v), want two WebSocket upgrades", before, after, err)
	}
	var sizes []int
	for n := 1; n <= derp.MaxPacketSize; n = n*2 + 1 {
		sizes = append(sizes, n, n+1)
	}
	sizes = append(sizes, derp.MaxPacketSize)
	deadline := time.Now().Add(time.Minute)
	if err := stream(a, b, sizes, 8, deadline); err != nil {
		t.Fatal(err)
	}
	if err := stream(b, a, sizes, 8, deadline); err != nil {
		t.Fatal(err)
	}
	a.c.Close()
	m, err := b.next(10*time.Second, skipControl)
	if err != nil {
		t.Fatal(err)
	}
	if pg, ok := m.(derp.PeerGoneMessage); !ok || pg.Peer != a.pub {
		t.Fatalf("after the peer left: %#v, want PeerGone for it", m)
	}
}
