package interop

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// TestAdmissionWebhook: with -verify-client-url, the server asks a webhook
// about every client in Tailscale's own request format
// (tailcfg.DERPAdmitClientRequest, decoded here with Tailscale's type) and
// admits only those it allows. Tailscale's client, once admitted, relays as
// usual; a refused one is disconnected before it can receive anything.
func TestAdmissionWebhook(t *testing.T) {
	allowedA, allowedB, refused := key.NewNode(), key.NewNode(), key.NewNode()
	var mu sync.Mutex
	asked := map[key.NodePublic]netip.Addr{}
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req tailcfg.DERPAdmitClientRequest
		if r.Method != http.MethodPost {
			t.Errorf("webhook called with %s", r.Method)
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			t.Errorf("webhook request is not a DERPAdmitClientRequest: %v", err)
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		mu.Lock()
		asked[req.NodePublic] = req.Source
		mu.Unlock()
		allow := req.NodePublic == allowedA.Public() || req.NodePublic == allowedB.Public()
		json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow})
	}))
	t.Cleanup(hook.Close)

	s := startServer(t, target.Options{ExtraArgs: []string{"-verify-client-url", hook.URL}})
	a, b := newPeerKey(t, s, allowedA), newPeerKey(t, s, allowedB)
	syncPeers(t, a, b)

	// The client's Connect only sends its key; a refusal shows as the
	// server closing the connection.
	r := newPeerKey(t, s, refused)
	if m, err := r.next(10*time.Second, skipControl); err == nil {
		t.Fatalf("refused client received %T", m)
	}

	mu.Lock()
	defer mu.Unlock()
	for _, k := range []key.NodePrivate{allowedA, allowedB, refused} {
		src, ok := asked[k.Public()]
		if !ok {
			t.Errorf("webhook not asked about %v", k.Public().ShortString())
		} else if src != netip.MustParseAddr("127.0.0.1") {
			t.Errorf("webhook asked about %v from %v, want 127.0.0.1", k.Public().ShortString(), src)
		}
	}
	if kind != "reference" {
		for result, want := range map[string]float64{"allowed": 2, "denied": 1} {
			if v, err := s.Metric(t.Context(), `xderp_admission_requests_total{via="webhook",result="`+result+`"}`); err != nil || v != want {
				t.Errorf("xderp_admission_requests_total{via=webhook,result=%q} = %v (%v), want %v", result, v, err, want)
			}
		}
	}
}
