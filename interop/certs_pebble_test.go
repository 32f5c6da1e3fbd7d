package interop

// Tests of userspace/certs' letsencrypt mode against Pebble, Let's Encrypt's
// ACME test server, run in-process on loopback. Pebble's validation authority
// resolves the test host name through a DNS server the test runs on
// loopback (answering 127.0.0.1 for every name) and connects to the ports
// the test gives it, which are the test's own loopback listeners.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"github.com/miekg/dns"

	"github.com/xderp/xderp/userspace/certs"
	"github.com/xderp/xderp/userspace/metrics"
)

const certsTestHost = "derp.xderp.test"

var certsTestDERPKey = [32]byte{0xde, 0xad, 0xbe, 0xef, 31: 0x01}

type certsPebbleOpts struct {
	httpPort, tlsPort int               // where the VA validates challenges
	validity          uint64            // certificate lifetime in seconds; 0 = Pebble's default
	eab               map[string]string // kid -> base64url HMAC key; non-empty = EAB required
	shortlived        uint64            // if set, a "shortlived" profile with this lifetime in seconds
}

type certsPebble struct {
	dirURL     string
	serverCert *x509.Certificate  // of the ACME API's own HTTPS server
	client     *http.Client       // trusts Pebble's own TLS server
	roots      *x509.CertPool     // Pebble's issuing root
	logs       *certsLockedWriter // Pebble's log, shown on failure
}

// startLoopbackDNS answers A queries for every name with 127.0.0.1 and
// everything else (AAAA, CAA) with an empty NOERROR answer, over TCP (what
// Pebble's VA uses with a custom resolver).
func certsStartLoopbackDNS(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{Listener: ln, Net: "tcp", Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		for _, q := range r.Question {
			if q.Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 1},
					A:   net.IPv4(127, 0, 0, 1),
				})
			}
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return ln.Addr().String()
}

// startPebble runs Pebble's CA, VA and web front end in this process, the
// ACME API behind an httptest TLS server on 127.0.0.1.
func certsStartPebble(t *testing.T, o certsPebbleOpts) *certsPebble {
	t.Helper()
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")      // validate at once
	t.Setenv("PEBBLE_AUTHZREUSE", "0")      // every order validates afresh (renewal too)
	t.Setenv("PEBBLE_WFE_NONCEREJECT", "0") // no random badNonce errors
	logs := &certsLockedWriter{w: &bytes.Buffer{}}
	lg := log.New(logs, "pebble ", log.Lmicroseconds)
	dnsAddr := certsStartLoopbackDNS(t)
	store := db.NewMemoryStore()
	profiles := map[string]ca.Profile{"default": {Description: "test", ValidityPeriod: o.validity}}
	if o.shortlived != 0 {
		profiles["shortlived"] = ca.Profile{Description: "short-lived", ValidityPeriod: o.shortlived}
	}
	authority := ca.New(lg, store, "", "ecdsa", 0, 1, profiles)
	validator := va.New(lg, o.httpPort, o.tlsPort, false, dnsAddr, store)
	for kid, key := range o.eab {
		if err := store.AddExternalAccountKeyByID(kid, key); err != nil {
			t.Fatal(err)
		}
	}
	front := wfe.New(lg, store, validator, authority, []string{"pebble.letsencrypt.org"}, false, len(o.eab) > 0, 0, 0)
	srv := httptest.NewTLSServer(front.Handler())
	t.Cleanup(srv.Close)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pebble log:\n%s", logs.String())
		}
	})
	roots := x509.NewCertPool()
	roots.AddCert(authority.GetRootCert(0).Cert)
	return &certsPebble{dirURL: srv.URL + wfe.DirectoryPath, serverCert: srv.Certificate(), client: srv.Client(), roots: roots, logs: logs}
}

type certsLockedWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (l *certsLockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (l *certsLockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.String()
}

// freePort returns a loopback port nothing listens on (the VA gets it for
// the challenge type a test wants to fail).
func certsFreePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

func certsListen(t *testing.T) (net.Listener, int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, ln.Addr().(*net.TCPAddr).Port
}

type certsAcmeNode struct {
	p       *certs.Provider
	reg     *metrics.Registry
	dir     string
	tlsAddr string
	// challengeGets counts HTTP-01 validation requests on the port-80 listener.
	challengeGets atomic.Int32
}

// startACMENode runs a letsencrypt-mode provider with its TLS listener on
// tlsLn and, if httpLn is non-nil, the port-80 handler (which is what turns
// HTTP-01 on).
func certsStartACMENode(t *testing.T, pb *certsPebble, cfg certs.Config, tlsLn, httpLn net.Listener) *certsAcmeNode {
	t.Helper()
	n := &certsAcmeNode{reg: metrics.NewRegistry(), dir: filepath.Join(t.TempDir(), "acme")}
	cfg.Mode = certs.ModeLetsEncrypt
	cfg.Dir = n.dir
	cfg.Hostname = certsTestHost
	cfg.ACMEDirectory = pb.dirURL
	cfg.HTTPClient = pb.client
	cfg.DERPPublicKey = certsTestDERPKey
	cfg.Metrics = n.reg
	cfg.Logger = slog.New(slog.NewTextHandler(certsTestLogWriter{t}, nil))
	p, err := certs.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	n.p = p
	n.tlsAddr = tlsLn.Addr().String()
	tlsSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "derp node over "+tls.VersionName(r.TLS.Version))
	})}
	go tlsSrv.Serve(p.WrapListener(tlsLn))
	t.Cleanup(func() { tlsSrv.Close() })
	if httpLn != nil {
		fallback := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "https://"+certsTestHost+r.URL.RequestURI(), http.StatusFound)
		})
		h := p.HTTPHandler(fallback)
		httpSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasPrefix(r.URL.Path, "/.well-known/acme-challenge/") {
				n.challengeGets.Add(1)
			}
			h.ServeHTTP(w, r)
		})}
		go httpSrv.Serve(httpLn)
		t.Cleanup(func() { httpSrv.Close() })
	}
	return n
}

type certsTestLogWriter struct{ t *testing.T }

func (w certsTestLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// handshake connects as a client that trusts only Pebble's root, the way a
// Tailscale client trusts a public CA, and returns the connection state.
func certsHandshake(t *testing.T, addr string, roots *x509.CertPool, version uint16) (tls.ConnectionState, error) {
	t.Helper()
	d := &net.Dialer{Timeout: 10 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second) // first one waits for issuance
	defer cancel()
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer raw.Close()
	c := tls.Client(raw, &tls.Config{ServerName: certsTestHost, RootCAs: roots, MinVersion: version, MaxVersion: version})
	if err := c.HandshakeContext(ctx); err != nil {
		return tls.ConnectionState{}, err
	}
	return c.ConnectionState(), nil
}

// checkIssued asserts what every ACME-issued handshake must show.
func certsCheckIssued(t *testing.T, n *certsAcmeNode, cs tls.ConnectionState) {
	t.Helper()
	leaf := cs.PeerCertificates[0]
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != certsTestHost {
		t.Errorf("leaf names %v", leaf.DNSNames)
	}
	if !strings.HasPrefix(leaf.Issuer.CommonName, "Pebble Intermediate CA") {
		t.Errorf("issuer %q", leaf.Issuer.CommonName)
	}
	if len(cs.VerifiedChains) == 0 {
		t.Error("no verified chain")
	}
	meta := cs.PeerCertificates[len(cs.PeerCertificates)-1]
	if !strings.HasPrefix(meta.Subject.CommonName, "derpkey") || meta.SerialNumber.Int64() != 2 {
		t.Errorf("last certificate %q serial %v is not the meta certificate", meta.Subject.CommonName, meta.SerialNumber)
	}
	if n.p.CertName() != "" {
		t.Errorf("CertName %q for a CA-issued certificate", n.p.CertName())
	}
	// Cached with private keys at 0600 in a 0700 directory.
	entries, err := os.ReadDir(n.dir)
	if err != nil {
		t.Fatal(err)
	}
	var sawCert bool
	for _, e := range entries {
		fi, _ := e.Info()
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %o", e.Name(), fi.Mode().Perm())
		}
		sawCert = sawCert || e.Name() == certsTestHost
	}
	if !sawCert {
		t.Errorf("no cached certificate in %s: %v", n.dir, entries)
	}
	if fi, _ := os.Stat(n.dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("cache dir mode %o", fi.Mode().Perm())
	}
	// Seconds-until-expiry gauge for the name.
	if v := certsMetric(t, n.reg, `xderp_tls_cert_expiry_seconds{name="`+certsTestHost+`"}`); v <= 0 || v > time.Until(leaf.NotAfter).Seconds()+1 {
		t.Errorf("expiry gauge %v, leaf expires in %v", v, time.Until(leaf.NotAfter))
	}
}

func certsMetric(t *testing.T, reg *metrics.Registry, sample string) float64 {
	t.Helper()
	var b bytes.Buffer
	if err := reg.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(b.String(), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return -1
}

func TestCertsACMEHTTP01(t *testing.T) {
	httpLn, httpPort := certsListen(t)
	tlsLn, _ := certsListen(t)
	// TLS-ALPN-01 is pointed at a closed port so only HTTP-01 can succeed.
	pb := certsStartPebble(t, certsPebbleOpts{httpPort: httpPort, tlsPort: certsFreePort(t)})
	n := certsStartACMENode(t, pb, certs.Config{ACMEEmail: "ops@xderp.test"}, tlsLn, httpLn)

	cs, err := certsHandshake(t, n.tlsAddr, pb.roots, tls.VersionTLS13)
	if err != nil {
		t.Fatalf("first handshake (issuance): %v", err)
	}
	certsCheckIssued(t, n, cs)
	if n.challengeGets.Load() == 0 {
		t.Error("Pebble never fetched an HTTP-01 token from the port-80 handler")
	}
	// The port-80 handler sends everything else to the fallback.
	// (The redirect is not followed: its host is not loopback.)
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get("http://" + httpLn.Addr().String() + "/derp")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusFound || loc != "https://"+certsTestHost+"/derp" {
		t.Errorf("port-80 fallback: %d Location %q", resp.StatusCode, loc)
	}
	// TLS 1.2 clients get the same certificate.
	cs12, err := certsHandshake(t, n.tlsAddr, pb.roots, tls.VersionTLS12)
	if err != nil {
		t.Fatalf("TLS 1.2: %v", err)
	}
	if !cs12.PeerCertificates[0].Equal(cs.PeerCertificates[0]) {
		t.Error("TLS 1.2 got a different certificate")
	}
}

func TestCertsACMETLSALPN01(t *testing.T) {
	tlsLn, tlsPort := certsListen(t)
	// No port-80 listener at all (an operator with -http-port -1): only
	// TLS-ALPN-01 on the TLS port. HTTP-01 is pointed at a closed port.
	pb := certsStartPebble(t, certsPebbleOpts{httpPort: certsFreePort(t), tlsPort: tlsPort})
	n := certsStartACMENode(t, pb, certs.Config{}, tlsLn, nil)

	cs, err := certsHandshake(t, n.tlsAddr, pb.roots, tls.VersionTLS13)
	if err != nil {
		t.Fatalf("first handshake (issuance): %v", err)
	}
	certsCheckIssued(t, n, cs)
	if v := certsMetric(t, n.reg, "xderp_tls_acme_challenge_handshakes_total"); v < 1 {
		t.Errorf("acme-tls/1 challenge handshakes = %v", v)
	}

	// A restart with the same directory serves the cached certificate
	// without talking to the CA.
	n.p.Close()
	tlsLn2, _ := certsListen(t)
	cfg := certs.Config{HTTPClient: &http.Client{Transport: certsFailingTransport{}}}
	n2 := certsStartACMENodeInDir(t, pb, cfg, tlsLn2, n.dir)
	cs2, err := certsHandshake(t, n2.tlsAddr, pb.roots, tls.VersionTLS13)
	if err != nil {
		t.Fatalf("handshake after restart: %v", err)
	}
	if !cs2.PeerCertificates[0].Equal(cs.PeerCertificates[0]) {
		t.Error("restart did not reuse the cached certificate")
	}
}

type certsFailingTransport struct{}

func (certsFailingTransport) RoundTrip(*http.Request) (*http.Response, error) {
	return nil, errors.New("CA must not be contacted")
}

// startACMENodeInDir is startACMENode reusing an existing cache directory.
func certsStartACMENodeInDir(t *testing.T, pb *certsPebble, cfg certs.Config, tlsLn net.Listener, dir string) *certsAcmeNode {
	t.Helper()
	cfg.Mode = certs.ModeLetsEncrypt
	cfg.Dir = dir
	cfg.Hostname = certsTestHost
	cfg.ACMEDirectory = pb.dirURL
	cfg.DERPPublicKey = certsTestDERPKey
	reg := metrics.NewRegistry()
	cfg.Metrics = reg
	p, err := certs.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	srv := &http.Server{Handler: http.NotFoundHandler()}
	go srv.Serve(p.WrapListener(tlsLn))
	t.Cleanup(func() { srv.Close() })
	return &certsAcmeNode{p: p, reg: reg, dir: dir, tlsAddr: tlsLn.Addr().String()}
}

func TestCertsACMERenewal(t *testing.T) {
	tlsLn, tlsPort := certsListen(t)
	httpLn, httpPort := certsListen(t)
	// 30 s certificates renewed when 25 s remain: the first renewal is due
	// about 5 s after issuance (autocert adds up to RenewBefore/10 jitter).
	pb := certsStartPebble(t, certsPebbleOpts{httpPort: httpPort, tlsPort: tlsPort, validity: 30})
	n := certsStartACMENode(t, pb, certs.Config{RenewBefore: 25 * time.Second}, tlsLn, httpLn)

	if err := n.p.Prefetch(context.Background()); err != nil {
		t.Fatalf("Prefetch: %v", err)
	}
	cs, err := certsHandshake(t, n.tlsAddr, pb.roots, tls.VersionTLS13)
	if err != nil {
		t.Fatal(err)
	}
	first := cs.PeerCertificates[0]
	if d := first.NotAfter.Sub(first.NotBefore); d > 31*time.Second {
		t.Fatalf("Pebble issued a %v certificate, want 30 s", d)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		cs, err := certsHandshake(t, n.tlsAddr, pb.roots, tls.VersionTLS13)
		if err != nil {
			t.Fatalf("handshake while renewing: %v", err)
		}
		leaf := cs.PeerCertificates[0]
		if !leaf.Equal(first) {
			if !leaf.NotAfter.After(first.NotAfter) {
				t.Errorf("renewed certificate expires %v, not after %v", leaf.NotAfter, first.NotAfter)
			}
			certsCheckIssued(t, n, cs)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("certificate not renewed within 60 s (expires %v)", first.NotAfter)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestCertsACMEExternalAccountBinding(t *testing.T) {
	tlsLn, tlsPort := certsListen(t)
	key := base64.RawURLEncoding.EncodeToString([]byte("a 32 byte hmac key for the tests"))
	pb := certsStartPebble(t, certsPebbleOpts{httpPort: certsFreePort(t), tlsPort: tlsPort,
		eab: map[string]string{"kid-1": key}})

	// Without EAB the CA refuses the account, so the handshake fails.
	tlsBad, _ := certsListen(t)
	bad := certsStartACMENode(t, pb, certs.Config{}, tlsBad, nil)
	if err := bad.p.Prefetch(context.Background()); err == nil || !strings.Contains(err.Error(), "externalAccount") {
		t.Fatalf("Prefetch without EAB: %v", err)
	}

	n := certsStartACMENode(t, pb, certs.Config{EABKeyID: "kid-1", EABKey: key, ACMEEmail: "ops@xderp.test"}, tlsLn, nil)
	cs, err := certsHandshake(t, n.tlsAddr, pb.roots, tls.VersionTLS13)
	if err != nil {
		t.Fatalf("handshake with EAB: %v", err)
	}
	certsCheckIssued(t, n, cs)
}
