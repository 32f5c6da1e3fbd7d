package config

import (
	"errors"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaults(t *testing.T) {
	c, err := Parse([]string{"-a", "127.0.0.1:8080"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.TLS() {
		t.Error("port 8080 must be plain HTTP")
	}
	if got := c.STUNAddr(); got != "127.0.0.1:3478" {
		t.Errorf("STUNAddr = %q", got)
	}
	if c.HTTPAddr() != "" {
		t.Error("no port-80 listener without TLS")
	}
	if c.TCPWriteTimeout != 2*time.Second || c.TCPUserTimeout != 15*time.Second || c.TCPKeepAlive != 10*time.Minute {
		t.Errorf("TCP defaults wrong: %+v", c)
	}
	if c.XDP != XDPAuto || c.Shaping.Enabled() {
		t.Errorf("XDP defaults wrong: %q shaping=%v", c.XDP, c.Shaping.Enabled())
	}
}

func TestDev(t *testing.T) {
	c, err := Parse([]string{"-dev"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr != DevAddr || c.STUNAddr() != "127.0.0.1:3478" || c.TLS() {
		t.Errorf("dev: addr=%q stun=%q tls=%v", c.Addr, c.STUNAddr(), c.TLS())
	}
}

func TestTLSNeedsHostname(t *testing.T) {
	_, err := Parse([]string{"-a", ":443"}, io.Discard)
	assertField(t, err, "hostname")
	c, err := Parse([]string{"-a", ":443", "-hostname", "derp.example.com", "-http-port", "8080"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !c.TLS() || c.HTTPAddr() != ":8080" {
		t.Errorf("tls=%v http=%q", c.TLS(), c.HTTPAddr())
	}
	_, err = Parse([]string{"-a", ":443", "-hostname", "192.0.2.1"}, io.Discard)
	assertField(t, err, "hostname")
}

func TestACMEIPCerts(t *testing.T) {
	c, err := Parse([]string{"-a", ":443", "-hostname", "192.0.2.1", "-acme-ip-certs"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !c.ACMEIPCerts || c.CertMode != "letsencrypt" {
		t.Errorf("acme-ip-certs %v, certmode %q", c.ACMEIPCerts, c.CertMode)
	}
	// Only for an IP host name, and only with ACME.
	_, err = Parse([]string{"-a", ":443", "-hostname", "derp.example.com", "-acme-ip-certs"}, io.Discard)
	assertField(t, err, "acme-ip-certs")
	_, err = Parse([]string{"-a", ":443", "-hostname", "192.0.2.1", "-certmode", "manual", "-acme-ip-certs"}, io.Discard)
	assertField(t, err, "acme-ip-certs")
}

func TestBadFlagsNameTheField(t *testing.T) {
	dir := t.TempDir()
	badKey := filepath.Join(dir, "mesh.key")
	os.WriteFile(badKey, []byte("nothex"), 0o600)
	cases := []struct {
		args []string
		flag string
	}{
		{[]string{"-a", "nonsense"}, "a"},
		{[]string{"-a", "example.com:80"}, "a"},
		{[]string{"-a", ":99999"}, "a"},
		{[]string{"-a", ":1", "-stun-port", "70000"}, "stun-port"},
		{[]string{"-a", ":1", "-http-port", "-5"}, "http-port"},
		{[]string{"-a", ":1", "-certmode", "gcp"}, "certmode"},
		{[]string{"-a", ":1", "-home", "ftp://x"}, "home"},
		{[]string{"-a", ":1", "-mesh-with", "a,b"}, "mesh-with"},
		{[]string{"-a", ":1", "-mesh-psk-file", badKey}, "mesh-psk-file"},
		{[]string{"-a", ":1", "-mesh-psk-file", filepath.Join(dir, "missing")}, "mesh-psk-file"},
		{[]string{"-a", ":1", "-accept-connection-limit", "0"}, "accept-connection-limit"},
		{[]string{"-a", ":1", "-xdp", "fast"}, "xdp"},
		{[]string{"-a", ":1", "-xdp-iface", "a/b"}, "xdp-iface"},
		{[]string{"-a", ":1", "-log-level", "loud"}, "log-level"},
		{[]string{"-a", ":1", "-acme-eab-kid", "x"}, "acme-eab-kid"},
		{[]string{"-a", ":1", "-acme-directory", "not a url"}, "acme-directory"},
		{[]string{"-a", ":1", "-shape-stun-burst", "5"}, "shape-stun-burst"},
		{[]string{"-a", ":1", "-tcp-write-timeout", "-1s"}, "tcp-write-timeout"},
		{[]string{"-a", ":1", "-verify-client-url", "ftp://admit.example/"}, "verify-client-url"},
		{[]string{"-a", ":1", "-verify-client-url", "/admit"}, "verify-client-url"},
	}
	for _, tc := range cases {
		_, err := Parse(tc.args, io.Discard)
		assertField(t, err, tc.flag)
	}
}

func TestVerifyClientURL(t *testing.T) {
	c, err := Parse([]string{"-a", ":1"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.VerifyClientURL != "" || !c.VerifyClientURLFailOpen {
		t.Errorf("defaults: url %q, fail-open %v; want none, true (derper's)", c.VerifyClientURL, c.VerifyClientURLFailOpen)
	}
	c, err = Parse([]string{"-a", ":1", "-verify-client-url", "https://admit.example/derp", "-verify-client-url-fail-open=false"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.VerifyClientURL != "https://admit.example/derp" || c.VerifyClientURLFailOpen {
		t.Errorf("url %q, fail-open %v", c.VerifyClientURL, c.VerifyClientURLFailOpen)
	}
}

func TestVerifyClients(t *testing.T) {
	c, err := Parse([]string{"-a", ":1"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.VerifyClients || c.TailscaledSocket != "" {
		t.Errorf("defaults: verify-clients %v, socket %q; want off, default path", c.VerifyClients, c.TailscaledSocket)
	}
	// derper's spelling of the pair.
	c, err = Parse([]string{"-a", ":1", "--verify-clients", "--socket=/run/ts.sock"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !c.VerifyClients || c.TailscaledSocket != "/run/ts.sock" {
		t.Errorf("verify-clients %v, socket %q", c.VerifyClients, c.TailscaledSocket)
	}
}

func TestUnpublishedBootstrapDNSNames(t *testing.T) {
	c, err := Parse([]string{"-a", ":1", "-unpublished-bootstrap-dns-names", "controlplane.example.com,log.example.com/log-rollout.example.com"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.UnpublishedBootstrapDNSNames) != 2 || c.UnpublishedBootstrapDNSNames[1] != "log.example.com/log-rollout.example.com" {
		t.Errorf("%q", c.UnpublishedBootstrapDNSNames)
	}
	for _, bad := range []string{"a.example/", "/b.example", "a.example/b/c", "a:b"} {
		_, err := Parse([]string{"-a", ":1", "-unpublished-bootstrap-dns-names", bad}, io.Discard)
		assertField(t, err, "unpublished-bootstrap-dns-names")
	}
}

func TestRateConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// derper's file, as derper's operators have it.
	ok := write("ok.json", `{"PerClientRateLimitBytesPerSec": 1000000, "PerClientRateBurstBytes": 2000000}`)
	c, err := Parse([]string{"-a", ":1", "-rate-config", ok}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.RateLimit != (RateLimit{BytesPerSec: 1000000, BurstBytes: 2000000}) {
		t.Errorf("read %+v", c.RateLimit)
	}
	for _, bad := range []string{
		write("typo.json", `{"PerClientRateLimitBytesPerSecond": 1000000}`),
		write("negative.json", `{"PerClientRateLimitBytesPerSec": -1}`),
		write("garbage.json", `{"PerClientRateLimitBytesPerSec": 1} trailing`),
		write("empty.json", ``),
		filepath.Join(dir, "missing.json"),
	} {
		_, err := Parse([]string{"-a", ":1", "-rate-config", bad}, io.Discard)
		assertField(t, err, "rate-config")
	}
}

func TestUnparseableFlagValue(t *testing.T) {
	for _, args := range [][]string{
		{"-metrics-allow", "10.0.0.0/33"},
		{"-stun-port", "x"},
		{"-shape-exempt", "bogus"},
		{"extra"},
	} {
		if _, err := Parse(args, io.Discard); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}

func TestPrefixes(t *testing.T) {
	c, err := Parse([]string{"-a", ":1", "-metrics-allow", "10.1.2.3/8, 2001:db8::1", "-shape-exempt", "192.0.2.7"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("2001:db8::1/128")}
	if len(c.MetricsAllow) != 2 || c.MetricsAllow[0] != want[0] || c.MetricsAllow[1] != want[1] {
		t.Errorf("MetricsAllow = %v", c.MetricsAllow)
	}
	if len(c.Shaping.Exempt) != 1 || c.Shaping.Exempt[0] != netip.MustParsePrefix("192.0.2.7/32") {
		t.Errorf("Exempt = %v", c.Shaping.Exempt)
	}
}

func TestReadMeshKey(t *testing.T) {
	p := filepath.Join(t.TempDir(), "k")
	key := strings.Repeat("aB", 32)
	os.WriteFile(p, []byte("  "+key+"\n"), 0o600)
	got, err := ReadMeshKey(p)
	if err != nil || got != strings.ToLower(key) {
		t.Fatalf("got %q, %v", got, err)
	}
}

func assertField(t *testing.T, err error, flag string) {
	t.Helper()
	var fe *FieldError
	if !errors.As(err, &fe) {
		t.Errorf("want a -%s error, got %v", flag, err)
		return
	}
	if fe.Flag != flag {
		t.Errorf("error names -%s, want -%s: %v", fe.Flag, flag, err)
	}
	if !strings.HasPrefix(err.Error(), "-"+flag+": ") {
		t.Errorf("message %q does not start with the flag", err)
	}
}

func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "xderp.conf")
	os.WriteFile(p, []byte("# comment\n-a 127.0.0.1:9000\nshape-pps = 500\nxdp-drop-stun\nmetrics-allow=10.0.0.0/8\nstun-port \"4000\"\n"), 0o644)
	c, err := Parse([]string{"-config", p, "-stun-port", "4001"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr != "127.0.0.1:9000" || c.Shaping.PacketsPerSec != 500 || !c.XDPDropSTUN || len(c.MetricsAllow) != 1 {
		t.Errorf("file not applied: %+v", c)
	}
	if c.STUNPort != 4001 {
		t.Errorf("command line must override the file: stun-port %d", c.STUNPort)
	}
	os.WriteFile(p, []byte("a 127.0.0.1:9000\nshape-pps lots\n"), 0o644)
	_, err = Parse([]string{"-config=" + p}, io.Discard)
	assertField(t, err, "shape-pps")
	if !strings.Contains(err.Error(), "xderp.conf:2") {
		t.Errorf("error does not name the line: %v", err)
	}
	os.WriteFile(p, []byte("no-such-flag 1\n"), 0o644)
	_, err = Parse([]string{"-config", p}, io.Discard)
	assertField(t, err, "config")
	_, err = Parse([]string{"-config", filepath.Join(dir, "missing")}, io.Discard)
	assertField(t, err, "config")
}

func TestDerperOnlyFlagsAreNamed(t *testing.T) {
	for _, name := range []string{"secrets-path-prefix", "ace", "secrets-url"} {
		_, err := Parse([]string{"-a", ":1", "-" + name}, io.Discard)
		assertField(t, err, name)
	}
	// A value that merely looks like a flag name is not rejected.
	if _, err := Parse([]string{"-a", ":1", "-home", "blank"}, io.Discard); err != nil {
		t.Fatal(err)
	}
}

func TestDetachNeedsNoServingSettings(t *testing.T) {
	c, err := Parse([]string{"-xdp-detach", "-xdp-iface", "eth0"}, io.Discard)
	if err != nil {
		t.Fatalf("-xdp-detach alone refused: %v", err)
	}
	if !c.XDPDetach || c.XDPIface != "eth0" {
		t.Errorf("%+v", c)
	}
}
