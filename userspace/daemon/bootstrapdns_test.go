package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"slices"
	"testing"

	"github.com/xderp/xderp/userspace/metrics"
)

func TestBootstrapDNS(t *testing.T) {
	reg := metrics.NewRegistry()
	b := newBootstrapDNS([]string{"a.example", "b.example"}, slog.New(slog.DiscardHandler), reg)
	answers := map[string][]netip.Addr{}
	b.lookup = func(_ context.Context, name string) ([]netip.Addr, error) {
		if a, ok := answers[name]; ok {
			return slices.Clone(a), nil
		}
		return nil, errors.New("no such host")
	}
	get := func(q string) map[string][]netip.Addr {
		t.Helper()
		rec := httptest.NewRecorder()
		b.ServeHTTP(rec, httptest.NewRequest("GET", "/bootstrap-dns?q="+q, nil))
		if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json" || rec.Header().Get("Connection") != "close" {
			t.Fatalf("%d %v", rec.Code, rec.Header())
		}
		var m map[string][]netip.Addr
		if err := json.Unmarshal(rec.Body.Bytes(), &m); err != nil {
			t.Fatalf("body %q: %v", rec.Body, err)
		}
		return m
	}
	sorted := func(a []netip.Addr) []netip.Addr {
		a = slices.Clone(a)
		slices.SortFunc(a, netip.Addr.Compare)
		return a
	}

	// Before the first lookup: an empty object.
	if m := get("a.example"); len(m) != 0 {
		t.Fatalf("before any lookup: %v", m)
	}
	a := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	answers["a.example"] = a
	b.refresh(context.Background())
	m := get("a.example")
	if len(m) != 1 || !slices.Equal(sorted(m["a.example"]), sorted(a)) {
		t.Fatalf("after one lookup: %v", m)
	}
	get("b.example") // configured, not resolved yet
	get("c.example") // not configured

	// A failed lookup keeps the previous addresses; a later success adds.
	delete(answers, "a.example")
	answers["b.example"] = []netip.Addr{netip.MustParseAddr("192.0.2.2")}
	b.refresh(context.Background())
	m = get("b.example")
	if len(m) != 2 || !slices.Equal(sorted(m["a.example"]), sorted(a)) || m["b.example"][0] != netip.MustParseAddr("192.0.2.2") {
		t.Fatalf("after a failed and a new lookup: %v", m)
	}
	for c, want := range map[*metrics.Counter]uint64{b.requests: 5, b.hits: 2, b.misses: 2, b.unknown: 1} {
		if c.Value() != want {
			t.Errorf("counter %v, want %d (requests %d hits %d misses %d unknown %d)", c.Value(), want,
				b.requests.Value(), b.hits.Value(), b.misses.Value(), b.unknown.Value())
		}
	}
}
