package mesh

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// Errors returned by (*peer).ForwardPacket; the packet has been dropped and
// counted in xderp_mesh_forward_drops_total.
var (
	ErrPeerDown  = errors.New("mesh: peer not connected")
	ErrQueueFull = errors.New("mesh: peer queue full")
)

// peer is one remote node: a mesh connection that is (re)established in the
// background, the keys learned from it, and a bounded queue of outgoing
// ForwardPacket frames drained by a writer goroutine. It is the
// PacketForwarder registered with the relay for every key it learned.
type peer struct {
	m    *Mesh
	t    *target
	addr netip.AddrPort
	name string // for logs and String: the configured entry plus the address

	q    chan []byte // encoded ForwardPacket frames
	up   atomic.Bool
	self atomic.Bool // the remote turned out to be this node

	cancel context.CancelFunc
	done   chan struct{}
}

func newPeer(m *Mesh, t *target, addr netip.AddrPort) *peer {
	name := t.raw
	if lit, ok := t.literal(); !ok || lit != addr.Addr() {
		name += "@" + addr.String()
	}
	return &peer{
		m:    m,
		t:    t,
		addr: addr,
		name: name,
		q:    make(chan []byte, m.queueLen),
		done: make(chan struct{}),
	}
}

// String names the peer (PacketForwarder).
func (p *peer) String() string { return "mesh(" + p.name + ")" }

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 2048); return &b }}

func getBuf(n int) []byte {
	if n > 2048 {
		return make([]byte, 0, n)
	}
	return (*bufPool.Get().(*[]byte))[:0]
}

func putBuf(b []byte) {
	if cap(b) == 2048 {
		bufPool.Put(&b)
	}
}

// ForwardPacket queues a ForwardPacket frame for the peer (PacketForwarder).
// It never blocks: when the peer is down or its queue is full the packet
// is dropped, counted, and an error returned. pkt is copied.
func (p *peer) ForwardPacket(src, dst derp.PublicKey, pkt []byte) error {
	if !p.up.Load() {
		p.m.met.dropPeerDown.Inc()
		return ErrPeerDown
	}
	if len(pkt) > derp.MaxPacketSize {
		p.m.met.dropTooLarge.Inc()
		return fmt.Errorf("mesh: packet of %d bytes, limit %d", len(pkt), derp.MaxPacketSize)
	}
	if len(p.q) == cap(p.q) {
		// Full: drop before paying for a copy (an overloaded peer costs
		// its senders as little as possible).
		p.m.met.dropQueueFull.Inc()
		return ErrQueueFull
	}
	b := derp.AppendForwardPacket(getBuf(derp.FrameHeaderLen+2*derp.KeyLen+len(pkt)), src, dst, pkt)
	select {
	case p.q <- b:
		return nil
	default:
		putBuf(b)
		p.m.met.dropQueueFull.Inc()
		return ErrQueueFull
	}
}

func (p *peer) start(ctx context.Context) {
	ctx, p.cancel = context.WithCancel(ctx)
	go func() {
		defer close(p.done)
		p.run(ctx)
	}()
}

// stop ends the peer and waits until every key learned from it has been
// removed from the relay.
func (p *peer) stop() {
	if p.cancel != nil {
		p.cancel()
		<-p.done
	}
}

// run connects, serves and reconnects until ctx ends or the peer turns out
// to be ourselves.
func (p *peer) run(ctx context.Context) {
	m := p.m
	backoff := m.opts.ReconnectMin
	failing := false
	for ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(ctx, m.opts.DialTimeout)
		cc, err := dialMesh(dctx, p.t, p.addr.String(), m.opts.TLSConfig, m.opts.PrivateKey, m.pub, m.meshKey, true)
		cancel()
		if errors.Is(err, errSelf) {
			p.self.Store(true)
			m.met.dials.With("self").Inc()
			m.log.Info("mesh peer is this node; dropping it", "peer", p.name)
			return
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			m.met.dials.With("error").Inc()
			if !failing {
				m.log.Warn("mesh peer unreachable; retrying with backoff", "peer", p.name, "err", err)
				failing = true
			} else {
				m.log.Debug("mesh dial failed", "peer", p.name, "err", err)
			}
			if !sleep(ctx, jitter(backoff)) {
				return
			}
			backoff = min(2*backoff, m.opts.ReconnectMax)
			continue
		}
		m.met.dials.With("ok").Inc()
		failing = false
		m.log.Info("mesh peer connected", "peer", p.name, "server_key", cc.serverKey.ShortString())
		began := time.Now()
		frames, err := p.serve(ctx, cc)
		if ctx.Err() != nil {
			return
		}
		if frames == 0 {
			// A server closes a watcher without the right mesh key as
			// soon as it reads WatchConns, before sending anything.
			m.log.Warn("mesh connection closed before any watch update; is the mesh key the same on both nodes?", "peer", p.name, "err", err)
		} else {
			m.log.Warn("mesh connection lost; reconnecting", "peer", p.name, "err", err)
		}
		if time.Since(began) > m.opts.ReconnectMax {
			backoff = m.opts.ReconnectMin
		}
		if !sleep(ctx, jitter(backoff)) {
			return
		}
		backoff = min(2*backoff, m.opts.ReconnectMax)
	}
}

// serve runs one established connection: a writer goroutine drains the
// queue while this goroutine reads watch updates. When either side fails
// the connection is closed, every key learned through it is removed from
// the relay (so local clients get PeerGone for keys that left the region)
// and queued frames are dropped as peer_down.
func (p *peer) serve(ctx context.Context, cc *clientConn) (frames int, err error) {
	m := p.m
	present := make(map[derp.PublicKey]struct{})
	ctrl := make(chan []byte, 4)
	wdone := make(chan struct{})
	stopWriter := make(chan struct{})

	p.up.Store(true)
	m.met.connected.Add(1)
	go func() {
		defer close(wdone)
		p.writeLoop(cc, ctrl, stopWriter)
	}()
	stopCtx := context.AfterFunc(ctx, func() { cc.nc.Close() })

	err = p.readLoop(cc, present, ctrl, &frames)

	stopCtx()
	p.up.Store(false)
	m.met.connected.Add(-1)
	cc.nc.Close()
	close(stopWriter)
	<-wdone
	for k := range present {
		m.table.RemovePacketForwarder(k, p)
		m.met.updConnBroke.Inc()
	}
	m.met.learned.Add(-int64(len(present)))
	p.drain()
	return frames, err
}

// drain drops every queued frame, counting it as peer_down.
func (p *peer) drain() {
	for {
		select {
		case b := <-p.q:
			putBuf(b)
			p.m.met.dropPeerDown.Inc()
		default:
			return
		}
	}
}

func (p *peer) readLoop(cc *clientConn, present map[derp.PublicKey]struct{}, ctrl chan<- []byte, frames *int) error {
	m := p.m
	for {
		cc.nc.SetReadDeadline(time.Now().Add(m.opts.ReadTimeout))
		ft, payload, err := cc.fr.ReadFrame()
		if err != nil {
			return err
		}
		*frames++
		switch ft {
		case derp.FramePeerPresent:
			pp, err := derp.ParsePeerPresent(payload)
			if err != nil {
				return err
			}
			m.met.updPresent.Inc()
			if pp.Key == m.pub {
				continue // our own mesh connection to that node
			}
			if _, ok := present[pp.Key]; ok {
				continue // a second connection of a key already known
			}
			present[pp.Key] = struct{}{}
			m.met.learned.Add(1)
			m.table.AddPacketForwarder(pp.Key, p)
		case derp.FramePeerGone:
			k, reason, err := derp.ParsePeerGone(payload)
			if err != nil {
				return err
			}
			if reason == derp.PeerGoneNotHere {
				m.met.updNotHere.Inc()
			} else {
				m.met.updGone.Inc()
			}
			if _, ok := present[k]; !ok {
				continue
			}
			delete(present, k)
			m.met.learned.Add(-1)
			m.table.RemovePacketForwarder(k, p)
		case derp.FramePing:
			data, err := derp.ParsePing(payload)
			if err != nil {
				return err
			}
			select {
			case ctrl <- derp.AppendPong(nil, data):
			default: // a Pong is already pending
			}
		default:
			// KeepAlive, Health, Restarting, RecvPacket and anything
			// unknown: nothing to do; reading it counted as liveness.
		}
	}
}

// writeLoop writes queued frames in batches: it blocks for one frame, then
// takes whatever else is already queued (up to the queue length: under CPU
// pressure the writer runs rarely, and each run should move as much as it
// can), interleaves the data frames by destination and flushes once.
// A write error or timeout closes the connection, which ends readLoop.
func (p *peer) writeLoop(cc *clientConn, ctrl <-chan []byte, stop <-chan struct{}) {
	m := p.m
	bw := bufio.NewWriterSize(cc.nc, 64<<10)
	maxBatch := cap(p.q)
	frames := make([][]byte, 0, maxBatch)
	var il interleaver
	for {
		frames = frames[:0]
		select {
		case <-stop:
			return
		case b := <-ctrl:
			bw.Write(b)
		case b := <-p.q:
			frames = append(frames, b)
		}
	take:
		for len(frames) < maxBatch {
			select {
			case b := <-ctrl:
				bw.Write(b) // control frames go first
			case b := <-p.q:
				frames = append(frames, b)
			default:
				break take
			}
		}
		cc.nc.SetWriteDeadline(time.Now().Add(m.opts.WriteTimeout))
		var err error
		var bytes uint64
		for _, b := range il.order(frames) {
			if err == nil {
				_, err = bw.Write(b)
			}
			bytes += uint64(len(b) - derp.FrameHeaderLen - 2*derp.KeyLen)
			putBuf(b)
		}
		if err == nil {
			err = bw.Flush()
		}
		if err != nil {
			m.met.dropWriteError.Add(uint64(len(frames)))
			m.log.Debug("mesh write failed", "peer", p.name, "err", err)
			cc.nc.Close()
			return
		}
		m.met.fwdPackets.Add(uint64(len(frames)))
		m.met.fwdBytes.Add(bytes)
	}
}

// interleaver reorders a batch of ForwardPacket frames round-robin by
// destination key, keeping each destination's frames in order (so
// per-sender order is kept too). Senders' reads arrive in bursts for one
// destination; spreading them keeps one burst from overflowing that
// client's small queue on the far node while other clients idle. It reuses
// its memory between batches.
type interleaver struct {
	idx    map[derp.PublicKey]int
	groups [][][]byte
	out    [][]byte
}

func frameDst(b []byte) derp.PublicKey {
	return derp.PublicKey(b[derp.FrameHeaderLen+derp.KeyLen : derp.FrameHeaderLen+2*derp.KeyLen])
}

func (il *interleaver) order(frames [][]byte) [][]byte {
	if len(frames) < 3 {
		return frames
	}
	if il.idx == nil {
		il.idx = make(map[derp.PublicKey]int)
	}
	clear(il.idx)
	n := 0
	for _, f := range frames {
		k := frameDst(f)
		i, ok := il.idx[k]
		if !ok {
			i = n
			il.idx[k] = i
			if n == len(il.groups) {
				il.groups = append(il.groups, nil)
			}
			il.groups[i] = il.groups[i][:0]
			n++
		}
		il.groups[i] = append(il.groups[i], f)
	}
	if n == 1 {
		return frames
	}
	out := il.out[:0]
	for round := 0; len(out) < len(frames); round++ {
		for _, g := range il.groups[:n] {
			if round < len(g) {
				out = append(out, g[round])
			}
		}
	}
	for i := range il.groups[:n] {
		clear(il.groups[i]) // drop references to pooled buffers
	}
	il.out = out
	return out
}

// jitter returns d scaled by a random factor in [0.5, 1.0).
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
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
