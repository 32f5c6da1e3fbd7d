package daemon

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/config"
	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/stun"
)

func startDaemon(t *testing.T, args ...string) *Daemon {
	t.Helper()
	cfg, err := config.Parse(append([]string{"-a", "127.0.0.1:0", "-stun-port", "0", "-xdp", "off"}, args...), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(cfg, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := d.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return d
}

func TestServesEndpointsAndSTUN(t *testing.T) {
	key := filepath.Join(t.TempDir(), "derper.key")
	d := startDaemon(t, "-c", key)
	base := "http://" + d.Addr().String()
	for path, code := range map[string]int{
		"/derp/probe": 200, "/derp/latency-check": 200, "/generate_204": 204,
		"/robots.txt": 200, "/": 200, "/metrics": 200, "/debug/varz": 200, "/derp": 426,
		"/debug/pprof/": 200, "/debug/pprof/goroutine?debug=1": 200,
	} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != code {
			t.Errorf("%s: %d, want %d", path, resp.StatusCode, code)
		}
	}
	// The key file was created in derper's format and holds the served key.
	k, err := derp.LoadOrCreateKeyFile(key)
	if err != nil {
		t.Fatal(err)
	}
	if k.Public() != d.PublicKey() {
		t.Error("served key differs from the key file")
	}
	if fi, err := os.Stat(key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode: %v %v", fi.Mode(), err)
	}

	c, err := net.Dial("udp", d.STUNAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tx := stun.TxID{1, 2, 3}
	c.Write(stun.AppendRequest(nil, tx))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 128)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no STUN answer: %v", err)
	}
	want := stun.AppendResponse(nil, tx, c.LocalAddr().(*net.UDPAddr).AddrPort())
	if string(buf[:n]) != string(want) {
		t.Errorf("STUN answer % x, want % x", buf[:n], want)
	}
	// Counters are bumped when the send call returns, which may be just
	// after the client has its answer: poll the page with a deadline.
	waitMetrics(t, base, `stun_requests{disposition="success"} 1`, "derp_current_connections 0", `xderp_xdp_attached{iface="",mode="off"} 0`)
}

func waitMetrics(t *testing.T, base string, want ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get(base + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		missing := ""
		for _, m := range want {
			if !strings.Contains(string(body), m) {
				missing = m
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics lack %q:\n%s", missing, body)
		}
	}
}

func TestDerpDisabled(t *testing.T) {
	d := startDaemon(t, "-derp=false", "-c", filepath.Join(t.TempDir(), "k"))
	resp, err := http.Get("http://" + d.Addr().String() + "/derp")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Errorf("/derp with -derp=false: %d", resp.StatusCode)
	}
}

func TestBadKeyFileRefusesToStart(t *testing.T) {
	key := filepath.Join(t.TempDir(), "derper.key")
	os.WriteFile(key, []byte(`{"PrivateKey":"privkey:nothex"}`), 0o600)
	cfg, err := config.Parse([]string{"-a", "127.0.0.1:0", "-c", key, "-xdp", "off"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(cfg, Options{})
	if err == nil || !strings.HasPrefix(err.Error(), "-c: ") || !strings.Contains(err.Error(), key) {
		t.Fatalf("want an error naming -c and the file, got %v", err)
	}
}

func TestPortInUseNamesTheFlag(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg, _ := config.Parse([]string{"-a", ln.Addr().String(), "-stun-port", "0", "-xdp", "off", "-c", filepath.Join(t.TempDir(), "k")}, io.Discard)
	d, err := New(cfg, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(context.Background()); err == nil || !strings.HasPrefix(err.Error(), "-a: ") {
		t.Fatalf("want a -a error, got %v", err)
	}
}
