package interop

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

// Shared state for the whole test binary: the implementation under test,
// its binary, and one long-running server most tests talk to. Tests that
// need their own server (IPv6, SIGTERM) start one with startServer.
var (
	kind    target.Kind
	binPath string
	workDir string
	srv     *target.Server
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	var err error
	kind, err = target.FromEnv()
	if err != nil {
		log.Print(err)
		return 2
	}
	workDir, err = os.MkdirTemp("", "xderp-interop-")
	if err != nil {
		log.Print(err)
		return 2
	}
	defer os.RemoveAll(workDir)
	binPath, err = target.Build(kind, workDir)
	if err != nil {
		log.Print(err)
		return 2
	}
	srv, err = target.Start(kind, binPath, target.Options{Dir: workDir})
	if err != nil {
		log.Print(err)
		return 2
	}
	code := m.Run()
	if !srv.Alive() {
		log.Printf("%s died during the tests: %v\n%s", kind, srv.ExitErr(), srv.LogTail())
		return 1
	}
	if err := srv.Stop(10 * time.Second); err != nil {
		log.Printf("%s: stop: %v\n%s", kind, err, srv.LogTail())
		if code == 0 {
			code = 1
		}
	}
	if code != 0 {
		log.Printf("%s log tail:\n%s", kind, srv.LogTail())
	}
	return code
}

// startServer runs a private server for one test, stopped at cleanup.
func startServer(t *testing.T, o target.Options) *target.Server {
	t.Helper()
	o.Dir = workDir
	s, err := target.Start(kind, binPath, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Kill() })
	return s
}

// requireAlive fails the test if the shared server has exited.
func requireAlive(t *testing.T) {
	t.Helper()
	if !srv.Alive() {
		t.Fatalf("%s exited: %v\n%s", kind, srv.ExitErr(), srv.LogTail())
	}
}

// peer is a connected Tailscale derphttp client with a goroutine that
// forwards everything it receives to msgs (closed when Recv fails).
type peer struct {
	priv key.NodePrivate
	pub  key.NodePublic
	c    *derphttp.Client
	msgs chan derp.ReceivedMessage
	err  error // Recv error, valid after msgs is closed
}

var syncMagic = []byte("xderp-interop-sync-packet\x00\xff")

func newPeer(t testing.TB, s *target.Server) *peer {
	t.Helper()
	return newPeerKey(t, s, key.NewNode())
}

func newPeerKey(t testing.TB, s *target.Server, priv key.NodePrivate) *peer {
	t.Helper()
	c, err := derphttp.NewClient(priv, s.DERPURL(), t.Logf, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("connect %s: %v", s.DERPURL(), err)
	}
	return startPeer(t, c, priv)
}

// startPeer wraps a connected client as a peer.
func startPeer(t testing.TB, c *derphttp.Client, priv key.NodePrivate) *peer {
	ch := make(chan derp.ReceivedMessage, 8192)
	p := &peer{priv: priv, pub: priv.Public(), c: c, msgs: ch}
	go func() {
		defer close(ch)
		for {
			m, err := c.Recv()
			if err != nil {
				p.err = err
				return
			}
			// The client reuses its read buffer on the next Recv.
			if rp, ok := m.(derp.ReceivedPacket); ok {
				rp.Data = bytes.Clone(rp.Data)
				m = rp
			}
			ch <- m
		}
	}()
	t.Cleanup(func() { c.Close() })
	return p
}

// next returns the next message that is not a sync packet, keepalive or
// health/ServerInfo noise for which skip returns true.
func (p *peer) next(d time.Duration, skip func(derp.ReceivedMessage) bool) (derp.ReceivedMessage, error) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case m, ok := <-p.msgs:
			if !ok {
				return nil, fmt.Errorf("recv: %w", p.err)
			}
			if rp, ok := m.(derp.ReceivedPacket); ok && bytes.Equal(rp.Data, syncMagic) {
				continue
			}
			if skip != nil && skip(m) {
				continue
			}
			return m, nil
		case <-timer.C:
			return nil, fmt.Errorf("no message within %v", d)
		}
	}
}

// skipControl skips frames that carry no test data.
func skipControl(m derp.ReceivedMessage) bool {
	switch m.(type) {
	case derp.ServerInfoMessage, derp.KeepAliveMessage, derp.HealthMessage:
		return true
	}
	return false
}

// nextPacket returns the next data packet, skipping control frames.
func (p *peer) nextPacket(d time.Duration) (derp.ReceivedPacket, error) {
	m, err := p.next(d, func(m derp.ReceivedMessage) bool {
		_, isPkt := m.(derp.ReceivedPacket)
		return !isPkt
	})
	if err != nil {
		return derp.ReceivedPacket{}, err
	}
	return m.(derp.ReceivedPacket), nil
}

// syncPeers makes sure each peer is registered at the server and can
// reach every other one: each sends sync packets to the others until every
// peer has received one from every other peer. Sync packets are filtered
// out of later reads. Messages other than sync packets seen meanwhile are
// kept in order for later reads.
func syncPeers(t testing.TB, peers ...*peer) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	type pair struct{ from, to key.NodePublic }
	var mu sync.Mutex
	seen := map[pair]bool{}
	want := len(peers) * (len(peers) - 1)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// One watcher per peer: move messages into a side queue so sync
	// packets are noted and everything else is preserved.
	kept := make([]chan derp.ReceivedMessage, len(peers))
	for i, p := range peers {
		kept[i] = make(chan derp.ReceivedMessage, cap(p.msgs))
		wg.Add(1)
		go func(i int, p *peer) {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case m, ok := <-p.msgs:
					if !ok {
						return
					}
					if rp, ok := m.(derp.ReceivedPacket); ok && bytes.Equal(rp.Data, syncMagic) {
						mu.Lock()
						seen[pair{rp.Source, p.pub}] = true
						mu.Unlock()
						continue
					}
					kept[i] <- m
				}
			}
		}(i, p)
	}
	for {
		mu.Lock()
		n := len(seen)
		mu.Unlock()
		if n >= want {
			break
		}
		if time.Now().After(deadline) {
			close(stop)
			wg.Wait()
			t.Fatalf("sync: only %d of %d peer pairs reached each other within 10s", n, want)
		}
		for _, a := range peers {
			for _, b := range peers {
				if a != b {
					mu.Lock()
					done := seen[pair{a.pub, b.pub}]
					mu.Unlock()
					if !done {
						if err := a.c.Send(b.pub, syncMagic); err != nil {
							t.Fatalf("sync send: %v", err)
						}
					}
				}
			}
		}
		time.Sleep(20 * time.Millisecond) // resend interval of the poll loop above

	}
	close(stop)
	wg.Wait()
	// Put the preserved messages back in front of anything newer. The
	// receive goroutine may have queued more meanwhile, so rebuild the
	// channel: kept first, then whatever is pending.
	for i, p := range peers {
		merged := make(chan derp.ReceivedMessage, cap(p.msgs))
		close(kept[i])
		for m := range kept[i] {
			merged <- m
		}
		old := p.msgs
		p.msgs = merged
		go func(p *peer, old, merged chan derp.ReceivedMessage) {
			defer close(merged)
			for m := range old {
				merged <- m
			}
		}(p, old, merged)
	}
}
