package daemon

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/metrics"
)

func TestAdmissionWebhook(t *testing.T) {
	priv, _ := derp.NewPrivateKey()
	key := priv.Public()
	remote := netip.MustParseAddrPort("192.0.2.1:41641")
	var answer func(w http.ResponseWriter)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The request derper sends: a JSON POST of the key and the IP.
		var req map[string]any
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s with Content-Type %q", r.Method, r.Header.Get("Content-Type"))
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			t.Errorf("request body: %v", err)
		}
		if req["NodePublic"] != "nodekey:"+key.String() || req["Source"] != "192.0.2.1" || len(req) != 2 {
			t.Errorf("request %v", req)
		}
		answer(w)
	}))
	t.Cleanup(hook.Close)
	gone, _ := net.Listen("tcp", "127.0.0.1:0")
	goneURL := "http://" + gone.Addr().String() + "/admit"
	gone.Close() // nothing listens there: unreachable

	for _, tc := range []struct {
		name     string
		url      string
		failOpen bool
		answer   func(w http.ResponseWriter)
		admitted bool
		result   string
	}{
		{"allow", hook.URL, false, func(w http.ResponseWriter) { io.WriteString(w, `{"Allow":true}`) }, true, admitAllowed},
		{"deny", hook.URL, true, func(w http.ResponseWriter) { io.WriteString(w, `{"Allow":false}`) }, false, admitDenied},
		{"no verdict", hook.URL, true, func(w http.ResponseWriter) { io.WriteString(w, `{}`) }, false, admitDenied},
		{"forbidden", hook.URL, true, func(w http.ResponseWriter) { w.WriteHeader(http.StatusForbidden) }, false, admitBadResponse},
		{"allow with error status", hook.URL, true, func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, `{"Allow":true}`)
		}, false, admitBadResponse},
		{"redirect", hook.URL, true, func(w http.ResponseWriter) {
			w.Header().Set("Location", "/elsewhere")
			w.WriteHeader(http.StatusFound)
		}, false, admitBadResponse},
		{"garbage", hook.URL, true, func(w http.ResponseWriter) { io.WriteString(w, "yes") }, false, admitBadResponse},
		{"unreachable, fail open", goneURL, true, nil, true, admitUnreachable},
		{"unreachable, fail closed", goneURL, false, nil, false, admitUnreachable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			answer = tc.answer
			reg := metrics.NewRegistry()
			a := newAdmission(tc.url, tc.failOpen, slog.New(slog.DiscardHandler), newAdmissionMetric(reg))
			err := a.admit(context.Background(), key, &derp.ClientInfo{}, remote)
			if admitted := err == nil; admitted != tc.admitted {
				t.Fatalf("admitted %v (err %v), want %v", admitted, err, tc.admitted)
			}
			checkCountedOnce(t, a.results, tc.result)
		})
	}
}

// checkCountedOnce asserts that of one check's result counters, only
// result counted, and once.
func checkCountedOnce(t *testing.T, results map[string]*metrics.Counter, result string) {
	t.Helper()
	for r, c := range results {
		want := uint64(0)
		if r == result {
			want = 1
		}
		if c.Value() != want {
			t.Errorf("result %s counted %d, want %d", r, c.Value(), want)
		}
	}
}
