package certs

import (
	"net/netip"
	"strings"
	"testing"
)

func TestReverseName(t *testing.T) {
	for ip, want := range map[string]string{
		"192.0.2.10":  "10.2.0.192.in-addr.arpa",
		"2001:db8::1": "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
	} {
		if got := reverseName(netip.MustParseAddr(ip)); got != want {
			t.Errorf("%s: %s, want %s", ip, got, want)
		}
	}
}

func TestACMEIPCertsConfig(t *testing.T) {
	for _, tc := range []struct {
		host, mode string
		ipCerts    bool
		errHas     string
	}{
		{"derp.example.com", ModeLetsEncrypt, true, "is not an IP address"},
		{"192.0.2.1", ModeLetsEncrypt, false, "only with -acme-ip-certs"},
		{"192.0.2.1", ModeManual, true, "needs -certmode letsencrypt"},
		{"169.254.1.1", ModeLetsEncrypt, true, "cannot be validated"},
	} {
		cfg, _, _ := baseConfig(t, t.TempDir(), tc.host)
		cfg.Mode, cfg.ACMEIPCerts = tc.mode, tc.ipCerts
		if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), tc.errHas) {
			t.Errorf("%+v: %v, want an error saying %q", tc, err, tc.errHas)
		}
	}
	// A valid one needs nothing from the CA until it is started, and
	// offers the TLS-ALPN-01 protocol.
	cfg, _, _ := baseConfig(t, t.TempDir(), "192.0.2.1")
	cfg.Mode, cfg.ACMEIPCerts, cfg.ACMEDirectory = ModeLetsEncrypt, true, "https://127.0.0.1:1/dir"
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if protos := p.TLSConfig().NextProtos; len(protos) != 2 || protos[1] != "acme-tls/1" {
		t.Errorf("ALPN %v", protos)
	}
	if p.CertName() != "" {
		t.Errorf("CertName %q for a CA-issued certificate", p.CertName())
	}
}
