package daemon

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/xderp/xderp/userspace/metrics"
)

// /bootstrap-dns, as derper serves it: a Tailscale client whose own DNS
// fails asks the DERP servers of its map for the addresses of names it
// needs (its control server, say), and gets a JSON object of name to
// addresses. The names are -bootstrap-dns-names, resolved at start and
// every 10 minutes.
//
// -unpublished-bootstrap-dns-names are answered only to a query for the
// name itself (?q=name), and only to the share of clients that the name's
// rollout percentage selects: an entry "name/txtname" reads the percentage
// (0-100) from txtname's TXT record, a plain "name" is answered to all.
// Which clients are selected depends only on the client's IP address, with
// derper's generator, so every node of a region, xderp or derper, gives a
// client the same answer. A client not selected gets the published answer.

const (
	bootstrapRefresh = 10 * time.Minute // derper's
	bootstrapTimeout = time.Minute      // per refresh
)

type bootstrapDNS struct {
	names     []string
	unpub     []unpublishedName
	lookup    func(ctx context.Context, name string) ([]netip.Addr, error)
	lookupTXT func(ctx context.Context, name string) ([]string, error)
	log       *slog.Logger

	cache atomic.Pointer[bootstrapAnswer]

	requests, hits, misses, unknown *metrics.Counter
	unpubHits, unpubPercentMisses   *metrics.Counter
}

// unpublishedName is one -unpublished-bootstrap-dns-names entry.
type unpublishedName struct {
	name, txt string // txt "": answered to every client
}

// unpublishedEntry is an unpublished name's current answer.
type unpublishedEntry struct {
	addrs   []netip.Addr
	percent float64 // share of clients answered, 0..1
	json    []byte  // {"name": [...]}
}

// bootstrapAnswer is one refresh's result and its JSON encoding.
type bootstrapAnswer struct {
	addrs map[string][]netip.Addr
	json  []byte
	unpub map[string]unpublishedEntry
}

// parseUnpublished splits "name" and "name/txtname" entries.
func parseUnpublished(entries []string) []unpublishedName {
	out := make([]unpublishedName, 0, len(entries))
	for _, e := range entries {
		name, txt, _ := strings.Cut(e, "/")
		out = append(out, unpublishedName{name: name, txt: txt})
	}
	return out
}

func newBootstrapDNS(names, unpublished []string, log *slog.Logger, reg *metrics.Registry) *bootstrapDNS {
	var r net.Resolver
	b := &bootstrapDNS{
		names: names,
		unpub: parseUnpublished(unpublished),
		lookup: func(ctx context.Context, name string) ([]netip.Addr, error) {
			return r.LookupNetIP(ctx, "ip", name)
		},
		lookupTXT:          r.LookupTXT,
		log:                log,
		requests:           reg.Counter("bootstrap_dns_requests", "Requests to /bootstrap-dns"),
		hits:               reg.Counter("bootstrap_dns_published_hits", "/bootstrap-dns queries (?q=) for a configured name that has addresses"),
		misses:             reg.Counter("bootstrap_dns_published_misses", "/bootstrap-dns queries (?q=) for a configured name whose lookup has not succeeded"),
		unknown:            reg.Counter("bootstrap_dns_unpublished_misses", "/bootstrap-dns queries (?q=) for a name that is not configured, or unpublished without addresses yet"),
		unpubHits:          reg.Counter("bootstrap_dns_unpublished_hits", "/bootstrap-dns queries (?q=) for an unpublished name that has addresses"),
		unpubPercentMisses: reg.Counter("bootstrap_dns_unpublished_percent_misses", "/bootstrap-dns queries (?q=) for an unpublished name from a client its rollout percentage leaves out"),
	}
	b.cache.Store(&bootstrapAnswer{json: []byte("{}")})
	return b
}

// run refreshes the answer until ctx ends.
func (b *bootstrapDNS) run(ctx context.Context) {
	if len(b.names) == 0 && len(b.unpub) == 0 {
		return
	}
	t := time.NewTicker(bootstrapRefresh)
	defer t.Stop()
	for {
		b.refresh(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refresh resolves every name (see resolve for a failed lookup).
func (b *bootstrapDNS) refresh(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, bootstrapTimeout)
	defer cancel()
	prev, prevUnpub := b.cache.Load().addrs, b.cache.Load().unpub
	next := make(map[string][]netip.Addr, len(b.names))
	for _, name := range b.names {
		if addrs := b.resolve(ctx, name, prev[name]); len(addrs) > 0 {
			next[name] = addrs
		}
	}
	j, err := json.Marshal(next)
	if err != nil {
		return
	}
	b.cache.Store(&bootstrapAnswer{addrs: next, json: j, unpub: b.refreshUnpublished(ctx, prevUnpub)})
}

// resolve looks name up; when that fails it keeps old, so a resolver
// outage does not empty the answer meant for clients whose DNS fails.
func (b *bootstrapDNS) resolve(ctx context.Context, name string, old []netip.Addr) []netip.Addr {
	addrs, err := b.lookup(ctx, name)
	if err != nil || len(addrs) == 0 {
		b.log.Warn("bootstrap DNS lookup failed; the previous addresses stay", "name", name, "err", err)
		return old
	}
	for i, a := range addrs {
		addrs[i] = a.Unmap()
	}
	// Shuffled once per refresh, as derper does, so that clients do not
	// all pick the same (or always the IPv6) address.
	rand.Shuffle(len(addrs), func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
	return addrs
}

// refreshUnpublished resolves the unpublished names and their rollout
// percentages. As for published names, a failed lookup keeps what the
// name had; a percentage that was never read is 0 (not rolled out).
func (b *bootstrapDNS) refreshUnpublished(ctx context.Context, prev map[string]unpublishedEntry) map[string]unpublishedEntry {
	out := make(map[string]unpublishedEntry, len(b.unpub))
	for _, u := range b.unpub {
		old := prev[u.name]
		e := unpublishedEntry{addrs: b.resolve(ctx, u.name, old.addrs), percent: old.percent}
		if u.txt == "" {
			e.percent = 1
		} else if p, err := b.rolloutPercent(ctx, u.txt); err != nil {
			b.log.Warn("bootstrap DNS rollout percentage not read; the previous one stays", "name", u.name, "txt", u.txt, "percent", e.percent*100, "err", err)
		} else {
			e.percent = p
		}
		if len(e.addrs) == 0 {
			continue
		}
		j, err := json.Marshal(map[string][]netip.Addr{u.name: e.addrs})
		if err != nil {
			continue
		}
		e.json = j
		out[u.name] = e
	}
	return out
}

// rolloutPercent reads a 0-100 percentage from a TXT record.
func (b *bootstrapDNS) rolloutPercent(ctx context.Context, name string) (float64, error) {
	vals, err := b.lookupTXT(ctx, name)
	if err != nil {
		return 0, err
	}
	for _, v := range vals {
		if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && n >= 0 && n <= 100 {
			return float64(n) / 100, nil
		}
	}
	return 0, fmt.Errorf("no TXT value from 0 to 100 in %q", vals)
}

// clientSelected reports whether the client at ip falls within percent
// (0..1). The draw is derper's: the first value of a PCG generator seeded
// with the two little-endian halves of the 16-byte address, so a client
// gets the same answer from every node of a mixed region.
func clientSelected(ip netip.Addr, percent float64) bool {
	switch {
	case percent <= 0 || !ip.IsValid():
		return false
	case percent >= 1:
		return true
	}
	b := ip.As16()
	r := rand.New(rand.NewPCG(binary.LittleEndian.Uint64(b[:8]), binary.LittleEndian.Uint64(b[8:])))
	return percent > r.Float64()
}

func (b *bootstrapDNS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.requests.Inc()
	ans := b.cache.Load()
	w.Header().Set("Content-Type", "application/json")
	// Asked once, across regions: no point keeping the connection.
	w.Header().Set("Connection", "close")
	if q := r.URL.Query().Get("q"); q != "" {
		if e, ok := ans.unpub[q]; ok {
			b.unpubHits.Inc()
			if clientSelected(remoteIP(r), e.percent) {
				w.Write(e.json) // only the name asked for
				return
			}
			b.unpubPercentMisses.Inc()
		}
		switch addrs, ok := ans.addrs[q]; {
		case ok && len(addrs) > 0:
			b.hits.Inc()
		case b.configured(q):
			b.misses.Inc()
		default:
			b.unknown.Inc()
		}
	}
	w.Write(ans.json)
}

// remoteIP is the request's client address (the zero Addr if unknown,
// which no percentage below 100 selects).
func remoteIP(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

func (b *bootstrapDNS) configured(name string) bool {
	for _, n := range b.names {
		if n == name {
			return true
		}
	}
	return false
}
