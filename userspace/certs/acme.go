package certs

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

func (p *Provider) initACME() error {
	host := p.cfg.Hostname
	switch {
	case p.cfg.ACMEIPCerts && !p.hostIsIP:
		return fmt.Errorf("certs: acme-ip-certs: hostname %q is not an IP address (a DNS name gets its certificate without the flag)", host)
	case p.hostIsIP && !p.cfg.ACMEIPCerts:
		return fmt.Errorf("certs: hostname %q: an IP address gets an ACME certificate only with -acme-ip-certs; or use -certmode manual (self-signed, pinned by CertName)", host)
	}
	if !p.hostIsIP && !strings.Contains(strings.Trim(host, "."), ".") {
		return fmt.Errorf("certs: hostname %q: ACME needs a fully qualified DNS name", host)
	}
	dirURL := p.cfg.ACMEDirectory
	if dirURL == "" {
		dirURL = autocert.DefaultACMEDirectory
	}
	if !strings.HasPrefix(dirURL, "https://") && !strings.HasPrefix(dirURL, "http://") {
		return fmt.Errorf("certs: acme-directory %q: not an http(s) URL", dirURL)
	}
	var base http.RoundTripper = http.DefaultTransport
	hc := &http.Client{}
	switch {
	case p.cfg.HTTPClient != nil:
		*hc = *p.cfg.HTTPClient
		if hc.Transport != nil {
			base = hc.Transport
		}
	case p.cfg.RootCAs != nil:
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: p.cfg.RootCAs, MinVersion: tls.VersionTLS12}
		base = tr
	}
	// autocert has no way to stop its renewal timers; after Close these
	// make every renewal attempt fail without touching the CA or the disk.
	hc.Transport = closableTransport{base: base, closed: &p.closed}
	var eab *acme.ExternalAccountBinding
	if p.cfg.EABKeyID != "" {
		key, err := DecodeEABKey(p.cfg.EABKey)
		if err != nil {
			return fmt.Errorf("certs: acme-eab-key: %w", err)
		}
		eab = &acme.ExternalAccountBinding{KID: p.cfg.EABKeyID, Key: key}
	}
	if p.hostIsIP {
		return p.initIPACME(hc, dirURL, eab)
	}
	m := &autocert.Manager{
		Prompt:      autocert.AcceptTOS,
		Cache:       closableCache{Cache: autocert.DirCache(p.cfg.Dir), closed: &p.closed},
		HostPolicy:  autocert.HostWhitelist(host),
		RenewBefore: p.cfg.RenewBefore,
		Email:       p.cfg.ACMEEmail,
		Client:      &acme.Client{DirectoryURL: dirURL, HTTPClient: hc},
	}
	m.ExternalAccountBinding = eab
	p.acm = m
	return nil
}

// DecodeEABKey decodes an External Account Binding HMAC key: base64url
// without padding (RFC 8555, how CAs print it) or standard base64.
func DecodeEABKey(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	for _, enc := range []*base64.Encoding{base64.RawURLEncoding, base64.URLEncoding, base64.StdEncoding, base64.RawStdEncoding} {
		if b, err := enc.DecodeString(s); err == nil && len(b) > 0 {
			return b, nil
		}
	}
	return nil, errors.New("not base64url or base64")
}

// isChallengeHello reports whether hello is an ACME TLS-ALPN-01 validation
// (it offers only acme-tls/1).
func isChallengeHello(hello *tls.ClientHelloInfo) bool {
	return len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == acme.ALPNProto
}

func (p *Provider) getACME(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if isChallengeHello(hello) {
		// The challenge certificate goes out alone: the validator wants
		// exactly the acmeIdentifier certificate.
		return p.acm.GetCertificate(hello)
	}
	if hello.ServerName == "" {
		// Clients dialling by IP (probes, curl) get the host name's
		// certificate instead of a handshake failure.
		h := *hello
		h.ServerName = p.cfg.Hostname
		hello = &h
	}
	hello = preferECDSA(hello)
	ours := strings.EqualFold(strings.TrimSuffix(hello.ServerName, "."), p.cfg.Hostname)
	if ours {
		if err := p.issueBackoff.check(p.now()); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNoCertificate, err)
		}
	}
	c, err := p.acm.GetCertificate(hello)
	if ours {
		// Only our own name can reach issuance (the host whitelist
		// refuses the rest), so only its failures start the backoff.
		p.issueBackoff.record(p.now(), err)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoCertificate, err)
	}
	if c.Leaf != nil && p.m != nil {
		p.m.noteExpiryLeaf(p.cfg.Hostname, c.Leaf)
	}
	return p.withMeta(c), nil
}

var errClosed = errors.New("certs: provider closed")

type closableTransport struct {
	base   http.RoundTripper
	closed *atomic.Bool
}

func (t closableTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if t.closed.Load() {
		return nil, errClosed
	}
	return t.base.RoundTrip(r)
}

type closableCache struct {
	autocert.Cache
	closed *atomic.Bool
}

func (c closableCache) Get(ctx context.Context, name string) ([]byte, error) {
	if c.closed.Load() {
		return nil, autocert.ErrCacheMiss
	}
	return c.Cache.Get(ctx, name)
}

func (c closableCache) Put(ctx context.Context, name string, data []byte) error {
	if c.closed.Load() {
		return errClosed
	}
	return c.Cache.Put(ctx, name, data)
}

func (c closableCache) Delete(ctx context.Context, name string) error {
	if c.closed.Load() {
		return errClosed
	}
	return c.Cache.Delete(ctx, name)
}

// preferECDSA lets autocert pick its ECDSA certificate for TLS 1.3-only
// clients. autocert decides by looking for an ECDHE_ECDSA TLS 1.2 cipher
// suite; a client offering only TLS 1.3 lists none, yet in TLS 1.3 the
// suite does not constrain the certificate, only the signature schemes do.
// Without this, such a client would make autocert order a second (RSA)
// certificate.
func preferECDSA(hello *tls.ClientHelloInfo) *tls.ClientHelloInfo {
	if !slices.Contains(hello.SupportedVersions, tls.VersionTLS13) ||
		!slices.Contains(hello.SignatureSchemes, tls.ECDSAWithP256AndSHA256) ||
		slices.Contains(hello.CipherSuites, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256) {
		return hello
	}
	h := *hello
	h.CipherSuites = append(slices.Clip(hello.CipherSuites), tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
	return &h
}

// Issuance backoff bounds. autocert retries a failed issuance on the very
// next handshake; with clients and scanners connecting all the time that
// would burn the CA's failed-validation rate limit (Let's Encrypt: 5 per
// hour) in seconds. Renewal failures do not reach here: autocert keeps
// serving the current certificate while it retries renewal on its own.
const (
	minIssueBackoff = time.Minute
	maxIssueBackoff = 30 * time.Minute
)

// backoff makes handshakes fail fast for a while after a failed issuance:
// 1 min, doubling to 30 min, reset by a success. (autocert itself only
// remembers a failure for one minute.)
type backoff struct {
	mu      sync.Mutex
	delay   time.Duration
	until   time.Time
	lastErr error
}

func (b *backoff) check(now time.Time) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if now.Before(b.until) {
		return fmt.Errorf("certificate issuance failed, next attempt after %s: %w",
			b.until.UTC().Format(time.RFC3339), b.lastErr)
	}
	return nil
}

func (b *backoff) record(now time.Time, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err == nil {
		b.delay, b.until, b.lastErr = 0, time.Time{}, nil
		return
	}
	if now.Before(b.until) {
		return // handshakes that waited on the same failed attempt
	}
	b.delay = min(max(2*b.delay, minIssueBackoff), maxIssueBackoff)
	b.until = now.Add(b.delay)
	b.lastErr = err
}
