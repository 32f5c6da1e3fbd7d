package daemon

import (
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/metrics"
)

func TestProbe(t *testing.T) {
	for _, m := range []string{"GET", "HEAD"} {
		rec := httptest.NewRecorder()
		probeHandler(rec, httptest.NewRequest(m, "/derp/probe", nil))
		if rec.Code != 200 || rec.Header().Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("%s: %d %v", m, rec.Code, rec.Header())
		}
	}
	rec := httptest.NewRecorder()
	probeHandler(rec, httptest.NewRequest("POST", "/derp/probe", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d", rec.Code)
	}
}

func TestGenerate204(t *testing.T) {
	for _, tc := range []struct{ challenge, want string }{
		{"ts_derp.example.com", "response ts_derp.example.com"},
		{"", ""},
		{"bad challenge!", ""},
		{strings.Repeat("a", 65), ""},
		{strings.Repeat("a", 64), "response " + strings.Repeat("a", 64)},
	} {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("GET", "/generate_204", nil)
		if tc.challenge != "" {
			req.Header.Set("X-Tailscale-Challenge", tc.challenge)
		}
		generate204(rec, req)
		if rec.Code != 204 {
			t.Errorf("code %d", rec.Code)
		}
		if got := rec.Header().Get("X-Tailscale-Response"); got != tc.want {
			t.Errorf("challenge %q: response %q, want %q", tc.challenge, got, tc.want)
		}
	}
}

func TestHome(t *testing.T) {
	get := func(h http.Handler, path string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		return rec
	}
	if rec := get(homeHandler("", true), "/"); rec.Code != 200 || !strings.Contains(rec.Body.String(), "Status: enabled") {
		t.Errorf("built-in: %d %q", rec.Code, rec.Body.String())
	}
	if rec := get(homeHandler("", false), "/"); !strings.Contains(rec.Body.String(), "Status: disabled") {
		t.Errorf("disabled status missing: %q", rec.Body.String())
	}
	if rec := get(homeHandler("blank", true), "/"); rec.Code != 200 || rec.Body.Len() != 0 {
		t.Errorf("blank: %d %q", rec.Code, rec.Body.String())
	}
	if rec := get(homeHandler("https://example.com/x", true), "/"); rec.Code != 302 || rec.Header().Get("Location") != "https://example.com/x" {
		t.Errorf("redirect: %d %v", rec.Code, rec.Header())
	}
	if rec := get(homeHandler("", true), "/nope"); rec.Code != 404 {
		t.Errorf("unknown path: %d", rec.Code)
	}
}

func TestMetricsAccess(t *testing.T) {
	reg := metrics.NewRegistry()
	reg.Counter("x_total", "x").Inc()
	allow := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	metricsH := metricsHandler(reg, func() *[]netip.Prefix { return &allow })
	mux := http.NewServeMux()
	debugHandlers(mux, func() *[]netip.Prefix { return &allow })
	for _, tc := range []struct {
		remote string
		xff    bool
		code   int
	}{
		{"127.0.0.1:5000", false, 200},
		{"[::1]:5000", false, 200},
		{"[::ffff:127.0.0.1]:5000", false, 200},
		{"192.0.2.9:5000", false, 200},
		{"198.51.100.1:5000", false, 403},
		{"127.0.0.1:5000", true, 403},
	} {
		// The profiler is restricted the same way.
		for path, want := range map[string]string{"/metrics": "x_total 1", "/debug/pprof/goroutine?debug=1": "goroutine profile"} {
			req := httptest.NewRequest("GET", path, nil)
			req.RemoteAddr = tc.remote
			if tc.xff {
				req.Header.Set("X-Forwarded-For", "198.51.100.1")
			}
			rec := httptest.NewRecorder()
			if path == "/metrics" {
				metricsH(rec, req)
			} else {
				mux.ServeHTTP(rec, req)
			}
			if rec.Code != tc.code {
				t.Errorf("%s from %s xff=%v: %d, want %d", path, tc.remote, tc.xff, rec.Code, tc.code)
			}
			if tc.code == 200 && !strings.Contains(rec.Body.String(), want) {
				t.Errorf("%s body: %.100q", path, rec.Body.String())
			}
		}
	}
}

func TestPort80(t *testing.T) {
	h := port80Handler()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "http://derp.example.com/derp?x=1", nil))
	if rec.Code != 302 || rec.Header().Get("Location") != "https://derp.example.com/derp?x=1" {
		t.Errorf("redirect: %d %v", rec.Code, rec.Header())
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "http://derp.example.com/", nil))
	if rec.Code != 400 {
		t.Errorf("POST: %d", rec.Code)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "http://derp.example.com/generate_204", nil))
	if rec.Code != 204 {
		t.Errorf("generate_204: %d", rec.Code)
	}
}

func TestAcceptLimit(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var acc, rej metrics.Counter
	l := newLimitedListener(ln, 0.001, 2, &acc, &rej).(*limitedListener)
	now := time.Now()
	if !l.allow(now) || !l.allow(now) {
		t.Fatal("burst of 2 refused")
	}
	if l.allow(now) {
		t.Fatal("third connection within the burst window allowed")
	}
	l.tokens, l.last = 2, time.Time{}
	accepted := make(chan net.Conn, 3)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	for i := 0; i < 2; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		sc := <-accepted
		defer sc.Close()
	}
	// The third connection is over budget: the listener closes it, so the
	// client reads EOF instead of blocking.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("over-budget connection not closed: %v", err)
	}
	if acc.Value() != 2 || rej.Value() != 1 {
		t.Errorf("accepted=%d rejected=%d, want 2 and 1", acc.Value(), rej.Value())
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
