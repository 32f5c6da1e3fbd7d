package certs

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestSelfSignedIPPinned(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs") // does not exist yet
	cfg, reg, logs := baseConfig(t, dir, "127.0.0.1")
	env := newEnv(t, cfg, reg, logs)

	crt, key := filePaths(dir, "127.0.0.1")
	if m := fileMode(t, key); m != 0o600 {
		t.Errorf("key mode %o, want 600", m)
	}
	if m := fileMode(t, dir); m != 0o700 {
		t.Errorf("dir mode %o, want 700", m)
	}
	crtPEM, err := os.ReadFile(crt)
	if err != nil {
		t.Fatal(err)
	}
	name := env.p.CertName()
	if !strings.HasPrefix(name, "sha256-raw:") || len(name) != len("sha256-raw:")+64 {
		t.Fatalf("CertName = %q", name)
	}
	if !strings.Contains(logs.String(), name) {
		t.Errorf("start log does not carry the CertName %s:\n%s", name, logs.String())
	}

	// A client pinning CertName, the way Tailscale clients do, connects.
	c, err := dial(t, env.addr, pinnedConfig(name, "127.0.0.1"))
	if err != nil {
		t.Fatalf("pinned dial: %v", err)
	}
	if err := echo(t, c, "hello"); err != nil {
		t.Fatal(err)
	}
	if got := CertNameFor(leafOf(c).Raw); got != name {
		t.Errorf("served cert %s, CertName %s", got, name)
	}
	leaf := leafOf(c)
	if pk, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || pk.Curve != elliptic.P256() {
		t.Errorf("key %T, want ECDSA P-256 (what derper generates)", leaf.PublicKey)
	}
	if len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.ParseIP("127.0.0.1")) {
		t.Errorf("IP SANs %v", leaf.IPAddresses)
	}
	if d := leaf.NotAfter.Sub(leaf.NotBefore); d > SelfSignedValidity {
		t.Errorf("validity %v longer than %v", d, SelfSignedValidity)
	}

	// A wrong pin is refused.
	bad := "sha256-raw:" + strings.Repeat("00", 32)
	if _, err := dial(t, env.addr, pinnedConfig(bad, "127.0.0.1")); err == nil {
		t.Fatal("dial with a wrong pin succeeded")
	}

	// A second start reuses the stored certificate: the pin stays valid.
	env.p.Close()
	cfg2, reg2, logs2 := baseConfig(t, dir, "127.0.0.1")
	env2 := newEnv(t, cfg2, reg2, logs2)
	if env2.p.CertName() != name {
		t.Errorf("restart changed CertName: %s -> %s", name, env2.p.CertName())
	}
	crtPEM2, _ := os.ReadFile(crt)
	if string(crtPEM2) != string(crtPEM) {
		t.Error("restart rewrote the certificate file")
	}
}

func TestIPv6HostSelfSigned(t *testing.T) {
	dir := t.TempDir()
	cfg, reg, logs := baseConfig(t, dir, "::1")
	env := newEnv(t, cfg, reg, logs)
	if _, err := os.Stat(filepath.Join(dir, "1.crt")); err != nil {
		t.Fatalf("derper-compatible file name (colons stripped): %v", err)
	}
	if _, err := dial(t, env.addr, pinnedConfig(env.p.CertName(), "::1")); err != nil {
		t.Fatal(err)
	}
}

func TestMetaCertificate(t *testing.T) {
	dir := t.TempDir()
	pr := validPair(t, "derp.example.test")
	install(t, dir, "derp.example.test", pr)
	cfg, reg, logs := baseConfig(t, dir, "derp.example.test")
	env := newEnv(t, cfg, reg, logs)
	// A self-signed manual certificate for a DNS name is pinnable too.
	if got, want := env.p.CertName(), CertNameFor(pr.der); got != want {
		t.Errorf("CertName %q, want %q", got, want)
	}

	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		c, err := dial(t, env.addr, &tls.Config{ServerName: "derp.example.test", InsecureSkipVerify: true,
			MinVersion: v, MaxVersion: v})
		if err != nil {
			t.Fatal(err)
		}
		chain := c.ConnectionState().PeerCertificates
		if len(chain) != 2 {
			t.Fatalf("chain length %d, want leaf + meta", len(chain))
		}
		meta := chain[len(chain)-1]
		wantCN := "derpkey" + hex.EncodeToString(testDERPKey[:])
		if meta.Subject.CommonName != wantCN {
			t.Errorf("meta CN %q, want %q", meta.Subject.CommonName, wantCN)
		}
		if !meta.SerialNumber.IsInt64() || meta.SerialNumber.Int64() != 2 {
			t.Errorf("meta serial %v, want 2", meta.SerialNumber)
		}
		if !meta.BasicConstraintsValid {
			t.Error("meta cert lacks BasicConstraintsValid")
		}
		if _, ok := meta.PublicKey.(ed25519.PublicKey); !ok {
			t.Errorf("meta key %T, want ed25519", meta.PublicKey)
		}
		now := time.Now()
		if !(meta.NotBefore.Before(now) && meta.NotAfter.After(now.Add(29*24*time.Hour))) {
			t.Errorf("meta validity %v..%v", meta.NotBefore, meta.NotAfter)
		}
	}
	// The served chain is a copy: the provider's own certificate is unchanged.
	if n := len(env.p.cur.Load().cert.Certificate); n != 1 {
		t.Errorf("stored chain grew to %d certificates", n)
	}
}

func TestTLSVersions(t *testing.T) {
	dir := t.TempDir()
	cfg, reg, logs := baseConfig(t, dir, "127.0.0.1")
	env := newEnv(t, cfg, reg, logs)
	for _, tc := range []struct {
		v     uint16
		label string
	}{{tls.VersionTLS12, "1.2"}, {tls.VersionTLS13, "1.3"}} {
		c, err := dial(t, env.addr, &tls.Config{InsecureSkipVerify: true, MinVersion: tc.v, MaxVersion: tc.v})
		if err != nil {
			t.Fatalf("TLS %s: %v", tc.label, err)
		}
		if got := c.ConnectionState().Version; got != tc.v {
			t.Fatalf("negotiated %x want %x", got, tc.v)
		}
		if err := echo(t, c, "v"+tc.label); err != nil {
			t.Fatal(err)
		}
		if got := metricValue(t, reg, `xderp_tls_handshakes_total{version="`+tc.label+`"}`); got != 1 {
			t.Errorf("handshakes{%s} = %v, want 1", tc.label, got)
		}
	}
	if _, err := dial(t, env.addr, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11}); err == nil {
		t.Fatal("TLS 1.1 handshake succeeded")
	}
	waitFor(t, "version error counted", func() bool {
		return metricValue(t, reg, `xderp_tls_handshake_errors_total{reason="version"}`) == 1
	})
}

func TestManualReload(t *testing.T) {
	const host = "derp.example.test"
	dir := t.TempDir()
	first := validPair(t, host)
	install(t, dir, host, first)
	cfg, reg, logs := baseConfig(t, dir, host)
	env := newEnv(t, cfg, reg, logs)
	clientCfg := &tls.Config{ServerName: host, InsecureSkipVerify: true}

	old, err := dial(t, env.addr, clientCfg)
	if err != nil {
		t.Fatal(err)
	}
	if CertNameFor(leafOf(old).Raw) != CertNameFor(first.der) {
		t.Fatal("not serving the first certificate")
	}
	if err := echo(t, old, "before"); err != nil {
		t.Fatal(err)
	}

	// Replace the files: new handshakes see the new certificate, the
	// established connection keeps working.
	second := validPair(t, host)
	install(t, dir, host, second)
	served := func() string {
		c, err := dial(t, env.addr, clientCfg)
		if err != nil {
			t.Fatalf("dial during reload: %v", err)
		}
		defer c.Close()
		return CertNameFor(leafOf(c).Raw)
	}
	waitFor(t, "new certificate served", func() bool { return served() == CertNameFor(second.der) })
	if err := echo(t, old, "after"); err != nil {
		t.Fatalf("established connection broken by reload: %v", err)
	}
	if got := metricValue(t, reg, `xderp_tls_cert_reloads_total{result="ok"}`); got != 1 {
		t.Errorf("reloads{ok} = %v, want 1", got)
	}

	// A corrupt replacement is refused, logged once, and the second
	// certificate keeps being served.
	crt, _ := filePaths(dir, host)
	if err := writeFileAtomic(crt, []byte("-----BEGIN CERTIFICATE-----\ngarbage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "corrupt file refused", func() bool {
		return metricValue(t, reg, `xderp_tls_cert_reloads_total{result="error"}`) == 1
	})
	if got := served(); got != CertNameFor(second.der) {
		t.Fatal("corrupt replacement changed the served certificate")
	}
	if err := env.p.Reload(); err == nil {
		t.Fatal("Reload accepted a corrupt certificate")
	} else if !strings.Contains(err.Error(), crt) {
		t.Errorf("Reload error does not name the file: %v", err)
	}
	if !strings.Contains(logs.String(), "new certificate refused") {
		t.Errorf("refusal not logged:\n%s", logs.String())
	}

	// A certificate whose key belongs to another pair is refused too.
	third, other := validPair(t, host), validPair(t, host)
	install(t, dir, host, pair{crt: third.crt, key: other.key})
	if err := env.p.Reload(); err == nil || !strings.Contains(err.Error(), "private key does not match") {
		t.Fatalf("Reload with mismatched key: %v", err)
	}
	if got := served(); got != CertNameFor(second.der) {
		t.Fatal("mismatched pair changed the served certificate")
	}

	// Reload (the SIGHUP path) installs a good pair at once.
	install(t, dir, host, third)
	if err := env.p.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := served(); got != CertNameFor(third.der) {
		t.Fatal("Reload did not install the new pair")
	}
	if err := echo(t, old, "still"); err != nil {
		t.Fatalf("established connection broken: %v", err)
	}
}

func TestBadInputAtStart(t *testing.T) {
	const host = "derp.example.test"
	now := time.Now()
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the dir to use
		want  []string
	}{
		{"wrong key", func(t *testing.T, dir string) string {
			a, b := validPair(t, host), validPair(t, host)
			install(t, dir, host, pair{crt: a.crt, key: b.key})
			return dir
		}, []string{host + ".crt", "private key does not match"}},
		{"expired", func(t *testing.T, dir string) string {
			install(t, dir, host, makePair(t, host, now.Add(-48*time.Hour), now.Add(-time.Hour)))
			return dir
		}, []string{host + ".crt", "expired"}},
		{"not yet valid", func(t *testing.T, dir string) string {
			install(t, dir, host, makePair(t, host, now.Add(time.Hour), now.Add(48*time.Hour)))
			return dir
		}, []string{host + ".crt", "not valid before"}},
		{"wrong host name", func(t *testing.T, dir string) string {
			install(t, dir, host, validPair(t, "other.example.test"))
			return dir
		}, []string{host + ".crt", "not valid for hostname"}},
		{"missing files for a DNS name", func(t *testing.T, dir string) string {
			return dir
		}, []string{"certificate file", host + ".crt", "no such file"}},
		{"key missing", func(t *testing.T, dir string) string {
			p := validPair(t, host)
			crt, _ := filePaths(dir, host)
			os.WriteFile(crt, p.crt, 0o644)
			return dir
		}, []string{"key file", host + ".key"}},
		{"certdir is a file", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "file")
			os.WriteFile(f, nil, 0o600)
			return f
		}, []string{"certdir", "not a directory"}},
		{"certdir below a file", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "file")
			os.WriteFile(f, nil, 0o600)
			return filepath.Join(f, "sub")
		}, []string{"certdir", "not a directory"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.setup(t, t.TempDir())
			cfg, _, _ := baseConfig(t, dir, host)
			p, err := New(cfg)
			if err == nil {
				p.Close()
				t.Fatal("New succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	t.Run("unreadable dir", func(t *testing.T) {
		if os.Geteuid() == 0 {
			t.Skip("running as root: permission bits do not stop root; the not-a-directory cases cover the error path")
		}
		dir := t.TempDir()
		os.Chmod(dir, 0)
		t.Cleanup(func() { os.Chmod(dir, 0o700) })
		cfg, _, _ := baseConfig(t, dir, host)
		_, err := New(cfg)
		if err == nil || !strings.Contains(err.Error(), "certdir") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("config fields", func(t *testing.T) {
		dir := t.TempDir()
		for _, tc := range []struct {
			mut  func(*Config)
			want string
		}{
			{func(c *Config) { c.Mode = "gcp" }, "certmode"},
			{func(c *Config) { c.Hostname = "" }, "hostname"},
			{func(c *Config) { c.Dir = "" }, "certdir"},
			{func(c *Config) { c.DERPPublicKey = [32]byte{} }, "DERP public key"},
			{func(c *Config) { c.Mode = ModeLetsEncrypt; c.Hostname = "192.0.2.1" }, "hostname"},
			{func(c *Config) { c.Mode = ModeLetsEncrypt; c.Hostname = "localhost" }, "hostname"},
			{func(c *Config) { c.Mode = ModeLetsEncrypt; c.EABKeyID = "kid" }, "acme-eab"},
			{func(c *Config) { c.Mode = ModeLetsEncrypt; c.EABKeyID = "kid"; c.EABKey = "!!" }, "acme-eab-key"},
			{func(c *Config) { c.Mode = ModeLetsEncrypt; c.ACMEDirectory = "ftp://x" }, "acme-directory"},
		} {
			cfg, _, _ := baseConfig(t, dir, host)
			tc.mut(&cfg)
			_, err := New(cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("want error naming %q, got %v", tc.want, err)
			}
		}
	})
}

func TestHandshakeErrorsCountedAndRateLimited(t *testing.T) {
	const host = "derp.example.test"
	dir := t.TempDir()
	install(t, dir, host, validPair(t, host))
	cfg, reg, logs := baseConfig(t, dir, host)
	cfg.HandshakeTimeout = 2 * time.Second // long enough for a loaded machine, short for the test
	env := newEnv(t, cfg, reg, logs)
	errs := func(reason string) float64 {
		return metricValue(t, reg, `xderp_tls_handshake_errors_total{reason="`+reason+`"}`)
	}

	// Plain HTTP at a TLS port.
	c, err := net.Dial("tcp", env.addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	io.Copy(io.Discard, c) // server closes
	c.Close()
	waitFor(t, "not_tls", func() bool { return errs(ReasonNotTLS) == 1 })

	// Connect and hang up.
	c, _ = net.Dial("tcp", env.addr)
	c.Close()
	waitFor(t, "eof", func() bool { return errs(ReasonEOF) == 1 })

	// Connect and say nothing: the handshake timeout closes it.
	c, _ = net.Dial("tcp", env.addr)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("server sent data to a silent client")
	}
	c.Close()
	waitFor(t, "timeout", func() bool { return errs(ReasonTimeout) == 1 })

	// A name this server has no certificate for.
	if _, err := dial(t, env.addr, &tls.Config{ServerName: "other.example.test", InsecureSkipVerify: true}); err == nil {
		t.Fatal("handshake for another name succeeded")
	}
	waitFor(t, "certificate", func() bool { return errs(ReasonCertificate) == 1 })

	// The client rejects our certificate (it is not trusted).
	if _, err := dial(t, env.addr, &tls.Config{ServerName: host}); err == nil {
		t.Fatal("untrusted handshake succeeded")
	}
	waitFor(t, "peer_alert", func() bool { return errs(ReasonPeerAlert) == 1 })

	// A burst of scanner connections: every one counted, few logged.
	const n = 60
	for range n {
		c, err := net.Dial("tcp", env.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("SSH-2.0-scanner\r\n"))
		c.Close()
	}
	waitFor(t, "burst counted", func() bool { return errs(ReasonNotTLS)+errs(ReasonEOF) == 1+1+n })
	lines := strings.Count(logs.String(), "tls handshake failed")
	if lines > 15 {
		t.Errorf("%d log lines for %d failures: rate limit not working", lines, n+5)
	}
	if lines < 5 {
		t.Errorf("only %d log lines: burst should log the first few", lines)
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{io.EOF, ReasonEOF},
		{tls.RecordHeaderError{Msg: "first record does not look like a TLS handshake"}, ReasonNotTLS},
		{errors.New("tls: client offered only unsupported versions: [302 301]"), ReasonVersion},
		{errors.New("tls: no cipher suite supported by both client and server"), ReasonCipher},
		{errors.New("tls: client requested unsupported application protocols ([h2])"), ReasonCipher},
		{errors.New("remote error: tls: bad certificate"), ReasonPeerAlert},
		{errOverload, ReasonOverload},
		{errors.New("something new"), ReasonOther},
	} {
		if got := ClassifyHandshakeError(tc.err); got != tc.want {
			t.Errorf("%v: %s, want %s", tc.err, got, tc.want)
		}
	}
}

func TestExpiryGauge(t *testing.T) {
	const host = "derp.example.test"
	dir := t.TempDir()
	now := time.Now()
	install(t, dir, host, makePair(t, host, now.Add(-time.Hour), now.Add(10*time.Hour)))
	cfg, reg, logs := baseConfig(t, dir, host)
	newEnv(t, cfg, reg, logs)
	got := metricValue(t, reg, `xderp_tls_cert_expiry_seconds{name="`+host+`"}`)
	if want := 10 * 3600.0; got > want || got < want-60 {
		t.Errorf("expiry gauge %v, want about %v", got, want)
	}
}

func TestOverloadClosesExcess(t *testing.T) {
	dir := t.TempDir()
	cfg, reg, logs := baseConfig(t, dir, "127.0.0.1")
	cfg.MaxPendingHandshakes = 1
	cfg.HandshakeTimeout = 5 * time.Second
	env := newEnv(t, cfg, reg, logs)
	// The first connection holds the only handshake slot by saying nothing.
	hold, err := net.Dial("tcp", env.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	// Wait until the accept loop has taken it, then a second one is refused.
	waitFor(t, "second connection closed for overload", func() bool {
		c, err := net.Dial("tcp", env.addr)
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(make([]byte, 1))
		return errors.Is(err, io.EOF) && metricValue(t, reg, `xderp_tls_handshake_errors_total{reason="overload"}`) >= 1
	})
}

func TestHTTPServerOverWrappedListener(t *testing.T) {
	dir := t.TempDir()
	cfg, reg, logs := baseConfig(t, dir, "127.0.0.1")
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil {
			http.Error(w, "no TLS state", 500)
			return
		}
		io.WriteString(w, tls.VersionName(r.TLS.Version))
	})}
	go srv.Serve(p.WrapListener(ln))
	defer srv.Close()
	tr := &http.Transport{TLSClientConfig: pinnedConfig(p.CertName(), "127.0.0.1")}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("https://" + ln.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "TLS 1.3" {
		t.Fatalf("body %q", body)
	}
	_ = reg
	_ = logs

	// Manual mode: the port-80 handler is the fallback itself.
	fb := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) })
	rec := httptest.NewRecorder()
	p.HTTPHandler(fb).ServeHTTP(rec, httptest.NewRequest("GET", "/.well-known/acme-challenge/x", nil))
	if rec.Code != 204 {
		t.Fatalf("manual HTTPHandler: %d", rec.Code)
	}
}

func TestDERPMapNode(t *testing.T) {
	dir := t.TempDir()
	cfg, _, _ := baseConfig(t, dir, "192.0.2.10")
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	n := p.DERPMapNode(NodeInfo{IPs: []netip.Addr{netip.MustParseAddr("2001:db8::10")}, DERPPort: 443, STUNPort: 3478, HTTPPort: 80})
	b, err := json.Marshal(n)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"Name":"900a","RegionID":900,"HostName":"192.0.2.10","CertName":"` + p.CertName() +
		`","IPv4":"192.0.2.10","IPv6":"2001:db8::10","CanPort80":true}`
	if string(b) != want {
		t.Errorf("node JSON\n got %s\nwant %s", b, want)
	}
	m, err := DERPMapJSON(n, "", "")
	if err != nil {
		t.Fatal(err)
	}
	var parsed struct {
		Regions map[string]struct {
			RegionID int
			Nodes    []DERPNode
		}
	}
	if err := json.Unmarshal(m, &parsed); err != nil {
		t.Fatal(err)
	}
	if r := parsed.Regions["900"]; r.RegionID != 900 || len(r.Nodes) != 1 || r.Nodes[0] != n {
		t.Errorf("map %s", m)
	}
	n = p.DERPMapNode(NodeInfo{DERPPort: 8443, STUNPort: -1, HTTPPort: -1})
	if n.DERPPort != 8443 || n.STUNPort != -1 || n.CanPort80 {
		t.Errorf("ports: %+v", n)
	}
}

func TestDecodeEABKey(t *testing.T) {
	want := []byte{0xfb, 0xff, 0x01, 0x02, 0x03}
	for _, s := range []string{"-_8BAgM", "-_8BAgM=", "+/8BAgM=", "+/8BAgM"} {
		got, err := DecodeEABKey(s)
		if err != nil || string(got) != string(want) {
			t.Errorf("%q: %x %v", s, got, err)
		}
	}
	if _, err := DecodeEABKey("not base64!"); err == nil {
		t.Error("garbage accepted")
	}
}

func TestCertNameEmptyForCAIssued(t *testing.T) {
	const host = "derp.example.test"
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	ca, _ := x509.ParseCertificate(caDER)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2),
		Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalPKCS8PrivateKey(leafKey)
	dir := t.TempDir()
	install(t, dir, host, pair{
		crt: append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}),
			pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})...),
		key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}),
	})
	cfg, reg, logs := baseConfig(t, dir, host)
	env := newEnv(t, cfg, reg, logs)
	if n := env.p.CertName(); n != "" {
		t.Errorf("CertName %q for a CA-issued certificate", n)
	}
	// The client verifies the chain against the CA; the meta cert rides along.
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	c, err := dial(t, env.addr, &tls.Config{ServerName: host, RootCAs: pool})
	if err != nil {
		t.Fatalf("verified dial: %v", err)
	}
	if n := len(c.ConnectionState().PeerCertificates); n != 3 {
		t.Errorf("chain length %d, want leaf + CA + meta", n)
	}
}

func TestACMEHTTPHandlerRouting(t *testing.T) {
	cfg, _, _ := baseConfig(t, t.TempDir(), "derp.example.test")
	cfg.Mode = ModeLetsEncrypt
	cfg.ACMEDirectory = "http://127.0.0.1:1/directory" // never contacted here
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if got := p.TLSConfig().NextProtos; !slices.Contains(got, "acme-tls/1") || !slices.Contains(got, "http/1.1") {
		t.Errorf("NextProtos %v", got)
	}
	if p.TLSConfig().MinVersion != tls.VersionTLS12 {
		t.Error("MinVersion not TLS 1.2")
	}
	fb := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusTeapot) })
	h := p.HTTPHandler(fb)
	for _, tc := range []struct {
		host, path string
		want       int
	}{
		{"derp.example.test", "/generate_204", http.StatusTeapot},
		{"derp.example.test", "/.well-known/acme-challenge/unknown", http.StatusNotFound}, // policy ok, no token
		{"derp.example.test:80", "/.well-known/acme-challenge/unknown", http.StatusNotFound},
		{"other.example.test", "/.well-known/acme-challenge/unknown", http.StatusForbidden},
	} {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("GET", "http://"+tc.host+tc.path, nil)
		h.ServeHTTP(rec, req)
		if rec.Code != tc.want {
			t.Errorf("%s%s: %d, want %d", tc.host, tc.path, rec.Code, tc.want)
		}
	}
	if p.CertName() != "" {
		t.Errorf("CertName %q in letsencrypt mode", p.CertName())
	}
}

func TestPreferECDSA(t *testing.T) {
	tls13only := &tls.ClientHelloInfo{
		SupportedVersions: []uint16{tls.VersionTLS13},
		SignatureSchemes:  []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.PSSWithSHA256},
		CipherSuites:      []uint16{tls.TLS_AES_128_GCM_SHA256},
	}
	got := preferECDSA(tls13only)
	if !slices.Contains(got.CipherSuites, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256) {
		t.Error("TLS 1.3 client with ECDSA signatures not steered to the ECDSA certificate")
	}
	if len(tls13only.CipherSuites) != 1 {
		t.Error("caller's hello was modified")
	}
	rsaOnly := &tls.ClientHelloInfo{
		SupportedVersions: []uint16{tls.VersionTLS13},
		SignatureSchemes:  []tls.SignatureScheme{tls.PSSWithSHA256},
		CipherSuites:      []uint16{tls.TLS_AES_128_GCM_SHA256},
	}
	if preferECDSA(rsaOnly) != rsaOnly {
		t.Error("client without ECDSA signatures changed")
	}
	tls12 := &tls.ClientHelloInfo{
		SupportedVersions: []uint16{tls.VersionTLS12},
		SignatureSchemes:  []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256},
		CipherSuites:      []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
	}
	if preferECDSA(tls12) != tls12 {
		t.Error("TLS 1.2-only client changed: its cipher suites decide")
	}
}

func TestWarnsAboutReadableKey(t *testing.T) {
	const host = "derp.example.test"
	dir := t.TempDir()
	pr := validPair(t, host)
	crt, key := filePaths(dir, host)
	os.WriteFile(crt, pr.crt, 0o644)
	os.WriteFile(key, pr.key, 0o644)
	os.Chmod(key, 0o644) // regardless of umask
	cfg, reg, logs := baseConfig(t, dir, host)
	newEnv(t, cfg, reg, logs)
	if !strings.Contains(logs.String(), "readable by group or others") {
		t.Errorf("no warning for a 0644 key:\n%s", logs.String())
	}
	// A 0600 key is not warned about.
	dir2 := t.TempDir()
	install(t, dir2, host, validPair(t, host))
	cfg2, reg2, logs2 := baseConfig(t, dir2, host)
	newEnv(t, cfg2, reg2, logs2)
	if strings.Contains(logs2.String(), "readable by group or others") {
		t.Errorf("warning for a 0600 key:\n%s", logs2.String())
	}
}

func TestACMEIssuanceBackoff(t *testing.T) {
	var hits atomic.Int32
	ca := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		http.Error(w, "no such CA", http.StatusNotFound) // not retried by the ACME client
	}))
	defer ca.Close()
	cfg, _, _ := baseConfig(t, t.TempDir(), "derp.example.test")
	cfg.Mode = ModeLetsEncrypt
	cfg.ACMEDirectory = ca.URL + "/directory"
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	hello := &tls.ClientHelloInfo{ServerName: "derp.example.test"}

	if _, err := p.GetCertificate(hello); err == nil || !errors.Is(err, ErrNoCertificate) {
		t.Fatalf("first attempt: %v", err)
	}
	first := hits.Load()
	if first == 0 {
		t.Fatal("CA not contacted")
	}
	// A second handshake right away fails fast without contacting the CA.
	_, err = p.GetCertificate(hello)
	if err == nil || !strings.Contains(err.Error(), "next attempt after") || !strings.Contains(err.Error(), "404") {
		t.Fatalf("second attempt: %v", err)
	}
	if hits.Load() != first {
		t.Fatalf("CA contacted again during backoff (%d -> %d requests)", first, hits.Load())
	}
	// Other names never reach issuance and do not extend the backoff.
	p.issueBackoff.mu.Lock()
	until := p.issueBackoff.until
	p.issueBackoff.mu.Unlock()
	if _, err := p.GetCertificate(&tls.ClientHelloInfo{ServerName: "other.example.test"}); err == nil {
		t.Fatal("other name served")
	}
	p.issueBackoff.mu.Lock()
	defer p.issueBackoff.mu.Unlock()
	if p.issueBackoff.until != until {
		t.Error("a foreign name changed the backoff")
	}
}

func TestBackoffSchedule(t *testing.T) {
	var b backoff
	t0 := time.Unix(1000, 0)
	fail := errors.New("boom")
	var got []time.Duration
	now := t0
	for range 7 {
		if err := b.check(now); err != nil {
			t.Fatalf("check at expiry: %v", err)
		}
		b.record(now, fail)
		got = append(got, b.delay)
		// Handshakes that waited on the same attempt do not double it.
		b.record(now.Add(time.Second), fail)
		if err := b.check(now.Add(b.delay - time.Second)); err == nil || !errors.Is(err, fail) {
			t.Fatalf("check inside backoff: %v", err)
		}
		now = now.Add(b.delay)
	}
	want := []time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute, 16 * time.Minute, 30 * time.Minute, 30 * time.Minute}
	if !slices.Equal(got, want) {
		t.Errorf("delays %v, want %v", got, want)
	}
	b.record(now, nil)
	if err := b.check(now); err != nil || b.delay != 0 {
		t.Errorf("success did not reset: %v %v", err, b.delay)
	}
}
