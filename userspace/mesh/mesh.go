// Package mesh owns xderp's region mesh: the outgoing, privileged DERP
// connections from this node to every other node of its region.
//
// For each configured peer (a -mesh-with entry, or one address of a DNS
// name that resolves to several) it dials the peer's /derp endpoint, proves
// the pre-shared mesh key inside its ClientInfo (using the server's own key
// pair as its client key, as derper does), subscribes with WatchConns, and
// keeps the relay's forwarder table in step with the PeerPresent/PeerGone
// stream: every key present on the peer is registered with the relay with
// the peer as its PacketForwarder. Packets the relay hands to a peer are
// queued on a bounded per-peer queue and written, batched, by that peer's
// writer goroutine, so a slow or dead peer never blocks a sender; what
// cannot be queued is dropped and counted. Connections that break are
// re-established with exponential backoff and jitter; the keys learned
// through a broken connection are removed at once, which lets the relay send
// PeerGone to local clients for keys that left the region.
//
// The receiving side of the mesh protocol (accepting WatchConns,
// ForwardPacket and ClosePeer from mesh-key clients) belongs to the relay
// core, not to this package.
package mesh

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/metrics"
)

// Resolver looks up the addresses of a host name; *net.Resolver implements it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Options configures a Mesh. Zero durations and sizes take the stated
// defaults.
type Options struct {
	// Server is the relay whose forwarder table the mesh maintains.
	// Required.
	Server Relay
	// PrivateKey is the server's own key; it is used as the mesh client's
	// key, so peers see this node under its server key. Required.
	PrivateKey derp.PrivateKey
	// MeshKey is the pre-shared mesh key, 64 hex digits. Required.
	MeshKey string
	// Peers are the -mesh-with entries: "host", "host/dialhost" (derper's
	// forms, https on port 443 unless host carries a port), or a URL such
	// as "http://127.0.0.1:3340/derp" or "https://host:8443/derp". A host
	// name that resolves to several addresses makes one peer per address;
	// names are re-resolved every ResolveInterval. Entries that turn out to
	// be this node (same server key) are dropped.
	Peers []string
	// TLSConfig is used for https peers (RootCAs etc.); ServerName
	// defaults to the entry's host. Nil means system roots.
	TLSConfig *tls.Config
	// Logger receives per-peer events. Nil discards them.
	Logger *slog.Logger
	// Metrics receives the xderp_mesh_* families. Nil uses a private
	// registry.
	Metrics *metrics.Registry

	// QueueLen is the number of ForwardPacket frames queued per peer
	// before new ones are dropped (reason queue_full). Default 4096.
	QueueLen int
	// ResolveInterval is how often host names are re-resolved. Default
	// 30 s.
	ResolveInterval time.Duration
	// Resolver resolves host names. Default net.DefaultResolver.
	Resolver Resolver
	// DialTimeout bounds TCP, TLS, HTTP upgrade and the DERP handshake of
	// one connection attempt. Default 10 s.
	DialTimeout time.Duration
	// WriteTimeout bounds one batched write to a peer; a peer that does
	// not take the data in time is disconnected. Default 5 s.
	WriteTimeout time.Duration
	// ReadTimeout is how long a connection may stay silent (the remote
	// sends KeepAlive every 60 s) before it is considered dead. Default
	// 120 s.
	ReadTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the reconnect backoff, which
	// doubles per failed attempt and is jittered to [50%, 100%). Defaults
	// 100 ms and 5 s.
	ReconnectMin, ReconnectMax time.Duration
}

// Mesh maintains the mesh connections of one node.
type Mesh struct {
	opts    Options
	log     *slog.Logger
	met     *meshMetrics
	table   Relay
	pub     derp.PublicKey
	meshKey derp.MeshKey
	targets []*target

	queueLen int

	mu      sync.Mutex
	peers   map[string]*peer // by target index and address
	started bool
	closed  bool
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// New validates opts and returns a Mesh that does nothing until Start.
func New(opts Options) (*Mesh, error) {
	if opts.Server == nil {
		return nil, errors.New("mesh: Server is nil")
	}
	if opts.PrivateKey.IsZero() {
		return nil, errors.New("mesh: PrivateKey is not set")
	}
	mk, err := derp.ParseMeshKey(opts.MeshKey)
	if err != nil {
		return nil, fmt.Errorf("mesh: MeshKey: %w", err)
	}
	if mk.IsZero() {
		return nil, errors.New("mesh: MeshKey is all zeros")
	}
	m := &Mesh{
		opts:    opts,
		table:   opts.Server,
		pub:     opts.PrivateKey.Public(),
		meshKey: mk,
		peers:   make(map[string]*peer),
	}
	for i, s := range opts.Peers {
		t, err := parseTarget(s)
		if err != nil {
			return nil, fmt.Errorf("mesh: Peers[%d] %q: %w", i, s, err)
		}
		m.targets = append(m.targets, t)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&m.opts.ResolveInterval, 30*time.Second)
	def(&m.opts.DialTimeout, 10*time.Second)
	def(&m.opts.WriteTimeout, 5*time.Second)
	def(&m.opts.ReadTimeout, 120*time.Second)
	def(&m.opts.ReconnectMin, 100*time.Millisecond)
	def(&m.opts.ReconnectMax, 5*time.Second)
	if m.opts.ReconnectMax < m.opts.ReconnectMin {
		return nil, fmt.Errorf("mesh: ReconnectMax %v is below ReconnectMin %v", m.opts.ReconnectMax, m.opts.ReconnectMin)
	}
	m.queueLen = opts.QueueLen
	if m.queueLen <= 0 {
		m.queueLen = 4096
	}
	if m.opts.Resolver == nil {
		m.opts.Resolver = net.DefaultResolver
	}
	m.log = opts.Logger
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	reg := opts.Metrics
	if reg == nil {
		reg = metrics.NewRegistry()
	}
	m.met = newMeshMetrics(reg, m)
	return m, nil
}

// Start begins dialing every peer and, for host names, re-resolving them
// every ResolveInterval. It returns at once; it does nothing after Close or
// a previous Start.
func (m *Mesh) Start(ctx context.Context) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.started || m.closed {
		return
	}
	m.started = true
	ctx, m.cancel = context.WithCancel(ctx)
	for i, t := range m.targets {
		if a, ok := t.literal(); ok {
			m.addPeerLocked(ctx, i, t, a)
			continue
		}
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.resolveLoop(ctx, i, t)
		}()
	}
}

func peerID(i int, a netip.Addr) string { return strconv.Itoa(i) + "|" + a.String() }

func (m *Mesh) addPeerLocked(ctx context.Context, i int, t *target, a netip.Addr) {
	port, _ := strconv.ParseUint(t.port, 10, 16)
	p := newPeer(m, t, netip.AddrPortFrom(a, uint16(port)))
	m.peers[peerID(i, a)] = p
	p.start(ctx)
}

// resolveLoop keeps the peers of one named target equal to the name's
// current addresses. A failed lookup keeps the peers it already has.
func (m *Mesh) resolveLoop(ctx context.Context, i int, t *target) {
	failing := false
	for {
		lctx, cancel := context.WithTimeout(ctx, m.opts.DialTimeout)
		addrs, err := m.opts.Resolver.LookupNetIP(lctx, "ip", t.dialHost)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil || len(addrs) == 0 {
			if err == nil {
				err = errors.New("no addresses")
			}
			m.met.resolveErrors.Inc()
			if !failing {
				m.log.Warn("mesh peer name does not resolve; keeping current peers", "peer", t.raw, "err", err)
			}
			failing = true
		} else {
			failing = false
			m.syncPeers(ctx, i, t, addrs)
		}
		if !sleep(ctx, m.opts.ResolveInterval) {
			return
		}
	}
}

func (m *Mesh) syncPeers(ctx context.Context, i int, t *target, addrs []netip.Addr) {
	want := make(map[string]netip.Addr, len(addrs))
	for _, a := range addrs {
		a = a.Unmap()
		want[peerID(i, a)] = a
	}
	var gone []*peer
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	prefix := strconv.Itoa(i) + "|"
	for id, p := range m.peers {
		if _, ok := want[id]; !ok && len(id) > len(prefix) && id[:len(prefix)] == prefix {
			delete(m.peers, id)
			gone = append(gone, p)
		}
	}
	for id, a := range want {
		if _, ok := m.peers[id]; !ok {
			m.log.Info("mesh peer address added", "peer", t.raw, "addr", a)
			m.addPeerLocked(ctx, i, t, a)
		}
	}
	m.mu.Unlock()
	for _, p := range gone {
		m.log.Info("mesh peer address removed", "peer", p.name)
		p.stop()
	}
}

// Close stops every peer and waits until all keys learned from them have
// been removed from the relay. It is safe to call more than once.
func (m *Mesh) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	if m.cancel != nil {
		m.cancel()
	}
	m.mu.Unlock()
	m.wg.Wait() // resolvers: no peer is added after this
	m.mu.Lock()
	peers := make([]*peer, 0, len(m.peers))
	for _, p := range m.peers {
		peers = append(peers, p)
	}
	m.mu.Unlock()
	for _, p := range peers {
		p.stop()
	}
	return nil
}

// PeerAddrs returns the IP addresses of the current peers (not those found
// to be this node), sorted and without duplicates, for the XDP shaping
// exemption table and client admission.
func (m *Mesh) PeerAddrs() []netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]netip.Addr, 0, len(m.peers))
	for _, p := range m.peers {
		if !p.self.Load() {
			out = append(out, p.addr.Addr())
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// PeerStatus describes one peer for status pages and tests.
type PeerStatus struct {
	Name      string         // configured entry, plus @address for resolved names
	Addr      netip.AddrPort // address dialed
	Connected bool
	Self      bool // the peer is this node and was dropped
}

// Peers returns the status of every peer, sorted by name.
func (m *Mesh) Peers() []PeerStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]PeerStatus, 0, len(m.peers))
	for _, p := range m.peers {
		out = append(out, PeerStatus{Name: p.name, Addr: p.addr, Connected: p.up.Load(), Self: p.self.Load()})
	}
	slices.SortFunc(out, func(a, b PeerStatus) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return out
}
