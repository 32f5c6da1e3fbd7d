package daemon

import (
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"strings"

	"github.com/xderp/xderp/userspace/metrics"
)

// Handlers shared by the main listener and the port-80 listener.

// probeHandler answers /derp/probe and /derp/latency-check, which clients use
// to measure HTTPS latency.
func probeHandler(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		w.Header().Set("Access-Control-Allow-Origin", "*")
		w.WriteHeader(http.StatusOK)
	default:
		http.Error(w, "bogus probe method", http.StatusMethodNotAllowed)
	}
}

// maxChallengeLen bounds the captive-portal challenge we echo.
const maxChallengeLen = 64

// generate204 serves captive-portal checks: 204, and the challenge echoed in
// X-Tailscale-Response when it is short and made of safe characters.
func generate204(w http.ResponseWriter, r *http.Request) {
	if ch := r.Header.Get("X-Tailscale-Challenge"); ch != "" && validChallenge(ch) {
		w.Header().Set("X-Tailscale-Response", "response "+ch)
	}
	w.Header().Set("Cache-Control", "no-cache, no-store, must-revalidate, no-transform, max-age=0")
	w.WriteHeader(http.StatusNoContent)
}

func validChallenge(s string) bool {
	if len(s) > maxChallengeLen {
		return false
	}
	for _, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '-', c == '_', c == ':':
		default:
			return false
		}
	}
	return true
}

func robots(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("User-agent: *\nDisallow: /\n"))
}

func browserHeaders(h http.Header) {
	h.Set("Strict-Transport-Security", "max-age=63072000; includeSubDomains")
	h.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'; form-action 'none'; base-uri 'self'; block-all-mixed-content; plugin-types 'none'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
}

const homePage = `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>DERP relay</title></head>
<body>
<h1>DERP</h1>
<p>This is a <a href="https://tailscale.com/kb/1232/derp-servers">DERP</a> relay server for Tailscale clients, run by xderp.</p>
<p>It relays encrypted WireGuard packets and answers STUN; there is nothing to see here.</p>
<p>Status: %STATUS%</p>
</body></html>
`

// homeHandler serves "/" per -home: the built-in page, an empty page, or a redirect.
func homeHandler(home string, derpEnabled bool) http.HandlerFunc {
	status := "enabled"
	if !derpEnabled {
		status = "disabled"
	}
	page := strings.Replace(homePage, "%STATUS%", status, 1)
	return func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		browserHeaders(w.Header())
		switch {
		case home == "blank":
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			w.WriteHeader(http.StatusOK)
		case strings.HasPrefix(home, "http://"), strings.HasPrefix(home, "https://"):
			http.Redirect(w, r, home, http.StatusFound)
		default:
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			w.Write([]byte(page))
		}
	}
}

// metricsHandler serves the Prometheus text page to loopback clients and to
// the prefixes in allow. A request that came through a proxy
// (X-Forwarded-For) is refused: the proxy's loopback address proves nothing.
func metricsHandler(reg *metrics.Registry, allow func() *[]netip.Prefix) http.HandlerFunc {
	return restricted(allow, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		reg.WriteText(w)
	})
}

// restricted serves h only to loopback and the -metrics-allow prefixes
// (never to a request relayed with X-Forwarded-For); others get 403.
func restricted(allow func() *[]netip.Prefix, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !metricsAllowed(r, *allow()) {
			http.Error(w, "access denied", http.StatusForbidden)
			return
		}
		h(w, r)
	}
}

// debugHandlers mounts Go's profiler under /debug/pprof/, restricted as
// the metrics are: a relay misbehaving in production can be profiled where
// it runs (go tool pprof http://127.0.0.1:PORT/debug/pprof/profile).
func debugHandlers(mux *http.ServeMux, allow func() *[]netip.Prefix) {
	mux.HandleFunc("/debug/pprof/", restricted(allow, pprof.Index))
	mux.HandleFunc("/debug/pprof/cmdline", restricted(allow, pprof.Cmdline))
	mux.HandleFunc("/debug/pprof/profile", restricted(allow, pprof.Profile))
	mux.HandleFunc("/debug/pprof/symbol", restricted(allow, pprof.Symbol))
	mux.HandleFunc("/debug/pprof/trace", restricted(allow, pprof.Trace))
}

func metricsAllowed(r *http.Request, allow []netip.Prefix) bool {
	if r.Header.Get("X-Forwarded-For") != "" {
		return false
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return false
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	ip = ip.Unmap()
	if ip.IsLoopback() {
		return true
	}
	for _, p := range allow {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// port80Handler serves the plain-HTTP listener that runs alongside TLS:
// /generate_204 directly, everything else redirected to HTTPS. ACME HTTP-01
// challenges are answered in front of it by the certificate provider.
func port80Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/generate_204" {
			generate204(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "Use HTTPS", http.StatusBadRequest)
			return
		}
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		http.Redirect(w, r, "https://"+host+r.URL.RequestURI(), http.StatusFound)
	})
}
