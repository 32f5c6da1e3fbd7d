package certs

import (
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

func (p *Provider) initACME() error {
	host := p.cfg.Hostname
	if p.hostIsIP {
		return fmt.Errorf("certs: hostname %q: an IP address cannot get an ACME certificate here; use -certmode manual (self-signed, pinned by CertName)", host)
	}
	if !strings.Contains(strings.Trim(host, "."), ".") {
		return fmt.Errorf("certs: hostname %q: ACME needs a fully qualified DNS name", host)
	}
	dirURL := p.cfg.ACMEDirectory
	if dirURL == "" {
		dirURL = autocert.DefaultACMEDirectory
	}
	if !strings.HasPrefix(dirURL, "https://") && !strings.HasPrefix(dirURL, "http://") {
		return fmt.Errorf("certs: acme-directory %q: not an http(s) URL", dirURL)
	}
	hc := p.cfg.HTTPClient
	if hc == nil && p.cfg.RootCAs != nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: p.cfg.RootCAs, MinVersion: tls.VersionTLS12}
		hc = &http.Client{Transport: tr}
	}
	m := &autocert.Manager{
		Prompt:      autocert.AcceptTOS,
		Cache:       autocert.DirCache(p.cfg.Dir),
		HostPolicy:  autocert.HostWhitelist(host),
		RenewBefore: p.cfg.RenewBefore,
		Email:       p.cfg.ACMEEmail,
		Client:      &acme.Client{DirectoryURL: dirURL, HTTPClient: hc},
	}
	if p.cfg.EABKeyID != "" {
		key, err := DecodeEABKey(p.cfg.EABKey)
		if err != nil {
			return fmt.Errorf("certs: acme-eab-key: %w", err)
		}
		m.ExternalAccountBinding = &acme.ExternalAccountBinding{KID: p.cfg.EABKeyID, Key: key}
	}
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
	c, err := p.acm.GetCertificate(hello)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoCertificate, err)
	}
	if c.Leaf != nil && p.m != nil {
		p.m.noteExpiryLeaf(p.cfg.Hostname, c.Leaf)
	}
	return p.withMeta(c), nil
}
