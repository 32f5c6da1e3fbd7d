package interop

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
	"tailscale.com/derp"
	"tailscale.com/disco"
	"tailscale.com/types/key"
)

// TestHandshake: Tailscale's client connects over plain HTTP, learns the
// key the server was started with, and the first frame it returns is
// ServerInfo.
func TestHandshake(t *testing.T) {
	p := newPeer(t, srv)
	if got, want := p.c.ServerPublicKey(), srv.Key.Public(); got != want {
		t.Fatalf("server public key = %v, want %v (from the -c key file)", got, want)
	}
	m, err := p.next(5*time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := m.(derp.ServerInfoMessage); !ok {
		t.Fatalf("first message = %T, want derp.ServerInfoMessage", m)
	}
}

// payloadBase is random data that packet contents are cut from.
var payloadBase = func() []byte {
	b := make([]byte, derp.MaxPacketSize+512)
	rand.Read(b)
	return b
}()

// payload returns the content of the packet with sequence number seq and
// size n: distinct for neighbouring sequence numbers, cheap to recompute.
func payload(seq, n int) []byte {
	off := (seq * 131) % 509
	return payloadBase[off : off+n]
}

// stream sends len(sizes) packets from a to b (packet i has size sizes[i]),
// with at most window packets in flight, and checks that b receives them
// all, byte-exact, from a, and in order.
func stream(from, to *peer, sizes []int, window int, deadline time.Time) error {
	credits := make(chan struct{}, window)
	for range window {
		credits <- struct{}{}
	}
	sendErr := make(chan error, 1)
	stop := make(chan struct{})
	go func() {
		for i, n := range sizes {
			select {
			case <-credits:
			case <-stop:
				sendErr <- nil
				return
			}
			if err := from.c.Send(to.pub, payload(i, n)); err != nil {
				sendErr <- fmt.Errorf("send packet %d (%d bytes): %w", i, n, err)
				return
			}
		}
		sendErr <- nil
	}()
	defer func() {
		close(stop)
		<-sendErr
	}()
	for i, n := range sizes {
		rp, err := to.nextPacket(time.Until(deadline))
		if err != nil {
			return fmt.Errorf("packet %d of %d (size %d): %w", i, len(sizes), n, err)
		}
		if rp.Source != from.pub {
			return fmt.Errorf("packet %d: source %v, want %v", i, rp.Source.ShortString(), from.pub.ShortString())
		}
		if want := payload(i, n); !bytes.Equal(rp.Data, want) {
			return fmt.Errorf("packet %d: got %d bytes, want %d bytes (size %d); lost, reordered or corrupted", i, len(rp.Data), len(want), n)
		}
		credits <- struct{}{}
	}
	return nil
}

// TestEveryPacketSize sends one packet of every size from 1 byte to the
// 64 KiB maximum in each direction at once, and checks each arrives intact
// and in order. In -short mode it covers 1..2048, the sizes around every
// power of two, and the maximum.
func TestEveryPacketSize(t *testing.T) {
	var sizes []int
	if testing.Short() {
		seen := map[int]bool{}
		add := func(n int) {
			if n >= 1 && n <= derp.MaxPacketSize && !seen[n] {
				seen[n] = true
				sizes = append(sizes, n)
			}
		}
		for n := 1; n <= 2048; n++ {
			add(n)
		}
		for p := 2048; p <= derp.MaxPacketSize; p *= 2 {
			for d := -2; d <= 2; d++ {
				add(p + d)
			}
		}
		for n := 2049; n < derp.MaxPacketSize; n += 997 {
			add(n)
		}
	} else {
		for n := 1; n <= derp.MaxPacketSize; n++ {
			sizes = append(sizes, n)
		}
	}
	// The other direction sends the same sizes largest first.
	rev := make([]int, len(sizes))
	for i, n := range sizes {
		rev[len(sizes)-1-i] = n
	}
	a, b := newPeer(t, srv), newPeer(t, srv)
	syncPeers(t, a, b)
	deadline := time.Now().Add(3 * time.Minute)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, 2)
	wg.Add(2)
	go func() { defer wg.Done(); errs[0] = stream(a, b, sizes, 16, deadline) }()
	go func() { defer wg.Done(); errs[1] = stream(b, a, rev, 16, deadline) }()
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, n := range sizes {
		total += 2 * n
	}
	t.Logf("%d packets each way, %d MB total, in %v", len(sizes), total>>20, time.Since(start).Round(time.Millisecond))
}

// TestPeerGone: a client that sent to a peer is told when that peer's
// (only) connection goes away.
// TestQuietAfterBurst: a burst goes out through a writer goroutine, which
// arms a write deadline and exits once the connection has been quiet a
// while; a packet after that must still be delivered on the same
// connection (a deadline left armed would make the server fail the write
// and close the receiver's connection).
func TestQuietAfterBurst(t *testing.T) {
	if kind != target.Xderpd {
		t.Skip("waits on xderpd's writer metric; derper has no such writers")
	}
	s := startServer(t, target.Options{})
	a, b := newPeer(t, s), newPeer(t, s)
	syncPeers(t, a, b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for round := range 2 {
		sizes := make([]int, 300)
		for i := range sizes {
			sizes[i] = 1200
		}
		if err := stream(a, b, sizes, len(sizes), time.Now().Add(10*time.Second)); err != nil {
			t.Fatalf("round %d burst: %v", round, err)
		}
		waitMetricOf(t, ctx, s, "xderp_writers_active", func(v float64) bool { return v == 0 })
		want := []byte{'q', byte(round)}
		if err := a.c.Send(b.pub, want); err != nil {
			t.Fatal(err)
		}
		rp, err := b.nextPacket(5 * time.Second)
		if err != nil {
			t.Fatalf("round %d: packet after the writer exited: %v", round, err)
		}
		if rp.Source != a.pub || !bytes.Equal(rp.Data, want) {
			t.Fatalf("round %d: got %x from %v", round, rp.Data, rp.Source.ShortString())
		}
	}
	const writeErrors = `derp_packets_dropped{reason="write_error",kind="other"}`
	if v, err := s.Metric(ctx, writeErrors); err != nil || v != 0 {
		t.Fatalf("%s = %v (%v)", writeErrors, v, err)
	}
}

func TestPeerGone(t *testing.T) {
	a, b := newPeer(t, srv), newPeer(t, srv)
	syncPeers(t, a, b) // a and b have both sent to each other
	b.c.Close()
	m, err := a.next(10*time.Second, skipControl)
	if err != nil {
		t.Fatalf("waiting for PeerGone: %v", err)
	}
	pg, ok := m.(derp.PeerGoneMessage)
	if !ok {
		t.Fatalf("got %T %+v, want derp.PeerGoneMessage", m, m)
	}
	if pg.Peer != b.pub || pg.Reason != derp.PeerGoneReasonDisconnected {
		t.Fatalf("PeerGone = {%v, reason %d}, want {%v, disconnected(%d)}", pg.Peer.ShortString(), pg.Reason, b.pub.ShortString(), derp.PeerGoneReasonDisconnected)
	}
}

// TestPingPong: the client's own Ping helper gets its Pong, and a raw Ping
// comes back as a Pong carrying the same 8 bytes.
func TestPingPong(t *testing.T) {
	p := newPeer(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.c.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	for i := range 3 {
		var data [8]byte
		rand.Read(data[:])
		if err := p.c.SendPing(data); err != nil {
			t.Fatal(err)
		}
		m, err := p.next(5*time.Second, skipControl)
		if err != nil {
			t.Fatalf("ping %d: %v", i, err)
		}
		pong, ok := m.(derp.PongMessage)
		if !ok {
			t.Fatalf("ping %d: got %T, want derp.PongMessage", i, m)
		}
		if [8]byte(pong) != data {
			t.Fatalf("ping %d: pong %x, want %x", i, pong, data)
		}
	}
}

// TestDuplicateKey: two connections with the same key. Every packet sent
// to that key is delivered exactly once (to one of them), never twice.
func TestDuplicateKey(t *testing.T) {
	a := newPeer(t, srv)
	dupKey := key.NewNode()
	c1 := newPeerKey(t, srv, dupKey)
	c2 := newPeerKey(t, srv, dupKey)
	// Reach the duplicated key once (from a) so both are registered; the
	// duplicates themselves do not send (a cloned key that talks on both
	// connections is a different case: the server may then deliver to none).
	deadline := time.Now().Add(10 * time.Second)
	var got1, got2 [][]byte
	collect := func(d time.Duration) bool {
		select {
		case m, ok := <-c1.msgs:
			if ok {
				if rp, ok := m.(derp.ReceivedPacket); ok {
					got1 = append(got1, bytes.Clone(rp.Data))
				}
			}
			return ok
		case m, ok := <-c2.msgs:
			if ok {
				if rp, ok := m.(derp.ReceivedPacket); ok {
					got2 = append(got2, bytes.Clone(rp.Data))
				}
			}
			return ok
		case <-time.After(d):
			return true
		}
	}
	for len(got1)+len(got2) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no sync packet reached either connection of the duplicated key")
		}
		if err := a.c.Send(dupKey.Public(), syncMagic); err != nil {
			t.Fatal(err)
		}
		collect(20 * time.Millisecond)
	}
	// Send in small batches, each waited for, so the per-client queue never
	// overflows: a loss here would be a routing fault, not a queue drop.
	const n, batch = 200, 8
	counts := map[string]int{}
	fence := []byte("dup-fence")
	fenceSeen := false
	drain := func(until func() bool) {
		for !until() && time.Now().Before(deadline) {
			got1, got2 = got1[:0], got2[:0]
			if !collect(time.Until(deadline)) {
				t.Fatal("a duplicate connection was closed by the server")
			}
			for _, d := range got1 {
				count(counts, d, fence, &fenceSeen)
			}
			for _, d := range got2 {
				count(counts, d, fence, &fenceSeen)
			}
		}
	}
	for i := 0; i < n; i += batch {
		for j := i; j < i+batch; j++ {
			if err := a.c.Send(dupKey.Public(), fmt.Appendf(nil, "dup-%04d", j)); err != nil {
				t.Fatal(err)
			}
		}
		last := fmt.Sprintf("dup-%04d", i+batch-1)
		drain(func() bool { return counts[last] > 0 })
	}
	if err := a.c.Send(dupKey.Public(), fence); err != nil {
		t.Fatal(err)
	}
	drain(func() bool { return fenceSeen })
	if !fenceSeen {
		t.Fatalf("fence packet never arrived; got %d distinct packets", len(counts))
	}
	for i := range n {
		k := fmt.Sprintf("dup-%04d", i)
		if c := counts[k]; c != 1 {
			t.Errorf("packet %s delivered %d times, want exactly 1", k, c)
		}
	}
}

func count(counts map[string]int, d, fence []byte, fenceSeen *bool) {
	switch {
	case bytes.Equal(d, syncMagic):
	case bytes.Equal(d, fence):
		*fenceSeen = true
	default:
		counts[string(d)]++
	}
}

// discoPacket returns a packet that Tailscale's disco.LooksLikeDiscoWrapper
// accepts: magic, a sender disco key, a nonce, and a sealed body.
func discoPacket(t *testing.T) []byte {
	t.Helper()
	b := []byte(disco.Magic)
	rest := make([]byte, 32+24+48)
	rand.Read(rest)
	b = append(b, rest...)
	if !disco.LooksLikeDiscoWrapper(b) {
		t.Fatal("test packet does not look like disco")
	}
	return b
}

// TestUnknownDestination: a packet to a key nobody holds is dropped without
// harm; a disco packet to such a key is answered with PeerGone(not here).
func TestUnknownDestination(t *testing.T) {
	a, b := newPeer(t, srv), newPeer(t, srv)
	syncPeers(t, a, b)
	nobody := key.NewNode().Public()
	for range 10 {
		if err := a.c.Send(nobody, []byte("to nobody")); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.c.Send(nobody, discoPacket(t)); err != nil {
		t.Fatal(err)
	}
	m, err := a.next(10*time.Second, skipControl)
	if err != nil {
		t.Fatalf("waiting for PeerGone(not here): %v", err)
	}
	pg, ok := m.(derp.PeerGoneMessage)
	if !ok {
		t.Fatalf("got %T %+v, want derp.PeerGoneMessage", m, m)
	}
	if pg.Peer != nobody || pg.Reason != derp.PeerGoneReasonNotHere {
		t.Fatalf("PeerGone = {%v, reason %d}, want {%v, not here(%d)}", pg.Peer.ShortString(), pg.Reason, nobody.ShortString(), derp.PeerGoneReasonNotHere)
	}
	// The sender's connection still works.
	if err := a.c.Send(b.pub, []byte("still here")); err != nil {
		t.Fatal(err)
	}
	rp, err := b.nextPacket(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if string(rp.Data) != "still here" || rp.Source != a.pub {
		t.Fatalf("got %q from %v", rp.Data, rp.Source.ShortString())
	}
	requireAlive(t)
}
