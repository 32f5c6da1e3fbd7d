package interop

import (
	"encoding/json"
	"io"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
)

// TestBootstrapDNS: with -bootstrap-dns-names, /bootstrap-dns answers the
// JSON object Tailscale's DNS fallback decodes (name to addresses), as
// derper does; the same test runs against derper. The name is localhost,
// resolved from the hosts file, so no query leaves the machine.
func TestBootstrapDNS(t *testing.T) {
	s := startServer(t, target.Options{ExtraArgs: []string{"-bootstrap-dns-names", "localhost"}})
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(s.HTTPURL() + "/bootstrap-dns?q=localhost")
		if err != nil {
			t.Fatal(err)
		}
		var m map[string][]netip.Addr // the type of Tailscale's dnsfallback answer
		err = json.NewDecoder(resp.Body).Decode(&m)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("%s, Content-Type %q", resp.Status, resp.Header.Get("Content-Type"))
		}
		if err == nil && len(m["localhost"]) > 0 {
			for _, a := range m["localhost"] {
				if !a.IsLoopback() {
					t.Errorf("localhost resolved to %v", a)
				}
			}
			if len(m) != 1 {
				t.Errorf("answer %v, want localhost only", m)
			}
			return
		}
		// derper sends an empty body until its first lookup is done.
		if time.Now().After(deadline) {
			t.Fatalf("no addresses for localhost within 10 s (last answer %v, %v)", m, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestBootstrapDNSUnpublished: an -unpublished-bootstrap-dns-names name is
// answered to a query for it and left out of the full answer, on xderpd
// and on derper. (No TXT record: the name is rolled out to every client.)
func TestBootstrapDNSUnpublished(t *testing.T) {
	s := startServer(t, target.Options{ExtraArgs: []string{"-unpublished-bootstrap-dns-names", "localhost"}})
	get := func(q string) (map[string][]netip.Addr, string) {
		t.Helper()
		resp, err := http.Get(s.HTTPURL() + "/bootstrap-dns" + q)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		var m map[string][]netip.Addr
		json.Unmarshal(body, &m)
		return m, string(body)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, body := get("?q=localhost")
		if len(m["localhost"]) > 0 {
			if len(m) != 1 {
				t.Errorf("answer %s, want localhost only", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no addresses for localhost within 10 s (last answer %q)", body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if m, body := get(""); len(m) != 0 {
		t.Errorf("the full answer %q lists the unpublished name", body)
	}
	if m, body := get("?q=other.example"); len(m) != 0 {
		t.Errorf("a query for another name got %q", body)
	}
	if kind != "reference" {
		for name, atLeast := range map[string]float64{"bootstrap_dns_unpublished_hits": 1, "bootstrap_dns_unpublished_misses": 1} {
			if v, err := s.Metric(t.Context(), name); err != nil || v < atLeast {
				t.Errorf("%s = %v (%v), want at least %v", name, v, err, atLeast)
			}
		}
	}
}
