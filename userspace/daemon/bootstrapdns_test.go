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
	b := newBootstrapDNS([]string{"a.example", "b.example"}, nil, slog.New(slog.DiscardHandler), reg)
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

func TestBootstrapDNSUnpublished(t *testing.T) {
	reg := metrics.NewRegistry()
	b := newBootstrapDNS([]string{"pub.example"}, []string{"all.example", "some.example/pct.example"}, slog.New(slog.DiscardHandler), reg)
	addr := map[string]netip.Addr{
		"pub.example":  netip.MustParseAddr("192.0.2.1"),
		"all.example":  netip.MustParseAddr("192.0.2.2"),
		"some.example": netip.MustParseAddr("2001:db8::3"),
	}
	b.lookup = func(_ context.Context, name string) ([]netip.Addr, error) {
		if a, ok := addr[name]; ok {
			return []netip.Addr{a}, nil
		}
		return nil, errors.New("no such host")
	}
	var txt []string
	var txtErr error
	b.lookupTXT = func(_ context.Context, name string) ([]string, error) {
		if name != "pct.example" {
			t.Errorf("TXT lookup of %q", name)
		}
		return txt, txtErr
	}
	get := func(q, from string) map[string][]netip.Addr {
		t.Helper()
		req := httptest.NewRequest("GET", "/bootstrap-dns?q="+q, nil)
		req.RemoteAddr = from
		rec := httptest.NewRecorder()
		b.ServeHTTP(rec, req)
		var m map[string][]netip.Addr
		if err := json.Unmarshal(rec.Body.Bytes(), &m); err != nil {
			t.Fatalf("body %q: %v", rec.Body, err)
		}
		return m
	}
	only := func(m map[string][]netip.Addr, name string) bool {
		return len(m) == 1 && len(m[name]) == 1 && m[name][0] == addr[name]
	}
	const client = "198.51.100.7:41641"

	txt = []string{"v=1", "0"} // the first value in range counts
	b.refresh(context.Background())
	if m := get("", client); !only(m, "pub.example") {
		t.Errorf("without a query: %v, want the published names only", m)
	}
	if m := get("all.example", client); !only(m, "all.example") {
		t.Errorf("unpublished name without a percentage: %v, want that name only", m)
	}
	if m := get("some.example", client); !only(m, "pub.example") {
		t.Errorf("rolled out to 0%%: %v, want the published answer", m)
	}

	txt = []string{"100"}
	b.refresh(context.Background())
	if m := get("some.example", client); !only(m, "some.example") {
		t.Errorf("rolled out to 100%%: %v", m)
	}
	// A failed TXT lookup keeps the percentage read before.
	txtErr = errors.New("SERVFAIL")
	b.refresh(context.Background())
	if m := get("some.example", client); !only(m, "some.example") {
		t.Errorf("after a failed TXT lookup: %v", m)
	}

	// At 50% about half the clients are answered, each always the same way.
	txt, txtErr = []string{"50"}, nil
	b.refresh(context.Background())
	selected := 0
	for i := range 1000 {
		from := netip.AddrPortFrom(netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}), 41641).String()
		first := only(get("some.example", from), "some.example")
		if again := only(get("some.example", from), "some.example"); again != first {
			t.Fatalf("client %s answered differently twice", from)
		}
		if first {
			selected++
		}
	}
	if selected < 400 || selected > 600 {
		t.Errorf("50%% rollout selected %d of 1000 clients", selected)
	}
	if b.unpubHits.Value() == 0 || b.unpubPercentMisses.Value() == 0 {
		t.Errorf("unpublished hits %d, percent misses %d", b.unpubHits.Value(), b.unpubPercentMisses.Value())
	}
}

func TestClientSelected(t *testing.T) {
	ip := netip.MustParseAddr("203.0.113.9")
	if clientSelected(ip, 0) || !clientSelected(ip, 1) || clientSelected(netip.Addr{}, 0.99) {
		t.Error("the edges: 0 selects none, 1 selects all, no address is never selected")
	}
	// Monotonic: a client selected at p stays selected at every larger p.
	was := false
	for p := 0.01; p <= 1; p += 0.01 {
		now := clientSelected(ip, p)
		if was && !now {
			t.Fatalf("selected below %v but not at it", p)
		}
		was = now
	}
}
