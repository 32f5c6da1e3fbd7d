// Package meshbench measures forwarding across a two-node region on
// loopback: senders homed on node A, receivers homed on node B, every packet
// crossing the mesh. The nodes run in-process, either as xderp (its
// derpserver driven by userspace/mesh) or as derper (Tailscale's derpserver
// driven by Tailscale's mesh client, as cmd/derper -mesh-with sets it up).
// Load comes from minimal clients written with xderp's DERP codec, the same
// for both kinds, so the relays are compared and not the load generators.
//
// All traffic stays on 127.0.0.1; every phase is bounded in time.
package meshbench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go4.org/mem"
	tsderp "tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	tsderpserver "tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/derpserver"
	"github.com/xderp/xderp/userspace/mesh"
	"github.com/xderp/xderp/userspace/metrics"
)

// Kind selects the relay implementation of both nodes.
type Kind string

// Kinds.
const (
	Xderp  Kind = "xderp"
	Derper Kind = "derper"
)

const meshKey = "62656e63686d61726b206d657368206b657920666f72207820616e6420642121"

// Options configures one run. Zero values take the defaults noted.
type Options struct {
	Kind  Kind
	Pairs int     // sender/receiver pairs, default 16
	Size  int     // packet bytes, default 1200
	Batch int     // frames per sender write, default 32
	Rate  float64 // offered load in packets/s over all senders; 0 = unthrottled
	// NodeBin, if set, is a meshnode binary (./internal/meshbench/meshnode):
	// each node then runs in its own process, as in a real region, instead
	// of inside the caller's process.
	NodeBin  string
	Warmup   time.Duration // default 500 ms
	Duration time.Duration // measured window, default 3 s
}

// Result is what one run measured in its window.
type Result struct {
	Kind     Kind
	Pairs    int
	Size     int
	Duration time.Duration
	Sent     uint64  // packets written by senders (accepted by node A's sockets)
	Received uint64  // packets delivered to receivers on node B
	PPS      float64 // Received per second
	Mbps     float64 // delivered payload, megabits per second
	// Detail holds the mesh and drop counters of both nodes (xderp only).
	Detail string
}

// Loss is the fraction of sent packets not delivered (0 when packets in
// flight at the window's start make up for those still in flight at its
// end).
func (r Result) Loss() float64 {
	if r.Sent == 0 || r.Received >= r.Sent {
		return 0
	}
	return 1 - float64(r.Received)/float64(r.Sent)
}

func (r Result) String() string {
	return fmt.Sprintf("%s pairs=%d size=%d: %.0f pkt/s, %.0f Mbit/s delivered, loss %.1f%%", r.Kind, r.Pairs, r.Size, r.PPS, r.Mbps, 100*r.Loss())
}

// Run builds two meshed nodes of o.Kind, drives them and tears them down.
func Run(ctx context.Context, o Options) (Result, error) {
	if o.Pairs <= 0 {
		o.Pairs = 16
	}
	if o.Size <= 0 {
		o.Size = 1200
	}
	if o.Batch <= 0 {
		o.Batch = 32
	}
	if o.Warmup <= 0 {
		o.Warmup = 500 * time.Millisecond
	}
	if o.Duration <= 0 {
		o.Duration = 3 * time.Second
	}
	res := Result{Kind: o.Kind, Pairs: o.Pairs, Size: o.Size}
	var a, b nodeHandle
	if o.NodeBin != "" {
		pa, pb, err := startProcesses(o.NodeBin, o.Kind)
		if err != nil {
			return res, err
		}
		defer pa.close()
		defer pb.close()
		a, b = pa, pb
	} else {
		aAddr, bAddr, err := twoPorts()
		if err != nil {
			return res, err
		}
		na, err := StartNode(o.Kind, aAddr, []string{"http://" + bAddr + "/derp"})
		if err != nil {
			return res, err
		}
		defer na.Close()
		nb, err := StartNode(o.Kind, bAddr, []string{"http://" + aAddr + "/derp"})
		if err != nil {
			return res, err
		}
		defer nb.Close()
		a, b = na, nb
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var senders, receivers []*client
	defer func() {
		for _, c := range append(senders, receivers...) {
			c.nc.Close()
		}
	}()
	for range o.Pairs {
		s, err := dialClient(ctx, a.address())
		if err != nil {
			return res, err
		}
		senders = append(senders, s)
		r, err := dialClient(ctx, b.address())
		if err != nil {
			return res, err
		}
		receivers = append(receivers, r)
	}
	// The mesh must have learned every receiver before load starts.
	for i := range senders {
		if err := probe(ctx, senders[i], receivers[i]); err != nil {
			return res, err
		}
	}

	var sent, recv atomic.Uint64
	var wg sync.WaitGroup
	for i := range senders {
		wg.Add(2)
		go func() { defer wg.Done(); receivers[i].count(&recv) }()
		go func() {
			defer wg.Done()
			senders[i].flood(ctx, receivers[i].pub, o.Size, o.Batch, o.Rate/float64(o.Pairs), &sent)
		}()
	}
	stop := func() {
		cancel()
		for _, c := range append(senders, receivers...) {
			c.nc.Close()
		}
		wg.Wait()
	}
	if !sleep(ctx, o.Warmup) {
		stop()
		return res, ctx.Err()
	}
	s0, r0, t0 := sent.Load(), recv.Load(), time.Now()
	ok := sleep(ctx, o.Duration)
	s1, r1, t1 := sent.Load(), recv.Load(), time.Now()
	stop()
	if !ok {
		return res, errors.New("meshbench: cancelled")
	}
	res.Duration = t1.Sub(t0)
	res.Sent, res.Received = s1-s0, r1-r0
	res.PPS = float64(res.Received) / res.Duration.Seconds()
	res.Mbps = res.PPS * float64(o.Size) * 8 / 1e6
	if da, db := a.counters(), b.counters(); da != "" || db != "" {
		res.Detail = "node A:\n" + da + "node B:\n" + db
	}
	return res, nil
}

// counters returns the non-zero mesh, forwarding and drop samples of reg.
func counters(reg *metrics.Registry) string {
	var all strings.Builder
	reg.WriteText(&all)
	return filterCounters(all.String())
}

func filterCounters(text string) string {
	var b strings.Builder
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, "#") || strings.HasSuffix(l, " 0") {
			continue
		}
		if strings.Contains(l, "mesh") || strings.Contains(l, "forward") || strings.Contains(l, "dropped") || strings.Contains(l, "packets_") {
			b.WriteString("  " + l + "\n")
		}
	}
	return b.String()
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

type nodeHandle interface {
	address() string
	counters() string
}

// twoPorts returns two free loopback addresses (bound and released).
func twoPorts() (string, string, error) {
	var out [2]string
	for i := range out {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", "", err
		}
		out[i] = ln.Addr().String()
		ln.Close()
	}
	return out[0], out[1], nil
}

// Node is one relay node with its mesh client.
type Node struct {
	kind Kind
	priv derp.PrivateKey
	addr string
	hs   *http.Server
	xs   *derpserver.Server
	reg  *metrics.Registry
	ts   *tsderpserver.Server
	m    *mesh.Mesh
	tsc  []*derphttp.Client
	stop context.CancelFunc
}

// StartNode serves a node of the given kind on addr (/derp, and for xderp
// /metrics) and meshes it with peers (URLs).
func StartNode(kind Kind, addr string, peers []string) (*Node, error) {
	priv, err := derp.NewPrivateKey()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	n := &Node{kind: kind, priv: priv, addr: ln.Addr().String()}
	ctx, cancel := context.WithCancel(context.Background())
	n.stop = cancel
	mux := http.NewServeMux()
	switch kind {
	case Xderp:
		n.reg = metrics.NewRegistry()
		n.xs, err = derpserver.New(derpserver.Options{PrivateKey: priv, MeshKey: meshKey, Metrics: n.reg, QueueDepth: queueDepth()})
		if err != nil {
			ln.Close()
			return nil, err
		}
		mux.Handle("/derp", n.xs)
		mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) { n.reg.WriteText(w) })
		m, err := mesh.New(mesh.Options{Server: n.xs, PrivateKey: n.priv, MeshKey: meshKey, Peers: peers, Metrics: n.reg})
		if err != nil {
			ln.Close()
			return nil, err
		}
		m.Start(ctx)
		n.m = m
	case Derper:
		s := tsderpserver.New(key.NodePrivateFromRaw32(mem.B(priv[:])), logger.Discard)
		if err := s.SetMeshKey(meshKey); err != nil {
			ln.Close()
			return nil, err
		}
		n.ts = s
		mux.Handle("/derp", tsderpserver.Handler(s))
		for _, url := range peers {
			c, err := derphttp.NewClient(s.PrivateKey(), url, logger.Discard, netmon.NewStatic())
			if err != nil {
				ln.Close()
				return nil, err
			}
			c.MeshKey = s.MeshKey()
			c.WatchConnectionChanges = true
			add := func(m tsderp.PeerPresentMessage) { s.AddPacketForwarder(m.Key, c) }
			remove := func(m tsderp.PeerGoneMessage) { s.RemovePacketForwarder(m.Peer, c) }
			go c.RunWatchConnectionLoop(ctx, s.PublicKey(), logger.Discard, add, remove, nil)
			n.tsc = append(n.tsc, c)
		}
	default:
		ln.Close()
		return nil, fmt.Errorf("meshbench: unknown kind %q", kind)
	}
	n.hs = &http.Server{Handler: mux}
	go n.hs.Serve(ln)
	return n, nil
}

// Addr is the node's listening address.
func (n *Node) Addr() string { return n.addr }

func (n *Node) address() string { return n.addr }

func (n *Node) counters() string {
	if n.reg == nil {
		return ""
	}
	return counters(n.reg)
}

// Close stops the node.
func (n *Node) Close() {
	n.stop()
	if n.m != nil {
		n.m.Close()
	}
	for _, c := range n.tsc {
		c.Close()
	}
	n.hs.Close()
	if n.xs != nil {
		n.xs.Close()
	}
	if n.ts != nil {
		n.ts.Close()
	}
}

// client is a minimal DERP client on xderp's codec.
type client struct {
	nc  net.Conn
	br  *bufio.Reader
	pub derp.PublicKey
}

func dialClient(ctx context.Context, addr string) (*client, error) {
	priv, err := derp.NewPrivateKey()
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	nc, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	fail := func(err error) (*client, error) {
		nc.Close()
		return nil, fmt.Errorf("meshbench: client to %s: %w", addr, err)
	}
	if _, err := io.WriteString(nc, "GET /derp HTTP/1.1\r\nHost: "+addr+"\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"); err != nil {
		return fail(err)
	}
	br := bufio.NewReaderSize(nc, 256<<10)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return fail(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return fail(fmt.Errorf("status %s", resp.Status))
	}
	fr := derp.NewFrameReader(br, 0)
	ft, p, err := fr.ReadFrame()
	if err != nil || ft != derp.FrameServerKey {
		return fail(fmt.Errorf("server key: %v %v", ft, err))
	}
	sk, err := derp.ParseServerKey(p)
	if err != nil {
		return fail(err)
	}
	ci, err := derp.AppendClientInfo(nil, priv, sk, &derp.ClientInfo{Version: 2})
	if err != nil {
		return fail(err)
	}
	if _, err := nc.Write(ci); err != nil {
		return fail(err)
	}
	if ft, _, err = fr.ReadFrame(); err != nil || ft != derp.FrameServerInfo {
		return fail(fmt.Errorf("server info: %v %v", ft, err))
	}
	nc.SetDeadline(time.Time{})
	return &client{nc: nc, br: br, pub: priv.Public()}, nil
}

// probe sends small packets from s to r until one arrives (10 s at most).
func probe(ctx context.Context, s, r *client) error {
	deadline := time.Now().Add(10 * time.Second)
	fr := derp.NewFrameReader(r.br, 0)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if _, err := s.nc.Write(derp.AppendSendPacket(nil, r.pub, []byte("probe"))); err != nil {
			return err
		}
		r.nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		for {
			ft, _, err := fr.ReadFrame()
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break
				}
				return err
			}
			if ft == derp.FrameRecvPacket {
				r.nc.SetReadDeadline(time.Time{})
				return nil
			}
		}
	}
	return fmt.Errorf("meshbench: receiver %s not reachable across the mesh", r.pub.ShortString())
}

// flood writes batches of SendPacket frames to dst until ctx ends or the
// connection fails, counting packets written. With rate > 0 (packets/s)
// batches are paced to that rate; a sender that falls behind does not
// try to catch up with a burst.
func (c *client) flood(ctx context.Context, dst derp.PublicKey, size, batch int, rate float64, sent *atomic.Uint64) {
	pkt := make([]byte, size)
	var buf []byte
	for range batch {
		buf = derp.AppendSendPacket(buf, dst, pkt)
	}
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(batch) / rate * float64(time.Second))
	}
	next := time.Now()
	for ctx.Err() == nil {
		if interval > 0 {
			next = next.Add(interval)
			if d := time.Until(next); d > 0 {
				time.Sleep(d) // pacing the load generator
			} else if d < -interval {
				next = time.Now()
			}
		}
		if _, err := c.nc.Write(buf); err != nil {
			return
		}
		sent.Add(uint64(batch))
	}
}

// count reads frames until the connection ends, counting RecvPacket.
func (c *client) count(recv *atomic.Uint64) {
	c.nc.SetReadDeadline(time.Time{})
	for {
		var h [derp.FrameHeaderLen]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return
		}
		ft, n := derp.ParseFrameHeader(h[:])
		if _, err := c.br.Discard(int(n)); err != nil {
			return
		}
		if ft == derp.FrameRecvPacket {
			recv.Add(1)
		}
	}
}

func queueDepth() int {
	v, _ := strconv.Atoi(os.Getenv("MESHBENCH_QUEUE_DEPTH"))
	return v
}
