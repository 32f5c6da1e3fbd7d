package daemon

import (
	"context"
	"encoding/json"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/xderp/xderp/userspace/metrics"
)

// /bootstrap-dns, as derper serves it: a Tailscale client whose own DNS
// fails asks the DERP servers of its map for the addresses of names it
// needs (its control server, say), and gets a JSON object of name to
// addresses. The names are -bootstrap-dns-names, resolved at start and
// every 10 minutes.

const (
	bootstrapRefresh = 10 * time.Minute // derper's
	bootstrapTimeout = time.Minute      // per refresh
)

type bootstrapDNS struct {
	names  []string
	lookup func(ctx context.Context, name string) ([]netip.Addr, error)
	log    *slog.Logger

	cache atomic.Pointer[bootstrapAnswer]

	requests, hits, misses, unknown *metrics.Counter
}

// bootstrapAnswer is one refresh's result and its JSON encoding.
type bootstrapAnswer struct {
	addrs map[string][]netip.Addr
	json  []byte
}

func newBootstrapDNS(names []string, log *slog.Logger, reg *metrics.Registry) *bootstrapDNS {
	var r net.Resolver
	b := &bootstrapDNS{
		names: names,
		lookup: func(ctx context.Context, name string) ([]netip.Addr, error) {
			return r.LookupNetIP(ctx, "ip", name)
		},
		log:      log,
		requests: reg.Counter("bootstrap_dns_requests", "Requests to /bootstrap-dns"),
		hits:     reg.Counter("bootstrap_dns_published_hits", "/bootstrap-dns queries (?q=) for a configured name that has addresses"),
		misses:   reg.Counter("bootstrap_dns_published_misses", "/bootstrap-dns queries (?q=) for a configured name whose lookup has not succeeded"),
		unknown:  reg.Counter("bootstrap_dns_unpublished_misses", "/bootstrap-dns queries (?q=) for a name that is not configured"),
	}
	b.cache.Store(&bootstrapAnswer{json: []byte("{}")})
	return b
}

// run refreshes the answer until ctx ends.
func (b *bootstrapDNS) run(ctx context.Context) {
	if len(b.names) == 0 {
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

// refresh resolves every name. A name whose lookup fails keeps the
// addresses it had, so a resolver outage does not empty the answer that
// exists for the case where DNS fails.
func (b *bootstrapDNS) refresh(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, bootstrapTimeout)
	defer cancel()
	prev := b.cache.Load().addrs
	next := make(map[string][]netip.Addr, len(b.names))
	for _, name := range b.names {
		addrs, err := b.lookup(ctx, name)
		if err != nil || len(addrs) == 0 {
			b.log.Warn("bootstrap DNS lookup failed; the previous addresses stay", "name", name, "err", err)
			if old := prev[name]; len(old) > 0 {
				next[name] = old
			}
			continue
		}
		for i, a := range addrs {
			addrs[i] = a.Unmap()
		}
		// Shuffled once per refresh, as derper does, so that clients do
		// not all pick the same (or always the IPv6) address.
		rand.Shuffle(len(addrs), func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
		next[name] = addrs
	}
	j, err := json.Marshal(next)
	if err != nil {
		return
	}
	b.cache.Store(&bootstrapAnswer{addrs: next, json: j})
}

func (b *bootstrapDNS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.requests.Inc()
	ans := b.cache.Load()
	if q := r.URL.Query().Get("q"); q != "" {
		switch addrs, ok := ans.addrs[q]; {
		case ok && len(addrs) > 0:
			b.hits.Inc()
		case b.configured(q):
			b.misses.Inc()
		default:
			b.unknown.Inc()
		}
	}
	w.Header().Set("Content-Type", "application/json")
	// Asked once, across regions: no point keeping the connection.
	w.Header().Set("Connection", "close")
	w.Write(ans.json)
}

func (b *bootstrapDNS) configured(name string) bool {
	for _, n := range b.names {
		if n == name {
			return true
		}
	}
	return false
}
