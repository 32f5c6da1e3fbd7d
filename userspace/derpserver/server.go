// Package derpserver owns xderp's DERP relay core: the /derp upgrade
// handler and handshake, the registry of connected node keys (local
// connections and keys reachable through mesh forwarders), per-connection
// bounded send queues with drop accounting, batched writers, PeerGone /
// PeerPresent bookkeeping, and the relay's metrics.
//
// Each established connection has one reader goroutine. A packet that
// finds its destination idle is written directly by the sender's reader;
// otherwise a writer goroutine is started, batches what is queued into
// single writes and exits after an idle period. So an idle connection
// holds one parked goroutine, a small struct and no I/O buffers (on plain
// TCP sockets).
package derpserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/internal/lograte"
	"github.com/xderp/xderp/userspace/metrics"
)

// Defaults for Options fields left zero.
const (
	DefaultWriteTimeout     = 2 * time.Second  // derper's -tcp-write-timeout
	DefaultMeshWriteTimeout = 30 * time.Second // derper's privileged write timeout
	DefaultKeepAlive        = derp.KeepAliveInterval
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultQueueDepth       = 32
	DefaultQueueFullWait    = 5 * time.Millisecond
	DefaultCloseGrace       = time.Second
	DefaultMaxSkipFrame     = derp.MaxFrameSize
	DefaultRestartTryFor    = 5 * time.Second
	// defaultWriterLinger is how long an idle writer goroutine waits for
	// more work before exiting.
	defaultWriterLinger = 2 * time.Second
	// maxCtrlQueue bounds the control frames (PeerGone/PeerPresent/Health)
	// queued for one connection; a connection that falls this far behind is
	// closed.
	maxCtrlQueue = 1 << 17
)

// AdmitFunc decides whether a client that proved possession of its key may
// connect. A non-nil error refuses it (the connection is closed). It is not
// called for mesh peers.
type AdmitFunc func(ctx context.Context, key derp.PublicKey, info *derp.ClientInfo, remote netip.AddrPort) error

// Options configure a Server.
type Options struct {
	// PrivateKey is the server's key. Required.
	PrivateKey derp.PrivateKey
	// Logger receives per-connection events. Nil discards them.
	Logger *slog.Logger
	// Metrics receives the server's metrics (derper's names, new ones
	// xderp_*). Nil means a private registry (see Server.Metrics).
	Metrics *metrics.Registry
	// WriteTimeout is the deadline of each write to a normal client;
	// default 2s (derper's -tcp-write-timeout); negative disables it.
	WriteTimeout time.Duration
	// MeshWriteTimeout is the same for mesh-key connections; default 30s;
	// negative disables it.
	MeshWriteTimeout time.Duration
	// KeepAlive is the base interval of KeepAlive frames; each connection
	// adds a random jitter of up to KeepAlive/12 (5s at the default 60s).
	KeepAlive time.Duration
	// MeshKey is the mesh pre-shared key (64 hex digits); empty means no
	// mesh. Clients presenting it get mesh privileges.
	MeshKey string
	// HandshakeTimeout bounds each handshake phase (writing the ServerKey,
	// receiving ClientInfo, admission plus ServerInfo); default 10s.
	HandshakeTimeout time.Duration
	// QueueDepth is the per-connection queue of non-disco packets; default 32.
	QueueDepth int
	// DiscoQueueDepth is the per-connection queue of disco packets; default 32.
	DiscoQueueDepth int
	// MaxSkipFrame is the largest unknown frame skipped; longer ones close
	// the connection. Default 1 MiB.
	MaxSkipFrame int
	// QueueFullWait is how long a sender may wait for a full destination
	// queue whose writer is making progress (see enqueuePacket); default
	// 5ms; negative means never wait (always drop the oldest packet).
	QueueFullWait time.Duration
	// DisableInlineWrites turns off writing a packet directly from the
	// sender's goroutine when its destination has nothing queued (see
	// enqueuePacket); every packet then goes through a writer goroutine.
	// The environment variable XDERP_DISABLE_INLINE_WRITES=1 does the same
	// (for benchmarks). Default false.
	DisableInlineWrites bool
	// Admit, if set, is called after the client's box has been opened.
	Admit AdmitFunc
	// CloseGrace is how long Close waits for clients to receive the
	// Restarting frame before closing connections; default 1s.
	CloseGrace time.Duration
	// RestartReconnectIn and RestartTryFor fill the Restarting frame sent
	// by Close (defaults 0 and 5s).
	RestartReconnectIn time.Duration
	RestartTryFor      time.Duration
	// RateLimit, if set, limits what each non-mesh client may send, in
	// bytes per second of frame payload (see ratelimit.go), and exports
	// derper's derp_rate_limit_per_client_* metrics; SetRateLimit changes
	// it at run time. Nil: no limit, no metrics.
	RateLimit *RateLimit
	// RTTSampleInterval is how often every connection's TCP round-trip
	// time is sampled into derp_tcp_rtt; default 10s (derper's);
	// negative disables sampling.
	RTTSampleInterval time.Duration
}

// PacketForwarder hands packets for a key to another server of the region
// (a mesh peer). ForwardPacket is called synchronously from the sender's
// reader goroutine; payload is only valid during the call, so an
// implementation that queues it must copy it. Forwarders must be
// comparable (they are compared with ==).
type PacketForwarder interface {
	ForwardPacket(src, dst derp.PublicKey, payload []byte) error
	String() string
}

// Client-triggered log lines: a burst of connLogBurst, then one per
// connLogInterval; the next line written counts those left out.
const (
	connLogBurst    = 10
	connLogInterval = time.Second
)

// Server is a DERP relay. Create it with New, mount ServeHTTP at /derp.
type Server struct {
	opts     Options
	priv     derp.PrivateKey
	pub      derp.PublicKey
	meshKey  derp.MeshKey
	log      *slog.Logger
	registry *metrics.Registry
	m        serverMetrics

	// Idle TLS readers (tlsidle.go): a reader whose last idle wait lasted
	// at least idleHandoffNs hands over to a new goroutine when it goes
	// idle again; idleHandoffs counts the hand-overs (read by tests).
	idleHandoffNs int64
	idleHandoffs  atomic.Uint64

	// writerLinger is how long an idle writer goroutine waits for more
	// work before exiting (defaultWriterLinger; shortened by tests).
	writerLinger time.Duration
	// wsControlTimeout bounds the write of a WebSocket Pong
	// (DefaultWriteTimeout; shortened by tests).
	wsControlTimeout time.Duration

	upgradeResp []byte // 101 response followed by the ServerKey frame
	serverKey   []byte // ServerKey frame alone (fast start)

	closed    atomic.Bool
	closeOnce sync.Once
	wg        sync.WaitGroup // reader and writer goroutines
	connNum   atomic.Uint64

	// mu guards the registry. Packet routing reads it only on a miss of a
	// sender's one-entry cache.
	mu           sync.RWMutex
	keys         map[derp.PublicKey]*keyEntry
	numLocalKeys int
	watchers     map[*sclient]struct{}
	health       string
	// pendingRecv holds local connections that received a forwarded-in
	// packet from a key not (yet) in keys: a mesh peer may deliver a
	// packet before this node has learned its source from the watch
	// stream. When an entry for the key is created they become its
	// receivers, so they get PeerGone when the key leaves the region (as
	// derper's per-key peer-gone watchers do).
	pendingRecv map[derp.PublicKey]map[*sclient]struct{}

	connsMu     sync.Mutex
	handshaking map[net.Conn]struct{}
	clients     map[*sclient]struct{}
	rttTimer    *time.Timer       // RTT sampling (rtt.go); nil until the first connection
	rttSocks    []syscall.RawConn // reused by sampleRTT

	// connLog limits the Info lines that clients can trigger (refusals,
	// protocol errors): hostile clients must not flood the log.
	connLog *lograte.Limiter

	// rateLimit is the per-client receive limit; nil for none.
	rateLimit atomic.Pointer[RateLimit]

	// tlsConns counts established connections over TLS by version, slot
	// version-tls.VersionTLS10 (see TLSConns).
	tlsConns [4]atomic.Int64
}

// keyEntry is the registry record of one node key: its local connections
// and the forwarders through which it is reachable.
type keyEntry struct {
	key    derp.PublicKey
	active atomic.Pointer[sclient] // selected local connection; nil if none
	fwd    atomic.Pointer[fwdRef]  // preferred forwarder; nil if none
	dead   atomic.Bool             // removed from the registry

	// Guarded by Server.mu.
	conns     []*sclient // local connections, least recently active first
	fwds      []PacketForwarder
	receivers map[*sclient]struct{} // local connections that received from this key
}

type fwdRef struct{ f PacketForwarder }

// New returns a server; it does not listen by itself.
func New(opts Options) (*Server, error) {
	if opts.PrivateKey.IsZero() {
		return nil, errors.New("derpserver: PrivateKey is required")
	}
	s := &Server{
		opts:        opts,
		priv:        opts.PrivateKey,
		pub:         opts.PrivateKey.Public(),
		log:         opts.Logger,
		registry:    opts.Metrics,
		keys:        make(map[derp.PublicKey]*keyEntry),
		pendingRecv: make(map[derp.PublicKey]map[*sclient]struct{}),
		watchers:    make(map[*sclient]struct{}),
		handshaking: make(map[net.Conn]struct{}),
		clients:     make(map[*sclient]struct{}),

		idleHandoffNs: int64(100 * time.Millisecond),
		writerLinger:  defaultWriterLinger,

		wsControlTimeout: DefaultWriteTimeout,
		connLog:          lograte.New(connLogBurst, connLogInterval),
	}
	if opts.MeshKey != "" {
		k, err := derp.ParseMeshKey(opts.MeshKey)
		if err != nil {
			return nil, fmt.Errorf("derpserver: MeshKey: %w", err)
		}
		s.meshKey = k
	}
	o := &s.opts
	if o.WriteTimeout == 0 {
		o.WriteTimeout = DefaultWriteTimeout
	}
	if o.MeshWriteTimeout == 0 {
		o.MeshWriteTimeout = DefaultMeshWriteTimeout
	}
	if o.KeepAlive <= 0 {
		o.KeepAlive = DefaultKeepAlive
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if o.QueueDepth <= 0 {
		o.QueueDepth = DefaultQueueDepth
	}
	if o.DiscoQueueDepth <= 0 {
		o.DiscoQueueDepth = DefaultQueueDepth
	}
	if o.QueueFullWait == 0 {
		o.QueueFullWait = DefaultQueueFullWait
	}
	if os.Getenv("XDERP_DISABLE_INLINE_WRITES") == "1" {
		o.DisableInlineWrites = true
	}
	if o.MaxSkipFrame <= 0 {
		o.MaxSkipFrame = DefaultMaxSkipFrame
	}
	if o.CloseGrace <= 0 {
		o.CloseGrace = DefaultCloseGrace
	}
	if o.RestartTryFor <= 0 {
		o.RestartTryFor = DefaultRestartTryFor
	}
	if o.RTTSampleInterval == 0 {
		o.RTTSampleInterval = DefaultRTTSampleInterval
	}
	if s.log == nil {
		s.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if s.registry == nil {
		s.registry = metrics.NewRegistry()
	}
	s.registerMetrics(s.registry)
	if opts.RateLimit != nil {
		s.SetRateLimit(*opts.RateLimit)
	}
	s.serverKey = derp.AppendServerKey(nil, s.pub)
	s.upgradeResp = append([]byte("HTTP/1.1 101 Switching Protocols\r\n"+
		"Upgrade: DERP\r\n"+
		"Connection: Upgrade\r\n"+
		derp.HeaderVersion+": 2\r\n"+
		derp.HeaderPublicKey+": "+s.pub.String()+"\r\n\r\n"), s.serverKey...)
	return s, nil
}

// PublicKey returns the server's public key.
func (s *Server) PublicKey() derp.PublicKey { return s.pub }

// Metrics returns the registry holding the server's metrics.
func (s *Server) Metrics() *metrics.Registry { return s.registry }

// HasMeshKey reports whether a mesh key is configured.
func (s *Server) HasMeshKey() bool { return !s.meshKey.IsZero() }

// isMeshPeer compares the presented mesh key in constant time.
func (s *Server) isMeshPeer(info *derp.ClientInfo) bool {
	return !s.meshKey.IsZero() && !info.MeshKey.IsZero() && s.meshKey.Equal(info.MeshKey)
}

// Close stops accepting connections, sends every client a Restarting frame,
// waits up to CloseGrace for those to be written, closes every connection
// and waits for all goroutines to finish.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		s.connsMu.Lock()
		var hs []net.Conn
		for nc := range s.handshaking {
			hs = append(hs, nc)
		}
		clients := make([]*sclient, 0, len(s.clients))
		for c := range s.clients {
			clients = append(clients, c)
		}
		if s.rttTimer != nil {
			s.rttTimer.Stop()
		}
		s.connsMu.Unlock()
		for _, nc := range hs {
			nc.Close()
		}
		for _, c := range clients {
			c.closeReason.CompareAndSwap(nil, &crServerCloseStr)
			c.enqueueRestarting(s.opts.RestartReconnectIn, s.opts.RestartTryFor)
		}
		done := make(chan struct{})
		go func() { s.wg.Wait(); close(done) }()
		t := time.NewTimer(s.opts.CloseGrace)
		defer t.Stop()
		select {
		case <-done:
			return
		case <-t.C:
		}
		// Close outside the lock: a TLS close may block on its alert.
		s.connsMu.Lock()
		var conns []net.Conn
		for nc := range s.handshaking {
			conns = append(conns, nc)
		}
		for c := range s.clients {
			conns = append(conns, c.conn)
		}
		s.connsMu.Unlock()
		for _, nc := range conns {
			nc.Close()
		}
		<-done
	})
	return nil
}

var crServerCloseStr = crServerClose

// SetHealth sends a Health frame with problem to every connected client
// (and to clients connecting later); an empty problem means healthy again.
func (s *Server) SetHealth(problem string) {
	s.mu.Lock()
	s.health = problem
	s.mu.Unlock()
	s.connsMu.Lock()
	for c := range s.clients {
		c.enqueueCtrl(ctrlMsg{typ: derp.FrameHealth, text: problem})
	}
	s.connsMu.Unlock()
}

// lookup returns the registry entry for k, or nil.
func (s *Server) lookup(k derp.PublicKey) *keyEntry {
	s.mu.RLock()
	e := s.keys[k]
	s.mu.RUnlock()
	return e
}

// register adds an authenticated connection to the registry and makes it
// the key's selected connection.
func (s *Server) register(c *sclient) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.keys[c.key]
	if e == nil {
		e = s.newEntryLocked(c.key)
	}
	c.entry = e
	switch n := len(e.conns); {
	case n == 0:
		s.numLocalKeys++
	case n == 1:
		s.m.dupKeys.Add(1)
		s.m.dupConns.Add(2)
		s.m.dupConnsTotal.Inc()
		e.conns[0].isDup.Store(true)
		c.isDup.Store(true)
	default:
		s.m.dupConns.Add(1)
		s.m.dupConnsTotal.Inc()
		c.isDup.Store(true)
	}
	e.conns = append(e.conns, c)
	e.active.Store(c)
	s.m.curConns.Add(1)
	if c.notIdeal {
		s.m.curNotIdeal.Add(1)
	}
	for w := range s.watchers {
		w.enqueueCtrl(ctrlMsg{typ: derp.FramePeerPresent, key: c.key, addr: c.remote, flags: c.flags})
	}
	if s.health != "" {
		c.enqueueCtrl(ctrlMsg{typ: derp.FrameHealth, text: s.health})
	}
}

// unregister removes a connection. When it was the key's last local
// connection, watchers get PeerGone; when the key is then unreachable in
// the region, every client that received from it gets PeerGone too.
func (s *Server) unregister(c *sclient) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c.unregistered = true
	e := c.entry
	if e == nil {
		return
	}
	idx := slices.Index(e.conns, c)
	if idx < 0 {
		return
	}
	before := len(e.conns)
	copy(e.conns[idx:], e.conns[idx+1:])
	e.conns[before-1] = nil
	e.conns = e.conns[:before-1]
	switch {
	case before == 2:
		s.m.dupKeys.Add(-1)
		s.m.dupConns.Add(-2)
		e.conns[0].isDup.Store(false)
	case before > 2:
		s.m.dupConns.Add(-1)
	}
	if len(e.conns) > 0 {
		e.active.Store(e.conns[len(e.conns)-1])
	} else {
		e.active.Store(nil)
		s.numLocalKeys--
		for w := range s.watchers {
			if w != c {
				w.enqueueCtrl(ctrlMsg{typ: derp.FramePeerGone, key: c.key, reason: derp.PeerGoneDisconnected})
			}
		}
		if len(e.fwds) == 0 {
			s.removeEntryLocked(e)
		}
	}
	if _, ok := s.watchers[c]; ok {
		delete(s.watchers, c)
		s.m.watchers.Add(-1)
	}
	for k := range c.pendingSrc {
		if m := s.pendingRecv[k]; m != nil {
			delete(m, c)
			if len(m) == 0 {
				delete(s.pendingRecv, k)
			}
		}
		if cur := s.keys[k]; cur != nil && cur.receivers != nil {
			delete(cur.receivers, c)
		}
	}
	for k, se := range c.sawSrc {
		if se.receivers != nil {
			delete(se.receivers, c)
		}
		if cur := s.keys[k]; cur != nil && cur != se && cur.receivers != nil {
			delete(cur.receivers, c)
		}
	}
	s.m.curConns.Add(-1)
	if c.preferred {
		s.m.curHome.Add(-1)
	}
	if c.notIdeal {
		s.m.curNotIdeal.Add(-1)
	}
}

// newEntryLocked creates the registry entry for k, adopting connections
// that already received forwarded packets from k as its receivers.
func (s *Server) newEntryLocked(k derp.PublicKey) *keyEntry {
	e := &keyEntry{key: k}
	if m := s.pendingRecv[k]; m != nil {
		e.receivers = m
		delete(s.pendingRecv, k)
	}
	s.keys[k] = e
	return e
}

// removeEntryLocked deletes a key that is no longer reachable and tells
// everyone who received from it.
func (s *Server) removeEntryLocked(e *keyEntry) {
	delete(s.keys, e.key)
	e.dead.Store(true)
	for r := range e.receivers {
		r.enqueueCtrl(ctrlMsg{typ: derp.FramePeerGone, key: e.key, reason: derp.PeerGoneDisconnected})
	}
	e.receivers = nil
}

// noteActive makes c the selected connection of its key (last writer is
// active). Called for every frame read from a connection whose key has
// duplicates.
func (s *Server) noteActive(c *sclient) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := c.entry
	if c.unregistered || e.active.Load() == c {
		return
	}
	for i, x := range e.conns {
		if x == c {
			copy(e.conns[i:], e.conns[i+1:])
			e.conns[len(e.conns)-1] = c
			break
		}
	}
	e.active.Store(c)
}

// addWatcher subscribes a mesh connection to presence changes, starting
// with a PeerPresent for every key connected here.
func (s *Server) addWatcher(c *sclient) {
	if c.key == s.pub {
		return // our own mesh client connected to us
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.watchers[c]; ok || c.unregistered {
		return
	}
	for _, e := range s.keys {
		if a := e.active.Load(); a != nil {
			c.enqueueCtrl(ctrlMsg{typ: derp.FramePeerPresent, key: e.key, addr: a.remote, flags: a.flags})
		}
	}
	s.watchers[c] = struct{}{}
	s.m.watchers.Add(1)
}

// closePeer closes every connection of k (mesh ClosePeer).
func (s *Server) closePeer(k derp.PublicKey) {
	s.mu.RLock()
	var conns []*sclient
	if e := s.keys[k]; e != nil {
		conns = append(conns, e.conns...)
	}
	s.mu.RUnlock()
	for _, c := range conns {
		c.closeReason.CompareAndSwap(nil, &crClosePeerStr)
		go c.closeConn() // a TLS close may block on its alert write
	}
}

var crClosePeerStr = crClosePeer

// AddPacketForwarder registers fwd as a way to reach dst through another
// server of the region. Local connections always win over forwarders; with
// several forwarders the earliest registered one is used until removed.
func (s *Server) AddPacketForwarder(dst derp.PublicKey, fwd PacketForwarder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.keys[dst]
	if e == nil {
		e = s.newEntryLocked(dst)
	}
	for _, f := range e.fwds {
		if f == fwd {
			return
		}
	}
	e.fwds = append(e.fwds, fwd)
	if len(e.fwds) == 2 {
		s.m.multiFwdCreated.Inc()
	}
	e.fwd.Store(&fwdRef{e.fwds[0]})
}

// RemovePacketForwarder undoes AddPacketForwarder. If dst then has neither
// local connections nor forwarders, clients that received from it get
// PeerGone.
func (s *Server) RemovePacketForwarder(dst derp.PublicKey, fwd PacketForwarder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.keys[dst]
	if e == nil {
		return
	}
	idx := slices.Index(e.fwds, fwd)
	if idx < 0 {
		s.m.fwdDeleteOther.Inc()
		return
	}
	if len(e.fwds) == 2 {
		s.m.multiFwdDeleted.Inc()
	}
	e.fwds = append(e.fwds[:idx], e.fwds[idx+1:]...)
	if len(e.fwds) > 0 {
		e.fwd.Store(&fwdRef{e.fwds[0]})
		return
	}
	e.fwd.Store(nil)
	if len(e.conns) == 0 {
		s.removeEntryLocked(e)
	}
}

// trackHandshake records a connection that is still in its handshake so
// Close can interrupt it. It reports false if the server is closed.
func (s *Server) trackHandshake(nc net.Conn, add bool) bool {
	s.connsMu.Lock()
	defer s.connsMu.Unlock()
	if add {
		if s.closed.Load() {
			return false
		}
		s.handshaking[nc] = struct{}{}
		s.m.handshakesInProgress.Add(1)
		return true
	}
	delete(s.handshaking, nc)
	s.m.handshakesInProgress.Add(-1)
	return true
}

// keepAliveInterval returns the interval plus this connection's jitter.
func (s *Server) keepAliveInterval() time.Duration {
	return s.opts.KeepAlive + rand.N(s.opts.KeepAlive/12+1)
}

// TLSConns returns the number of established DERP connections over TLS
// that negotiated version v (tls.VersionTLS12, say), WebSocket ones
// included.
func (s *Server) TLSConns(v uint16) int64 {
	if i := s.tlsSlotOf(v); i >= 0 {
		return s.tlsConns[i].Load()
	}
	return 0
}

// noteTLSVersion counts c under TLS version v, if it is over TLS (v != 0).
func (s *Server) noteTLSVersion(c *sclient, v uint16) {
	if i := s.tlsSlotOf(v); i >= 0 {
		c.tlsSlot = int8(i)
		s.tlsConns[i].Add(1)
	}
}

// tlsSlotOf returns the tlsConns slot of TLS version v, or -1 (not TLS, or
// a version outside 1.0-1.3).
func (s *Server) tlsSlotOf(v uint16) int {
	if i := int(v) - tls.VersionTLS10; i >= 0 && i < len(s.tlsConns) {
		return i
	}
	return -1
}
