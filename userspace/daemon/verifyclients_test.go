package daemon

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/metrics"
)

// serveUnix serves h on a Unix socket in a fresh directory and returns the
// socket's path. (The interop module checks the same requests against
// Tailscale's own LocalAPI; this covers the answers it cannot be made to
// give, such as an old release's.)
func serveUnix(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tailscaled.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return path
}

func TestVerifyClientsThroughTailscaled(t *testing.T) {
	priv, _ := derp.NewPrivateKey()
	key := priv.Public()
	var answer func(w http.ResponseWriter)
	socket := serveUnix(t, func(w http.ResponseWriter, r *http.Request) {
		// The request Tailscale's own LocalAPI client sends for WhoIsNodeKey.
		if r.Method != http.MethodGet || r.Host != "local-tailscaled.sock" || r.URL.Path != "/localapi/v0/whois" ||
			r.URL.Query().Get("addr") != "nodekey:"+key.String() || r.Header.Get("Origin") != "" || r.Referer() != "" {
			t.Errorf("request %s Host %q %s", r.Method, r.Host, r.URL)
		}
		answer(w)
	})

	for _, tc := range []struct {
		name     string
		socket   string
		answer   func(w http.ResponseWriter)
		admitted bool
		result   string
		errHas   string
	}{
		{"known", socket, func(w http.ResponseWriter) { io.WriteString(w, `{"Node":{"ID":1}}`) }, true, admitAllowed, ""},
		{"unknown", socket, func(w http.ResponseWriter) { http.Error(w, "no match for IP:port", http.StatusNotFound) }, false, admitDenied, "not found in local tailscaled"},
		{"old tailscaled", socket, func(w http.ResponseWriter) { http.Error(w, "invalid 'addr' parameter", http.StatusBadRequest) }, false, admitBadResponse, "too old"},
		{"forbidden", socket, func(w http.ResponseWriter) { http.Error(w, "whois access denied", http.StatusForbidden) }, false, admitBadResponse, "whois access denied"},
		{"no tailscaled", filepath.Join(t.TempDir(), "none.sock"), nil, false, admitUnreachable, "tailscaled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			answer = tc.answer
			var logs bytes.Buffer
			check := newTailscaledCheck(tc.socket, slog.New(slog.NewTextHandler(&logs, nil)), newAdmissionMetric(metrics.NewRegistry()))
			err := check.admit(context.Background(), key, &derp.ClientInfo{}, netip.MustParseAddrPort("192.0.2.1:1"))
			if admitted := err == nil; admitted != tc.admitted {
				t.Fatalf("admitted %v (err %v), want %v", admitted, err, tc.admitted)
			}
			if err != nil && !strings.Contains(err.Error(), tc.errHas) {
				t.Errorf("error %q does not say %q", err, tc.errHas)
			}
			checkCountedOnce(t, check.results, tc.result)
			if logged := strings.Contains(logs.String(), "tailscaled unreachable"); logged != (tc.result == admitUnreachable) {
				t.Errorf("outage logged %v for %s: %q", logged, tc.result, logs.String())
			}
		})
	}
}

func TestVerifyClientsStartupLine(t *testing.T) {
	var state atomic.Value
	state.Store("Running")
	socket := serveUnix(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/localapi/v0/status" || r.URL.Query().Get("peers") != "false" {
			t.Errorf("request %s", r.URL)
		}
		io.WriteString(w, `{"BackendState":"`+state.Load().(string)+`","Self":{"DNSName":"relay.tail1.ts.net."}}`)
	})
	for _, tc := range []struct {
		socket, state, want string
	}{
		{socket, "Running", `level=INFO msg="-verify-clients: admitting nodes known to tailscaled"`},
		{socket, "NeedsLogin", `state=NeedsLogin`},
		{filepath.Join(t.TempDir(), "none.sock"), "", "tailscaled does not answer"},
	} {
		state.Store(tc.state)
		var logs bytes.Buffer
		log := slog.New(slog.NewTextHandler(&logs, nil))
		newTailscaledCheck(tc.socket, log, newAdmissionMetric(metrics.NewRegistry())).logStartup(context.Background(), log)
		if !strings.Contains(logs.String(), tc.want) {
			t.Errorf("state %q: log %q does not say %q", tc.state, logs.String(), tc.want)
		}
	}
}

func TestAdmissionChainStopsAtFirstRefusal(t *testing.T) {
	var asked []string
	check := func(name string, refuse bool) func(context.Context, derp.PublicKey, *derp.ClientInfo, netip.AddrPort) error {
		return func(context.Context, derp.PublicKey, *derp.ClientInfo, netip.AddrPort) error {
			asked = append(asked, name)
			if refuse {
				return io.ErrUnexpectedEOF
			}
			return nil
		}
	}
	if chainAdmit() != nil {
		t.Error("no checks should mean no admission hook")
	}
	admit := chainAdmit(check("tailscaled", true), check("webhook", false))
	if err := admit(context.Background(), derp.PublicKey{}, nil, netip.AddrPort{}); err == nil {
		t.Error("admitted although the first check refused")
	}
	admit = chainAdmit(check("tailscaled", false), check("webhook", false))
	if err := admit(context.Background(), derp.PublicKey{}, nil, netip.AddrPort{}); err != nil {
		t.Error(err)
	}
	if got := strings.Join(asked, ","); got != "tailscaled,tailscaled,webhook" {
		t.Errorf("asked %s", got)
	}
}

// /debug/check verifies this machine's own node key through tailscaled,
// and reports the registry's check, with one line per part.
func TestDebugCheck(t *testing.T) {
	selfPriv, _ := derp.NewPrivateKey()
	self := selfPriv.Public()
	var known atomic.Bool
	known.Store(true)
	socket := serveUnix(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/localapi/v0/status":
			io.WriteString(w, `{"BackendState":"Running","Self":{"DNSName":"relay.tail1.ts.net.","PublicKey":"nodekey:`+self.String()+`"}}`)
		case "/localapi/v0/whois":
			if known.Load() && r.URL.Query().Get("addr") == "nodekey:"+self.String() {
				io.WriteString(w, `{"Node":{"ID":1}}`)
				return
			}
			http.Error(w, "no match for IP:port", http.StatusNotFound)
		}
	})
	d := startDaemon(t, "-verify-clients", "-socket", socket)
	get := func(header ...string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+d.Addr().String()+"/debug/check", nil)
		if len(header) == 2 {
			req.Header.Set(header[0], header[1])
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	if code, body := get(); code != http.StatusOK || body != "ok derp\nok tailscaled\nconsistency check okay\n" {
		t.Errorf("healthy: %d %q", code, body)
	}
	known.Store(false)
	code, body := get()
	if code != http.StatusInternalServerError || !strings.Contains(body, "ok derp\n") ||
		!strings.Contains(body, "FAIL tailscaled: verifying this node's own key: peer "+self.ShortString()+" not authorized (not found in local tailscaled)") {
		t.Errorf("own key unknown: %d %q", code, body)
	}
	if code, _ := get("X-Forwarded-For", "192.0.2.7"); code != http.StatusForbidden {
		t.Errorf("proxied request: %d, want 403 as for /metrics", code)
	}
}
