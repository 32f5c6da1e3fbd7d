package interop

import (
	"encoding/json"
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
