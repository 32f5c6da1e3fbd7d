package certs

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"fmt"
	"math/big"
	"time"
)

// MetaCertCNPrefix starts the Common Name of the DERP meta certificate; the
// 64 lower-case hex digits of the server's DERP public key follow.
const MetaCertCNPrefix = "derpkey"

// ProtocolVersion is the DERP protocol version carried as the meta
// certificate's serial number.
const ProtocolVersion = 2

type metaCert struct {
	der  []byte
	leaf *x509.Certificate
}

// newMetaCert builds the self-signed Ed25519 certificate that tells TLS 1.3
// clients the server key and protocol version (protocol doc §3.4). Its own
// key is thrown away: nobody verifies its signature.
func newMetaCert(pub [32]byte, now time.Time) (*metaCert, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("certs: meta certificate key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(ProtocolVersion),
		Subject:               pkix.Name{CommonName: MetaCertCNPrefix + hex.EncodeToString(pub[:])},
		NotBefore:             now.Add(-30 * 24 * time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		BasicConstraintsValid: true, // macOS clients reject the chain without it
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		return nil, fmt.Errorf("certs: meta certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("certs: meta certificate: %w", err)
	}
	return &metaCert{der: der, leaf: leaf}, nil
}

// MetaCertDER returns the DER encoding of the meta certificate this provider
// appends to every chain.
func (p *Provider) MetaCertDER() []byte { return append([]byte(nil), p.meta.der...) }
