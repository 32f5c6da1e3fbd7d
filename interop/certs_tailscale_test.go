package interop

// Tailscale's own DERP client (tailscale.com/derp/derphttp, which verifies
// certificates with tailscale.com/net/tlsdial) against userspace/certs:
// pinned self-signed certificates, ACME certificates from Pebble, TLS 1.3
// fast start through the meta certificate, TLS 1.2, and manual reload under
// live traffic. The DERP handler behind the TLS listener is xderp's own
// relay core (userspace/derpserver), as in the daemon.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/xderp/xderp/userspace/certs"
	xderp "github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/derpserver"
	"github.com/xderp/xderp/userspace/metrics"
)

// certsDerpSite is a DERP server (xderp's relay core) behind a certs.Provider.
type certsDerpSite struct {
	srv      *derpserver.Server
	port     int
	fastMu   sync.Mutex
	requests []certsDerpRequest
}

type certsDerpRequest struct {
	fastStart bool
	version   uint16
}

func (s *certsDerpSite) seen() []certsDerpRequest {
	s.fastMu.Lock()
	defer s.fastMu.Unlock()
	return append([]certsDerpRequest(nil), s.requests...)
}

// startDERPSite builds the provider with cfg (after filling in the DERP key)
// and serves DERP on a loopback TLS listener.
func certsStartDERPSite(t *testing.T, cfg certs.Config, ln net.Listener) (*certsDerpSite, *certs.Provider) {
	t.Helper()
	priv, err := xderp.NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := derpserver.New(derpserver.Options{PrivateKey: priv})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	cfg.DERPPublicKey = priv.Public()
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.NewRegistry()
	}
	p, err := certs.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	site := &certsDerpSite{srv: srv, port: ln.Addr().(*net.TCPAddr).Port}
	h := srv
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/derp" && r.TLS != nil {
			site.fastMu.Lock()
			site.requests = append(site.requests, certsDerpRequest{r.Header.Get("Derp-Fast-Start") == "1", r.TLS.Version})
			site.fastMu.Unlock()
		}
		h.ServeHTTP(w, r)
	})}
	go hs.Serve(p.WrapListener(ln))
	t.Cleanup(func() { hs.Close() })
	return site, p
}

func certsQuietLogf(string, ...any) {}

// derpClient connects Tailscale's client to node. base is derphttp's
// optional TLS config (extra roots, version limits).
func certsDerpClient(t *testing.T, node *tailcfg.DERPNode, base *tls.Config) (*derphttp.Client, key.NodePrivate, error) {
	t.Helper()
	priv := key.NewNode()
	region := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "xderp", Nodes: []*tailcfg.DERPNode{node}}
	c := derphttp.NewRegionClient(priv, certsQuietLogf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	c.TLSConfig = base
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	return c, priv, c.Connect(ctx)
}

// exchange sends one packet a->b and checks it arrives intact; it returns
// the receiver's connection generation (changes if derphttp reconnected).
// The packet is re-sent every 250 ms until it arrives: a client that has
// just connected with fast start may not be registered on the server yet,
// and the server drops packets for unknown destinations. Stale copies are
// skipped by later exchanges because payloads differ.
func certsExchange(a *derphttp.Client, aKey key.NodePrivate, b *derphttp.Client, payload string) (int, error) {
	type res struct {
		gen int
		err error
	}
	ch := make(chan res, 1)
	go func() {
		for {
			m, gen, err := b.RecvDetail()
			if err != nil {
				ch <- res{0, err}
				return
			}
			p, ok := m.(derp.ReceivedPacket)
			if !ok || string(p.Data) != payload {
				continue // control message or a stale retransmission
			}
			if p.Source != aKey.Public() {
				ch <- res{0, fmt.Errorf("%q came from %v, want %v", payload, p.Source, aKey.Public())}
				return
			}
			ch <- res{gen, nil}
			return
		}
	}()
	timeout := time.After(10 * time.Second)
	for {
		if err := a.Send(b.SelfPublicKey(), []byte(payload)); err != nil {
			return 0, err
		}
		select {
		case r := <-ch:
			return r.gen, r.err
		case <-time.After(250 * time.Millisecond):
		case <-timeout:
			return 0, errors.New("packet not delivered within 10 s")
		}
	}
}

// certsRelayTrusting checks that Tailscale's client refuses node's
// certificate without roots and, trusting roots, relays payload between two
// clients through it; it returns the two.
func certsRelayTrusting(t *testing.T, node *tailcfg.DERPNode, roots *x509.CertPool, payload string) (a, b *derphttp.Client) {
	t.Helper()
	if _, _, err := certsDerpClient(t, node, nil); err == nil {
		t.Fatal("client trusted a Pebble certificate without Pebble's root")
	}
	trust := &tls.Config{RootCAs: roots}
	a, aKey, err := certsDerpClient(t, node, trust)
	if err != nil {
		t.Fatalf("client trusting Pebble's root: %v", err)
	}
	b, _, err = certsDerpClient(t, node, trust)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certsExchange(a, aKey, b, payload); err != nil {
		t.Fatal(err)
	}
	return a, b
}

func certsTlsState(t *testing.T, c *derphttp.Client) *tls.ConnectionState {
	t.Helper()
	cs, ok := c.TLSConnectionState()
	if !ok {
		t.Fatal("client has no TLS state")
	}
	return cs
}

func TestCertsTailscalePinnedSelfSigned(t *testing.T) {
	ln, _ := certsListen(t)
	dir := t.TempDir()
	site, p := certsStartDERPSite(t, certs.Config{Mode: certs.ModeManual, Dir: dir, Hostname: "127.0.0.1",
		Logger: slog.New(slog.NewTextHandler(certsTestLogWriter{t}, nil))}, ln)
	n := p.DERPMapNode(certs.NodeInfo{DERPPort: site.port, STUNPort: -1, HTTPPort: -1})
	node := &tailcfg.DERPNode{Name: n.Name, RegionID: n.RegionID, HostName: n.HostName, CertName: n.CertName,
		IPv4: n.IPv4, IPv6: "none", DERPPort: n.DERPPort, STUNPort: n.STUNPort}
	if node.CertName == "" || node.IPv4 != "127.0.0.1" {
		t.Fatalf("DERP map node %+v", n)
	}

	a, aKey, err := certsDerpClient(t, node, nil)
	if err != nil {
		t.Fatalf("client with pinned CertName: %v", err)
	}
	b, bKey, err := certsDerpClient(t, node, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certsExchange(a, aKey, b, "a to b"); err != nil {
		t.Fatal(err)
	}
	if _, err := certsExchange(b, bKey, a, "b to a"); err != nil {
		t.Fatal(err)
	}
	if v := certsTlsState(t, a).Version; v != tls.VersionTLS13 {
		t.Errorf("negotiated %s", tls.VersionName(v))
	}
	// With TLS 1.3 both clients read the meta certificate and used fast start.
	for i, r := range site.seen() {
		if !r.fastStart || r.version != tls.VersionTLS13 {
			t.Errorf("request %d: fast start %v over %s", i, r.fastStart, tls.VersionName(r.version))
		}
	}
	if pub := site.srv.PublicKey(); a.ServerPublicKey() != key.NodePublicFromRaw32(mem.B(pub[:])) {
		t.Error("client learned a different server key")
	}

	// A TLS 1.2 client verifies the same pin and takes the 101 path.
	c, cKey, err := certsDerpClient(t, node, &tls.Config{MaxVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("TLS 1.2 client: %v", err)
	}
	if v := certsTlsState(t, c).Version; v != tls.VersionTLS12 {
		t.Errorf("TLS 1.2 client negotiated %s", tls.VersionName(v))
	}
	if _, err := certsExchange(c, cKey, a, "over 1.2"); err != nil {
		t.Fatal(err)
	}
	if last := site.seen()[len(site.seen())-1]; last.fastStart || last.version != tls.VersionTLS12 {
		t.Errorf("TLS 1.2 request: %+v", last)
	}

	// A wrong pin is refused by the client.
	bad := *node
	bad.CertName = certs.CertNameFor([]byte("some other certificate"))
	if _, _, err := certsDerpClient(t, &bad, nil); err == nil {
		t.Fatal("client accepted a certificate that does not match its pin")
	}
}

func TestCertsTailscaleACMEIssued(t *testing.T) {
	tlsLn, tlsPort := certsListen(t)
	httpLn, httpPort := certsListen(t)
	pb := certsStartPebble(t, certsPebbleOpts{httpPort: httpPort, tlsPort: tlsPort})
	site, p := certsStartDERPSite(t, certs.Config{Mode: certs.ModeLetsEncrypt, Dir: filepath.Join(t.TempDir(), "acme"),
		Hostname: certsTestHost, ACMEDirectory: pb.dirURL, HTTPClient: pb.client}, tlsLn)
	httpSrv := &http.Server{Handler: p.HTTPHandler(http.NotFoundHandler())}
	go httpSrv.Serve(httpLn)
	t.Cleanup(func() { httpSrv.Close() })

	node := &tailcfg.DERPNode{Name: "900a", RegionID: 900, HostName: certsTestHost,
		IPv4: "127.0.0.1", IPv6: "none", DERPPort: site.port, STUNPort: -1}
	a, _ := certsRelayTrusting(t, node, pb.roots, "issued by pebble")
	leaf := certsTlsState(t, a).PeerCertificates[0]
	if leaf.DNSNames[0] != certsTestHost || leaf.Issuer.CommonName == leaf.Subject.CommonName {
		t.Errorf("leaf %v issued by %q", leaf.DNSNames, leaf.Issuer.CommonName)
	}
	if r := site.seen(); len(r) == 0 || !r[len(r)-1].fastStart {
		t.Errorf("ACME-certified TLS 1.3 connection did not use fast start: %+v", r)
	}
}

// certsTestCA issues certificates for the reload test.
type certsTestCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func certsNewTestCA(t *testing.T) *certsTestCA {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "xderp test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &certsTestCA{cert: c, key: k}
}

// issue writes a fresh certificate for host into dir/host.crt and .key by
// atomic renames and returns its DER.
func (ca *certsTestCA) issue(t *testing.T, dir, host string) []byte {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: serial,
		Subject: pkix.Name{CommonName: host}, DNSNames: []string{host},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, ca.cert, &k.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalPKCS8PrivateKey(k)
	certsWriteAtomic(t, filepath.Join(dir, host+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}))
	certsWriteAtomic(t, filepath.Join(dir, host+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	return der
}

func certsWriteAtomic(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestCertsTailscaleManualReload(t *testing.T) {
	const host = certsTestHost
	dir := t.TempDir()
	ca := certsNewTestCA(t)
	firstDER := ca.issue(t, dir, host)
	reg := metrics.NewRegistry()
	ln, _ := certsListen(t)
	site, _ := certsStartDERPSite(t, certs.Config{Mode: certs.ModeManual, Dir: dir, Hostname: host,
		PollInterval: 50 * time.Millisecond, Metrics: reg,
		Logger: slog.New(slog.NewTextHandler(certsTestLogWriter{t}, nil))}, ln)
	node := &tailcfg.DERPNode{Name: "900a", RegionID: 900, HostName: host,
		IPv4: "127.0.0.1", IPv6: "none", DERPPort: site.port, STUNPort: -1}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	base := &tls.Config{RootCAs: pool}

	a, aKey, err := certsDerpClient(t, node, base)
	if err != nil {
		t.Fatal(err)
	}
	b, bKey, err := certsDerpClient(t, node, base)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(certsTlsState(t, a).PeerCertificates[0].Raw, firstDER) {
		t.Fatal("not serving the first certificate")
	}
	genA, err := certsExchange(b, bKey, a, "warm up a")
	if err != nil {
		t.Fatal(err)
	}
	genB, err := certsExchange(a, aKey, b, "warm up b")
	if err != nil {
		t.Fatal(err)
	}

	// Keep a and b exchanging packets while the files are replaced; every
	// packet must arrive on the same connection (same generation).
	stop := make(chan struct{})
	trafficErr := make(chan error, 1)
	var sent atomic.Int32
	go func() {
		for i := 0; i < 100000; i++ { // bounded; normally stopped long before
			select {
			case <-stop:
				trafficErr <- nil
				return
			default:
			}
			gb, err := certsExchange(a, aKey, b, fmt.Sprintf("ping %d", i))
			if err == nil && gb != genB {
				err = fmt.Errorf("b reconnected (generation %d -> %d)", genB, gb)
			}
			if err == nil {
				var ga int
				ga, err = certsExchange(b, bKey, a, fmt.Sprintf("pong %d", i))
				if err == nil && ga != genA {
					err = fmt.Errorf("a reconnected (generation %d -> %d)", genA, ga)
				}
			}
			if err != nil {
				trafficErr <- fmt.Errorf("packet %d: %w", i, err)
				return
			}
			sent.Add(1)
		}
		trafficErr <- nil
	}()

	secondDER := ca.issue(t, dir, host)
	served := func() []byte {
		c, _, err := certsDerpClient(t, node, base)
		if err != nil {
			t.Fatalf("new client during reload: %v", err)
		}
		defer c.Close()
		return certsTlsState(t, c).PeerCertificates[0].Raw
	}
	deadline := time.Now().Add(20 * time.Second)
	for !bytes.Equal(served(), secondDER) {
		if time.Now().After(deadline) {
			t.Fatal("new certificate not served within 20 s")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A corrupt replacement is refused; the second certificate stays.
	certsWriteAtomic(t, filepath.Join(dir, host+".crt"), []byte("-----BEGIN CERTIFICATE-----\nbroken\n"))
	deadline = time.Now().Add(20 * time.Second)
	for certsMetric(t, reg, `xderp_tls_cert_reloads_total{result="error"}`) < 1 {
		if time.Now().After(deadline) {
			t.Fatal("corrupt certificate not noticed within 20 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !bytes.Equal(served(), secondDER) {
		t.Fatal("corrupt replacement changed the served certificate")
	}
	// Let the traffic run across all of this for a few more round trips.
	base0 := sent.Load()
	deadline = time.Now().Add(20 * time.Second)
	for sent.Load() < base0+5 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	if err := <-trafficErr; err != nil {
		t.Fatalf("established clients disturbed by reload: %v", err)
	}
	if sent.Load() < 5 {
		t.Fatalf("only %d round trips during the reload", sent.Load())
	}
	t.Logf("%d round trips on unchanged connections across two replacements", sent.Load())
	// The old connections still carry the first certificate.
	if !bytes.Equal(certsTlsState(t, a).PeerCertificates[0].Raw, firstDER) {
		t.Error("client a's connection state changed")
	}
}

// TestCertsTailscaleACMEIPCert: a node known only by its IP address gets a
// CA-issued certificate for that address (-acme-ip-certs) from Pebble, by
// HTTP-01 through the port-80 listener or, without one, by TLS-ALPN-01 on
// the TLS port. It asks for the CA's short-lived profile, which IP
// certificates come from. Tailscale's client, given a DERP map entry whose
// HostName is the address and which pins nothing, trusts it through
// Pebble's root, relays through it with fast start, and the certificate is
// renewed before it expires.
func TestCertsTailscaleACMEIPCert(t *testing.T) {
	const shortlived = 60 // seconds
	for _, tc := range []struct {
		name string
		// port80: the port-80 listener exists (HTTP-01 is tried first);
		// reachable: the CA's validator reaches it.
		port80, reachable bool
	}{
		{"http-01", true, true},
		{"tls-alpn-01", false, false},
		{"http-01 blocked, tls-alpn-01", true, false},
	} {
		viaHTTP := tc.port80 && tc.reachable
		t.Run(tc.name, func(t *testing.T) {
			tlsLn, tlsPort := certsListen(t)
			httpLn, httpPort := certsListen(t)
			if !tc.reachable {
				httpPort = certsFreePort(t) // the validator's HTTP-01 request finds nothing
			}
			pb := certsStartPebble(t, certsPebbleOpts{httpPort: httpPort, tlsPort: tlsPort, shortlived: shortlived})
			dir := filepath.Join(t.TempDir(), "acme")
			reg := metrics.NewRegistry()
			site, p := certsStartDERPSite(t, certs.Config{Mode: certs.ModeLetsEncrypt, Dir: dir, Hostname: "127.0.0.1",
				ACMEIPCerts: true, ACMEDirectory: pb.dirURL, HTTPClient: pb.client, Metrics: reg,
				// Renew 10 s after issuance, so the test sees a renewal.
				RenewBefore: (shortlived - 10) * time.Second}, tlsLn)
			var challenges atomic.Int32
			if tc.port80 {
				h := p.HTTPHandler(http.NotFoundHandler())
				httpSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if strings.HasPrefix(r.URL.Path, "/.well-known/acme-challenge/") {
						challenges.Add(1)
					}
					h.ServeHTTP(w, r)
				})}
				go httpSrv.Serve(httpLn)
				t.Cleanup(func() { httpSrv.Close() })
			} else {
				httpLn.Close()
			}
			// Well below the 1 min backoff: a blocked HTTP-01 must be
			// followed at once by TLS-ALPN-01.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := p.Prefetch(ctx); err != nil {
				t.Fatal(err)
			}
			if viaHTTP && challenges.Load() == 0 {
				t.Error("issued without an HTTP-01 request on the port-80 listener")
			}

			dm := p.DERPMapNode(certs.NodeInfo{DERPPort: site.port, STUNPort: -1})
			if dm.CertName != "" || dm.HostName != "127.0.0.1" {
				t.Errorf("DERP map entry %+v: want HostName 127.0.0.1 and no pin", dm)
			}
			node := &tailcfg.DERPNode{Name: dm.Name, RegionID: dm.RegionID, HostName: dm.HostName, IPv4: dm.IPv4, IPv6: "none",
				DERPPort: site.port, STUNPort: -1}
			a, b := certsRelayTrusting(t, node, pb.roots, "ip certificate")
			roots := &tls.Config{RootCAs: pb.roots}
			leaf := certsTlsState(t, a).PeerCertificates[0]
			if len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.IPv4(127, 0, 0, 1)) || len(leaf.DNSNames) != 0 {
				t.Errorf("leaf names IPs %v and DNS names %v, want only 127.0.0.1", leaf.IPAddresses, leaf.DNSNames)
			}
			if life := leaf.NotAfter.Sub(leaf.NotBefore); life > 2*shortlived*time.Second {
				t.Errorf("leaf lifetime %v: the short-lived profile (%d s) was not asked for", life, shortlived)
			}
			if r := site.seen(); len(r) == 0 || !r[len(r)-1].fastStart {
				t.Errorf("TLS 1.3 connection did not use fast start: %+v", r)
			}
			if v := certsMetric(t, reg, `xderp_tls_cert_expiry_seconds{name="127.0.0.1"}`); v <= 0 || v > shortlived {
				t.Errorf("expiry gauge %v", v)
			}
			// Cached with its key at 0600 in a 0700 directory.
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				if fi, _ := e.Info(); fi.Mode().Perm()&0o077 != 0 {
					t.Errorf("%s has mode %o", e.Name(), fi.Mode().Perm())
				}
			}

			// Renewal: a new client soon sees a certificate with another
			// serial number, and the relay keeps working.
			deadline := time.Now().Add(60 * time.Second)
			for {
				c, cKey, err := certsDerpClient(t, node, roots)
				if err != nil {
					t.Fatal(err)
				}
				if now := certsTlsState(t, c).PeerCertificates[0]; now.SerialNumber.Cmp(leaf.SerialNumber) != 0 {
					if _, err := certsExchange(c, cKey, b, "after renewal"); err != nil {
						t.Fatal(err)
					}
					break
				}
				c.Close()
				if time.Now().After(deadline) {
					t.Fatal("certificate not renewed within 60 s")
				}
				time.Sleep(500 * time.Millisecond) // pace the new connections
			}

			// A restart serves the cached certificate at once, with the CA
			// unreachable.
			p.Close()
			p2, err := certs.New(certs.Config{Mode: certs.ModeLetsEncrypt, Dir: dir, Hostname: "127.0.0.1", ACMEIPCerts: true,
				ACMEDirectory: pb.dirURL, HTTPClient: &http.Client{Transport: certsFailingTransport{}}, DERPPublicKey: certsTestDERPKey})
			if err != nil {
				t.Fatal(err)
			}
			defer p2.Close()
			c, err := p2.GetCertificate(&tls.ClientHelloInfo{})
			if err != nil {
				t.Fatalf("after a restart with the CA unreachable: %v", err)
			}
			if c.Leaf == nil || len(c.Leaf.IPAddresses) != 1 || !c.Leaf.IPAddresses[0].Equal(net.IPv4(127, 0, 0, 1)) || !time.Now().Before(c.Leaf.NotAfter) {
				t.Errorf("cached certificate %v", c.Leaf)
			}
		})
	}
}
