package interop

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"

	"github.com/xderp/xderp/interop/internal/target"
)

// TestSoak runs Tailscale's clients against the server for a while in the
// patterns short tests do not reach: bursts, single packets, and quiet
// spells of up to 70 s (past the server's 60 s keepalive and every idle
// timer). Every packet must arrive exactly once and in order per sender, and
// no connection may break. It runs only when XDERP_SOAK names a duration
// (`make soak` sets 5m); the suite's other tests cover each mechanism in
// seconds. Plain HTTP (the shared server), TLS (a daemon with a pinned
// self-signed certificate) and a two-node mesh (clients split between the
// nodes) run side by side.
func TestSoak(t *testing.T) {
	v := os.Getenv("XDERP_SOAK")
	if v == "" {
		t.Skip("long-running: set XDERP_SOAK to a duration (make soak)")
	}
	dur, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("XDERP_SOAK=%q: %v", v, err)
	}
	t.Run("http", func(t *testing.T) {
		t.Parallel()
		peers := make([]*peer, soakPeers)
		for i := range peers {
			peers[i] = newPeer(t, srv)
		}
		soak(t, peers, dur)
	})
	t.Run("tls", func(t *testing.T) {
		if kind != target.Xderpd {
			t.Skip("xderpd's own TLS front (self-signed, pinned)")
		}
		t.Parallel()
		node, _, _ := startSelfSignedDaemon(t)
		peers := make([]*peer, soakPeers)
		for i := range peers {
			c, priv, err := certsDerpClient(t, node, nil)
			if err != nil {
				t.Fatal(err)
			}
			peers[i] = startPeer(t, c, priv)
		}
		soak(t, peers, dur)
	})
	t.Run("mesh", func(t *testing.T) {
		if kind != target.Xderpd {
			t.Skip("drives xderpd's -mesh-with flags")
		}
		t.Parallel()
		nodes := startMeshedDaemons(t, 2)
		peers := make([]*peer, soakPeers)
		for i := range peers {
			peers[i] = newPeer(t, nodes[i%2]) // most pairs cross the mesh
		}
		soak(t, peers, dur)
	})
}

const soakPeers = 6

// soak runs the traffic of TestSoak among peers for dur and checks it.
func soak(t *testing.T, peers []*peer, dur time.Duration) {
	const n = soakPeers
	syncPeers(t, peers...)

	// Payload: sender index, sequence number to that receiver, padding.
	var (
		mu       sync.Mutex
		sent     [n][n]uint64 // sent[from][to]
		got      [n][n]uint64 // highest sequence received
		failures []string
		progress = make(chan struct{}, 1) // a receiver moved on
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(failures) < 20 {
			failures = append(failures, fmt.Sprintf(format, args...))
		}
	}
	index := map[[32]byte]int{}
	for i, p := range peers {
		index[p.pub.Raw32()] = i
	}

	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var recvWG sync.WaitGroup
	recvCtx, stopRecv := context.WithCancel(context.Background())
	defer stopRecv()
	for to, p := range peers {
		recvWG.Add(1)
		go func() {
			defer recvWG.Done()
			for {
				select {
				case <-recvCtx.Done():
					return
				case m, ok := <-p.msgs:
					if !ok {
						fail("peer %d: connection broke: %v", to, p.err)
						return
					}
					rp, isPkt := m.(derp.ReceivedPacket)
					if !isPkt || len(rp.Data) < 9 || string(rp.Data) == string(syncMagic) {
						continue
					}
					from, known := index[rp.Source.Raw32()]
					if !known || int(rp.Data[0]) != from {
						fail("peer %d: packet from an unknown source", to)
						continue
					}
					seq := binary.BigEndian.Uint64(rp.Data[1:9])
					mu.Lock()
					if seq != got[from][to]+1 {
						mu.Unlock()
						fail("%d->%d: sequence %d after %d (lost, duplicated or reordered)", from, to, seq, got[from][to])
						continue
					}
					got[from][to] = seq
					mu.Unlock()
					select {
					case progress <- struct{}{}:
					default:
					}
				}
			}
		}()
	}

	var sendWG sync.WaitGroup
	for from, p := range peers {
		sendWG.Add(1)
		go func() {
			defer sendWG.Done()
			rng := rand.New(rand.NewPCG(uint64(from), uint64(time.Now().UnixNano())))
			buf := make([]byte, 1400)
			send := func(to int) bool {
				mu.Lock()
				sent[from][to]++
				seq := sent[from][to]
				mu.Unlock()
				size := 9 + rng.IntN(len(buf)-9)
				buf[0] = byte(from)
				binary.BigEndian.PutUint64(buf[1:9], seq)
				if err := p.c.Send(peers[to].pub, buf[:size]); err != nil {
					fail("%d: send: %v", from, err)
					return false
				}
				return true
			}
			for ctx.Err() == nil {
				to := rng.IntN(n - 1)
				if to >= from {
					to++
				}
				var pause time.Duration
				switch r := rng.IntN(10); {
				case r < 3: // a burst, as a file transfer starts
					for range 1 + rng.IntN(300) {
						if !send(to) {
							return
						}
					}
				case r < 8: // one packet, as a keepalive or a ping
					if !send(to) {
						return
					}
					pause = time.Duration(rng.IntN(2000)) * time.Millisecond
				default: // a quiet spell, sometimes past the keepalive
					pause = time.Duration(rng.IntN(70)) * time.Second
				}
				select {
				case <-ctx.Done():
				case <-time.After(pause):
				}
			}
		}()
	}
	sendWG.Wait()

	// Everything sent must arrive.
	settle := time.After(10 * time.Second)
	for done := false; !done; {
		mu.Lock()
		missing := ""
		for f := range n {
			for to := range n {
				if got[f][to] != sent[f][to] && missing == "" {
					missing = fmt.Sprintf("%d->%d: received %d of %d", f, to, got[f][to], sent[f][to])
				}
			}
		}
		mu.Unlock()
		if missing == "" {
			break
		}
		select {
		case <-progress:
		case <-settle:
			fail("after the soak: %s", missing)
			done = true
		}
	}
	stopRecv()
	recvWG.Wait()
	var total uint64
	for f := range n {
		for to := range n {
			total += sent[f][to]
		}
	}
	t.Logf("%v soak (%s): %d packets among %d Tailscale clients", dur, t.Name(), total, n)
	for _, f := range failures {
		t.Error(f)
	}
}
