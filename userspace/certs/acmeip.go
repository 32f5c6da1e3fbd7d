package certs

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
)

// ACME certificates for an IP address (-acme-ip-certs): a node known only
// by its address gets a publicly trusted certificate, so its DERP map entry
// needs no pinned CertName. autocert handles DNS names only, so this is its
// own small ACME client (RFC 8555 with RFC 8738 IP identifiers): one
// certificate for the host's IP, obtained once the listeners are up,
// renewed when a third of its lifetime is left (Let's Encrypt issues IP
// certificates only from its short-lived profile, about six days), retried
// with a 1 min to 30 min backoff, and cached in the certificate directory
// so a restart serves at once. Validation is HTTP-01 through the port-80
// listener, or TLS-ALPN-01 on the TLS port when there is no port-80
// listener; an order that failed by HTTP-01 is retried at once by
// TLS-ALPN-01 before backing off.

const (
	// ipProfile is the ACME profile asked for when the CA offers it.
	ipProfile = "shortlived"
	// ipIssueTimeout bounds one issuance.
	ipIssueTimeout = 3 * time.Minute
	// ipAccountKeyFile and the certificate file live in Config.Dir.
	ipAccountKeyFile = "acme-ip-account.key"
	// ipCheckEvery bounds how long the renewal loop sleeps.
	ipCheckEvery = time.Hour
)

type ipACME struct {
	p      *Provider
	ip     netip.Addr
	client *acme.Client
	file   string // cached key and chain (PEM)

	cur     atomic.Pointer[tls.Certificate] // Leaf set; nil until obtained
	lastErr atomic.Pointer[error]           // the last failed issuance, for handshakes meanwhile

	http01 atomic.Bool // HTTPHandler was asked for: validate over HTTP-01
	// altALPN: an order by HTTP-01 failed, so the next one, at once, tries
	// TLS-ALPN-01 (port 80 may be firewalled while 443 is open). Loop-owned.
	altALPN bool

	chMu   sync.Mutex
	tokens map[string]string           // HTTP-01 token -> key authorization
	alpn   map[string]*tls.Certificate // TLS-ALPN-01 reverse name -> challenge certificate

	eab *acme.ExternalAccountBinding

	startOnce  sync.Once
	first      chan struct{} // closed once the first certificate is in place
	firstOnce  sync.Once
	stop, done chan struct{}
	registered bool // owned by the loop
}

func (p *Provider) initIPACME(hc *http.Client, dirURL string, eab *acme.ExternalAccountBinding) error {
	ip, err := netip.ParseAddr(p.cfg.Hostname)
	if err != nil {
		return fmt.Errorf("certs: acme-ip-certs: hostname %q is not an IP address", p.cfg.Hostname)
	}
	ip = ip.Unmap()
	if !ip.IsGlobalUnicast() && !ip.IsLoopback() {
		return fmt.Errorf("certs: acme-ip-certs: %v cannot be validated by a CA", ip)
	}
	m := &ipACME{
		p:      p,
		ip:     ip,
		client: &acme.Client{DirectoryURL: dirURL, HTTPClient: hc},
		file:   filepath.Join(p.cfg.Dir, "acme-ip-"+strings.ReplaceAll(ip.String(), ":", "-")+".pem"),
		tokens: map[string]string{},
		alpn:   map[string]*tls.Certificate{},
		first:  make(chan struct{}),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	key, err := loadOrCreateKey(filepath.Join(p.cfg.Dir, ipAccountKeyFile))
	if err != nil {
		return fmt.Errorf("certs: acme account key: %w", err)
	}
	m.client.Key = key
	m.eab = eab
	if c, err := m.loadCached(); err == nil {
		m.install(c)
	} else if !errors.Is(err, os.ErrNotExist) {
		p.log.Warn("cached IP certificate not used; a new one will be obtained", "file", m.file, "err", err)
	}
	p.ipm = m
	return nil
}

// start runs the issue-and-renew loop once.
func (m *ipACME) start() {
	m.startOnce.Do(func() { go m.loop() })
}

func (m *ipACME) close() {
	m.startOnce.Do(func() { close(m.done) }) // never started: nothing to wait for
	select {
	case <-m.stop:
	default:
		close(m.stop)
	}
	<-m.done
}

// renewAt is when c should be replaced: RenewBefore before expiry if set,
// else when a third of its lifetime is left.
func (m *ipACME) renewAt(c *tls.Certificate) time.Time {
	life := c.Leaf.NotAfter.Sub(c.Leaf.NotBefore)
	if d := m.p.cfg.RenewBefore; d > 0 && d < life {
		return c.Leaf.NotAfter.Add(-d)
	}
	// Also when RenewBefore is longer than the CA's lifetime, which
	// would otherwise mean renewing all the time.
	return c.Leaf.NotAfter.Add(-life / 3)
}

func (m *ipACME) loop() {
	defer close(m.done)
	var delay time.Duration // backoff after failures
	for {
		wait := ipCheckEvery
		cur := m.cur.Load()
		if now := m.p.now(); cur == nil || !now.Before(m.renewAt(cur)) {
			ctx, cancel := context.WithTimeout(context.Background(), ipIssueTimeout)
			go func() {
				select {
				case <-m.stop:
					cancel()
				case <-ctx.Done():
				}
			}()
			c, err := m.obtain(ctx)
			cancel()
			select {
			case <-m.stop:
				return
			default:
			}
			if err != nil {
				m.lastErr.Store(&err)
				if m.http01.Load() && !m.altALPN {
					// HTTP-01 failed (port 80 firewalled?): try
					// TLS-ALPN-01 at once before backing off.
					m.altALPN = true
					wait = time.Second
				} else {
					m.altALPN = false
					delay = min(max(2*delay, minIssueBackoff), maxIssueBackoff)
					wait = delay
				}
				m.p.log.Error("ACME certificate for the IP address not obtained; retrying", "ip", m.ip, "retry_in", wait, "err", err)
			} else {
				delay = 0
				m.lastErr.Store(nil)
				if err := m.save(c); err != nil {
					m.p.log.Warn("IP certificate obtained but not cached", "file", m.file, "err", err)
				}
				m.install(c)
				m.p.log.Info("ACME certificate for the IP address obtained", "ip", m.ip, "not_after", c.Leaf.NotAfter.UTC().Format(time.RFC3339), "renew_at", m.renewAt(c).UTC().Format(time.RFC3339))
			}
		}
		if cur := m.cur.Load(); cur != nil && delay == 0 {
			wait = min(wait, max(time.Second, m.renewAt(cur).Sub(m.p.now())))
		}
		t := time.NewTimer(wait)
		select {
		case <-m.stop:
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (m *ipACME) install(c *tls.Certificate) {
	m.cur.Store(c)
	if m.p.m != nil {
		m.p.m.noteExpiryLeaf(m.p.cfg.Hostname, c.Leaf)
	}
	m.firstOnce.Do(func() { close(m.first) })
}

// obtain runs one ACME order for the IP address.
func (m *ipACME) obtain(ctx context.Context) (*tls.Certificate, error) {
	if m.p.closed.Load() {
		return nil, errClosed
	}
	if !m.registered {
		acct := &acme.Account{ExternalAccountBinding: m.eab}
		if e := m.p.cfg.ACMEEmail; e != "" {
			acct.Contact = []string{"mailto:" + e}
		}
		if _, err := m.client.Register(ctx, acct, acme.AcceptTOS); err != nil && !errors.Is(err, acme.ErrAccountAlreadyExists) {
			return nil, fmt.Errorf("register account: %w", err)
		}
		m.registered = true
	}
	dir, err := m.client.Discover(ctx)
	if err != nil {
		return nil, fmt.Errorf("directory: %w", err)
	}
	var opts []acme.OrderOption
	if _, ok := dir.Profiles[ipProfile]; ok {
		opts = append(opts, acme.WithOrderIssuanceProfile(ipProfile))
	}
	order, err := m.client.AuthorizeOrder(ctx, acme.IPIDs(m.ip.String()), opts...)
	if err != nil {
		return nil, fmt.Errorf("order: %w", err)
	}
	for _, u := range order.AuthzURLs {
		if err := m.authorize(ctx, u); err != nil {
			return nil, err
		}
	}
	if _, err := m.client.WaitOrder(ctx, order.URI); err != nil {
		return nil, fmt.Errorf("order: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{IPAddresses: []net.IP{m.ip.AsSlice()}}, key)
	if err != nil {
		return nil, err
	}
	der, _, err := m.client.CreateCertFromOrder(ctx, order, csr, true)
	if err != nil {
		return nil, fmt.Errorf("finalize: %w", err)
	}
	return m.check(der, key)
}

// authorize completes one authorization by HTTP-01, or by TLS-ALPN-01 when
// there is no port-80 listener.
func (m *ipACME) authorize(ctx context.Context, u string) error {
	z, err := m.client.GetAuthorization(ctx, u)
	if err != nil {
		return fmt.Errorf("authorization: %w", err)
	}
	if z.Status == acme.StatusValid {
		return nil
	}
	want := "tls-alpn-01"
	if m.http01.Load() && !m.altALPN {
		want = "http-01"
	}
	var chal *acme.Challenge
	for _, c := range z.Challenges {
		if c.Type == want {
			chal = c
		}
	}
	if chal == nil {
		return fmt.Errorf("the CA offers no %s challenge for %v", want, m.ip)
	}
	m.chMu.Lock()
	switch want {
	case "http-01":
		resp, err := m.client.HTTP01ChallengeResponse(chal.Token)
		if err != nil {
			m.chMu.Unlock()
			return err
		}
		m.tokens[chal.Token] = resp
		defer m.forget(func() { delete(m.tokens, chal.Token) })
	default:
		cert, err := m.client.TLSALPN01ChallengeCert(chal.Token, m.ip.String())
		if err != nil {
			m.chMu.Unlock()
			return err
		}
		name := reverseName(m.ip)
		m.alpn[name] = &cert
		defer m.forget(func() { delete(m.alpn, name) })
	}
	m.chMu.Unlock()
	if _, err := m.client.Accept(ctx, chal); err != nil {
		return fmt.Errorf("accept %s: %w", want, err)
	}
	if _, err := m.client.WaitAuthorization(ctx, z.URI); err != nil {
		return fmt.Errorf("%s validation: %w", want, err)
	}
	return nil
}

func (m *ipACME) forget(f func()) {
	m.chMu.Lock()
	defer m.chMu.Unlock()
	f()
}

// check assembles and verifies an issued chain: the leaf names exactly our
// IP and belongs to key.
func (m *ipACME) check(der [][]byte, key crypto.Signer) (*tls.Certificate, error) {
	if len(der) == 0 {
		return nil, errors.New("empty certificate chain")
	}
	leaf, err := x509.ParseCertificate(der[0])
	if err != nil {
		return nil, err
	}
	if len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(m.ip.AsSlice()) {
		return nil, fmt.Errorf("certificate names %v, want %v", leaf.IPAddresses, m.ip)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return nil, errors.New("certificate does not match its key")
	}
	if !m.p.now().Before(leaf.NotAfter) {
		return nil, fmt.Errorf("certificate expired at %v", leaf.NotAfter)
	}
	return &tls.Certificate{Certificate: der, PrivateKey: key, Leaf: leaf}, nil
}

// save writes the key and chain to the cache file, 0600, atomically.
func (m *ipACME) save(c *tls.Certificate) error {
	kp, err := keyPEM(c.PrivateKey)
	if err != nil {
		return err
	}
	b := bytes.NewBuffer(kp)
	for _, d := range c.Certificate {
		pem.Encode(b, &pem.Block{Type: "CERTIFICATE", Bytes: d})
	}
	return writeFileAtomic(m.file, b.Bytes(), 0o600)
}

func (m *ipACME) loadCached() (*tls.Certificate, error) {
	b, err := os.ReadFile(m.file)
	if err != nil {
		return nil, err
	}
	c, err := tls.X509KeyPair(b, b) // the file holds the key and the chain
	if err != nil {
		return nil, err
	}
	key, ok := c.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("unusable private key")
	}
	return m.check(c.Certificate, key)
}

// getCertificate serves the IP certificate, or a TLS-ALPN-01 challenge
// certificate to the CA's validator.
func (m *ipACME) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	m.start()
	if isChallengeHello(hello) {
		m.chMu.Lock()
		c := m.alpn[strings.TrimSuffix(hello.ServerName, ".")]
		m.chMu.Unlock()
		if c == nil {
			return nil, fmt.Errorf("%w: no TLS-ALPN-01 challenge for %q", ErrNoCertificate, hello.ServerName)
		}
		return c, nil
	}
	c := m.cur.Load()
	if c == nil {
		if err := m.lastErr.Load(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNoCertificate, *err)
		}
		return nil, fmt.Errorf("%w: the IP certificate is not obtained yet", ErrNoCertificate)
	}
	return m.p.withMeta(c), nil
}

// httpHandler answers HTTP-01 challenges, everything else to fallback.
func (m *ipACME) httpHandler(fallback http.Handler) http.Handler {
	m.http01.Store(true)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, ok := strings.CutPrefix(r.URL.Path, "/.well-known/acme-challenge/")
		if !ok {
			fallback.ServeHTTP(w, r)
			return
		}
		m.chMu.Lock()
		resp, ok := m.tokens[token]
		m.chMu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte(resp))
	})
}

// prefetch starts the loop and waits for the first certificate.
func (m *ipACME) prefetch(ctx context.Context) error {
	m.start()
	select {
	case <-m.first:
		return nil
	case <-m.done:
		return errClosed
	case <-ctx.Done():
		if err := m.lastErr.Load(); err != nil {
			return *err
		}
		return ctx.Err()
	}
}

// reverseName is the TLS-ALPN-01 server name of an IP identifier (RFC
// 8738): the reverse-DNS name, without the final dot.
func reverseName(ip netip.Addr) string {
	b := ip.AsSlice()
	var parts []string
	if ip.Is4() {
		for i := len(b) - 1; i >= 0; i-- {
			parts = append(parts, fmt.Sprint(b[i]))
		}
		return strings.Join(parts, ".") + ".in-addr.arpa"
	}
	const hexDigits = "0123456789abcdef"
	for i := len(b) - 1; i >= 0; i-- {
		parts = append(parts, string(hexDigits[b[i]&0xf]), string(hexDigits[b[i]>>4]))
	}
	return strings.Join(parts, ".") + ".ip6.arpa"
}

// loadOrCreateKey reads a PEM ECDSA key, or creates one (0600).
func loadOrCreateKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		blk, _ := pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("%s: not PEM", path)
		}
		k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%s: unusable key", path)
		}
		return s, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	kp, err := keyPEM(k)
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(path, kp, 0o600); err != nil {
		return nil, err
	}
	return k, nil
}

// keyPEM encodes a private key as a PKCS #8 "PRIVATE KEY" PEM block.
func keyPEM(key any) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}
