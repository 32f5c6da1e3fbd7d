// Package certs owns the TLS side of an xderp node: where its certificate
// comes from (ACME through autocert, operator-supplied files that reload
// without a restart, or a self-signed certificate for an IP-only node), the
// DERP meta certificate appended to every chain so TLS 1.3 clients can use
// Derp-Fast-Start, the server tls.Config, the port-80 ACME HTTP-01 handler,
// and the TLS metrics (handshakes by version, handshake errors by reason,
// seconds until each certificate expires).
//
// The package returns errors and logs only per-connection and per-reload
// events through the injected *slog.Logger.
package certs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/xderp/xderp/userspace/metrics"
)

// Certificate modes accepted in Config.Mode (derper's -certmode values).
const (
	ModeLetsEncrypt = "letsencrypt"
	ModeManual      = "manual"
)

// Defaults used when the corresponding Config field is zero.
const (
	DefaultPollInterval     = 5 * time.Second
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultMaxPending       = 4096
)

// ErrNoCertificate is returned (wrapped) by GetCertificate when the client
// asked for a name this server has no certificate for.
var ErrNoCertificate = errors.New("no certificate for requested server name")

// Config configures a Provider.
type Config struct {
	// Mode is "letsencrypt" (ACME via autocert) or "manual" (files in Dir).
	// Required.
	Mode string
	// Dir is the ACME cache directory, or where manual <Hostname>.crt and
	// <Hostname>.key live. Required. Created with mode 0700 if missing.
	Dir string
	// Hostname is the TLS server name. In manual mode it may be an IP
	// address; then a self-signed certificate is generated if no files exist.
	// Required.
	Hostname string
	// ACMEDirectory is the ACME directory URL. Default: Let's Encrypt
	// production (autocert.DefaultACMEDirectory).
	ACMEDirectory string
	// ACMEEmail is the optional ACME account contact address.
	ACMEEmail string
	// EABKeyID and EABKey are the External Account Binding key id and HMAC
	// key (base64url without padding as ACME CAs issue it; standard base64 is
	// accepted too). Both or neither.
	EABKeyID, EABKey string
	// ACMEIPCerts (letsencrypt mode) obtains a certificate for Hostname,
	// which must then be an IP address, through ACME IP identifiers.
	ACMEIPCerts bool
	// RenewBefore is how long before expiry an ACME certificate is renewed.
	// Default (zero): a third of the certificate lifetime, capped at 30 days.
	RenewBefore time.Duration
	// DERPPublicKey is the server's DERP public key, written into the meta
	// certificate. Required (the zero key is refused).
	DERPPublicKey [32]byte
	// PollInterval is how often manual mode checks the files for changes.
	// Default 5 s. A change is applied once the files have been stable for
	// one interval.
	PollInterval time.Duration
	// HandshakeTimeout bounds a TLS handshake on a listener returned by
	// WrapListener. Default 10 s.
	HandshakeTimeout time.Duration
	// MaxPendingHandshakes bounds concurrent handshakes on a listener
	// returned by WrapListener; connections above it are closed at once and
	// counted with reason "overload". Default 4096.
	MaxPendingHandshakes int
	// Logger receives per-reload and (rate-limited) per-handshake events.
	// Default: discard.
	Logger *slog.Logger
	// Metrics receives the TLS metrics. Default: a private registry.
	Metrics *metrics.Registry
	// RootCAs, if set, is the trust store of the ACME client (tests: the ACME
	// server's TLS certificate). Ignored if HTTPClient is set.
	RootCAs *x509.CertPool
	// HTTPClient, if set, is the ACME client's HTTP client.
	HTTPClient *http.Client

	now func() time.Time // tests
}

// Provider serves certificates for one host name. Create it with New.
type Provider struct {
	cfg      Config
	hostIsIP bool
	log      *slog.Logger
	now      func() time.Time

	meta     *metaCert
	certName string // "sha256-raw:<hex>" for a self-signed pinned cert

	// manual mode
	crtPath, keyPath string
	cur              atomic.Pointer[loadedCert]
	reloadMu         sync.Mutex
	watchStop        chan struct{}
	watchDone        chan struct{}

	// letsencrypt mode
	acm          *autocert.Manager
	issueBackoff backoff
	ipm          *ipACME // -acme-ip-certs instead of acm

	m         *tlsMetrics
	closeOnce sync.Once
	closed    atomic.Bool
}

// loadedCert is one validated certificate/key pair.
type loadedCert struct {
	cert tls.Certificate // Leaf set
	hash [32]byte        // sha256 of crt file bytes || key file bytes
}

var unsafeHostnameChars = regexp.MustCompile(`[^a-zA-Z0-9.-]`)

// New validates cfg and returns a Provider; it registers the TLS metrics in
// cfg.Metrics, so call it once per registry. In manual mode it loads (or, for
// an IP host name without files, creates) the certificate and starts watching
// the files; in letsencrypt mode it sets up autocert but obtains nothing until
// the first handshake or Prefetch.
func New(cfg Config) (*Provider, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.NewRegistry()
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.MaxPendingHandshakes <= 0 {
		cfg.MaxPendingHandshakes = DefaultMaxPending
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	if cfg.Mode != ModeManual && cfg.Mode != ModeLetsEncrypt {
		return nil, fmt.Errorf("certs: certmode: unknown mode %q (want %q or %q)", cfg.Mode, ModeLetsEncrypt, ModeManual)
	}
	if cfg.Hostname == "" {
		return nil, errors.New("certs: hostname: required")
	}
	if cfg.Dir == "" {
		return nil, errors.New("certs: certdir: required")
	}
	if cfg.DERPPublicKey == ([32]byte{}) {
		return nil, errors.New("certs: DERP public key: required (zero key)")
	}
	if cfg.ACMEIPCerts && cfg.Mode != ModeLetsEncrypt {
		return nil, errors.New("certs: acme-ip-certs: needs -certmode letsencrypt")
	}
	if (cfg.EABKeyID == "") != (cfg.EABKey == "") {
		return nil, errors.New("certs: acme-eab-kid and acme-eab-key: set both or neither")
	}
	p := &Provider{
		cfg:      cfg,
		hostIsIP: net.ParseIP(cfg.Hostname) != nil,
		log:      cfg.Logger,
		now:      cfg.now,
	}
	meta, err := newMetaCert(cfg.DERPPublicKey, cfg.now())
	if err != nil {
		return nil, err
	}
	p.meta = meta
	// The ACME cache must be writable; manual certificates may live in a
	// read-only place (writing is needed only to create a self-signed one,
	// and that write reports its own error).
	if err := checkDir(cfg.Dir, cfg.Mode == ModeLetsEncrypt); err != nil {
		return nil, err
	}
	if cfg.Mode == ModeManual {
		err = p.initManual()
	} else {
		err = p.initACME()
	}
	if err != nil {
		return nil, err
	}
	p.m = newTLSMetrics(cfg.Metrics, p)
	if p.ipm != nil {
		if c := p.ipm.cur.Load(); c != nil { // from the cache
			p.m.noteExpiryLeaf(cfg.Hostname, c.Leaf)
		}
	}
	if cfg.Mode == ModeManual {
		p.startWatch()
	}
	return p, nil
}

// checkDir makes sure dir exists (creating it 0700) and can be listed and,
// if needWrite, written, so a bad -certdir fails at start rather than at
// first issuance.
func checkDir(dir string, needWrite bool) error {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("certs: certdir %s: %w", dir, err)
		}
	case err != nil:
		return fmt.Errorf("certs: certdir %s: %w", dir, err)
	case !fi.IsDir():
		return fmt.Errorf("certs: certdir %s: not a directory", dir)
	}
	if _, err := os.ReadDir(dir); err != nil {
		return fmt.Errorf("certs: certdir %s: unreadable: %w", dir, err)
	}
	if !needWrite {
		return nil
	}
	f, err := os.CreateTemp(dir, ".xderp-probe-*")
	if err != nil {
		return fmt.Errorf("certs: certdir %s: not writable: %w", dir, err)
	}
	name := f.Name()
	f.Close()
	os.Remove(name)
	return nil
}

// TLSConfig returns a new server TLS config: TLS 1.2 minimum, ALPN http/1.1
// (plus acme-tls/1 in letsencrypt mode for TLS-ALPN-01), and a GetCertificate
// that returns the current chain with the DERP meta certificate appended.
func (p *Provider) TLSConfig() *tls.Config {
	protos := []string{"http/1.1"}
	if p.acm != nil || p.ipm != nil {
		protos = append(protos, acme.ALPNProto)
	}
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     protos,
		GetCertificate: p.GetCertificate,
	}
}

// GetCertificate implements tls.Config.GetCertificate. The returned
// certificate is a fresh shallow copy: callers may not mutate shared state.
func (p *Provider) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if p.acm != nil {
		return p.getACME(hello)
	}
	if p.ipm != nil {
		return p.ipm.getCertificate(hello)
	}
	if !p.hostIsIP && hello.ServerName != "" && !strings.EqualFold(strings.TrimSuffix(hello.ServerName, "."), p.cfg.Hostname) {
		return nil, fmt.Errorf("%w: %q", ErrNoCertificate, hello.ServerName)
	}
	lc := p.cur.Load()
	return p.withMeta(&lc.cert), nil
}

// withMeta returns a copy of c whose chain ends with the meta certificate.
func (p *Provider) withMeta(c *tls.Certificate) *tls.Certificate {
	out := *c
	out.Certificate = append(slices.Clip(c.Certificate), p.meta.der)
	return &out
}

// HTTPHandler returns the port-80 handler: ACME HTTP-01 challenges in
// letsencrypt mode (calling it is what enables HTTP-01), everything else to
// fallback. In manual mode it returns fallback itself.
func (p *Provider) HTTPHandler(fallback http.Handler) http.Handler {
	if p.ipm != nil {
		return p.ipm.httpHandler(fallback)
	}
	if p.acm == nil {
		return fallback
	}
	h := p.acm.HTTPHandler(fallback)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// autocert checks the host policy against r.Host verbatim; a
		// validator that writes "name:port" must still match the name.
		if host, _, err := net.SplitHostPort(r.Host); err == nil && strings.HasPrefix(r.URL.Path, "/.well-known/acme-challenge/") {
			r2 := *r
			r2.Host = host
			r = &r2
		}
		h.ServeHTTP(w, r)
	})
}

// CertName returns "sha256-raw:<hex>" when the served certificate is a
// self-signed one that clients must pin in the DERP map, else "".
func (p *Provider) CertName() string {
	if p.acm != nil {
		return ""
	}
	lc := p.cur.Load()
	if lc == nil || !isSelfSigned(lc.cert.Leaf) {
		return ""
	}
	return CertNameFor(lc.cert.Leaf.Raw)
}

// CertNameFor returns the DERP map CertName that pins the certificate whose
// DER encoding is der: "sha256-raw:" + lower-case hex of its SHA-256.
func CertNameFor(der []byte) string {
	sum := sha256.Sum256(der)
	return "sha256-raw:" + hex.EncodeToString(sum[:])
}

func isSelfSigned(c *x509.Certificate) bool {
	if c == nil {
		return false
	}
	// CheckSignatureFrom would demand IsCA; a leaf signed by its own key
	// is what we mean here.
	return bytes.Equal(c.RawIssuer, c.RawSubject) &&
		c.CheckSignature(c.SignatureAlgorithm, c.RawTBSCertificate, c.Signature) == nil
}

// Hostname returns the configured host name.
func (p *Provider) Hostname() string { return p.cfg.Hostname }

// Mode returns the certificate mode.
func (p *Provider) Mode() string { return p.cfg.Mode }

// Close stops the file watcher (manual) or disarms ACME renewal
// (letsencrypt: autocert's timers cannot be stopped, so after Close their
// attempts fail without contacting the CA or writing the cache).
// Certificates already loaded keep being served and established TLS
// connections are unaffected.
func (p *Provider) Close() error {
	p.closeOnce.Do(func() {
		p.closed.Store(true)
		if p.ipm != nil {
			p.ipm.close()
		}
		if p.watchStop != nil {
			close(p.watchStop)
			<-p.watchDone
		}
	})
	return nil
}

// Prefetch obtains (letsencrypt) or checks (manual) the certificate for the
// host name now, so the first client does not wait for ACME. The daemon calls
// it in the background once its listeners are up.
func (p *Provider) Prefetch(ctx context.Context) error {
	if p.ipm != nil {
		if err := p.ipm.prefetch(ctx); err != nil {
			return fmt.Errorf("certs: obtain certificate for %s: %w", p.cfg.Hostname, err)
		}
		return nil
	}
	if p.acm == nil {
		return nil
	}
	hello := &tls.ClientHelloInfo{
		ServerName:        p.cfg.Hostname,
		SignatureSchemes:  []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256},
		SupportedCurves:   []tls.CurveID{tls.CurveP256},
		CipherSuites:      []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
		SupportedVersions: []uint16{tls.VersionTLS13, tls.VersionTLS12},
	}
	type res struct{ err error }
	ch := make(chan res, 1)
	go func() {
		_, err := p.getACME(hello)
		ch <- res{err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return fmt.Errorf("certs: obtain certificate for %s: %w", p.cfg.Hostname, r.err)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *Provider) sanitizedName() string {
	return unsafeHostnameChars.ReplaceAllString(p.cfg.Hostname, "")
}

func filePaths(dir, name string) (crt, key string) {
	return filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
}
