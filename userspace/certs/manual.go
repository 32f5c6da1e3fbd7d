package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// SelfSignedValidity is the lifetime of a generated self-signed certificate.
// Longer is refused by some clients (Apple platforms).
const SelfSignedValidity = 365 * 24 * time.Hour

func (p *Provider) initManual() error {
	p.crtPath, p.keyPath = filePaths(p.cfg.Dir, p.sanitizedName())
	lc, err := p.loadPair()
	if err != nil {
		_, crtErr := os.Stat(p.crtPath)
		_, keyErr := os.Stat(p.keyPath)
		bothMissing := errors.Is(crtErr, os.ErrNotExist) && errors.Is(keyErr, os.ErrNotExist)
		if !p.hostIsIP || !bothMissing {
			return err
		}
		if err := writeSelfSigned(p.crtPath, p.keyPath, p.cfg.Hostname, p.now()); err != nil {
			return err
		}
		if lc, err = p.loadPair(); err != nil {
			return err
		}
		p.log.Info("generated self-signed certificate for IP host name",
			"hostname", p.cfg.Hostname, "crt", p.crtPath, "key", p.keyPath)
	}
	p.cur.Store(lc)
	if fi, err := os.Stat(p.keyPath); err == nil && fi.Mode().Perm()&0o077 != 0 {
		p.log.Warn("private key file is readable by group or others; chmod 600 it",
			"key", p.keyPath, "mode", fmt.Sprintf("%#o", fi.Mode().Perm()))
	}
	if isSelfSigned(lc.cert.Leaf) {
		p.log.Info("serving a self-signed certificate: pin it in the DERP map",
			"hostname", p.cfg.Hostname, "CertName", CertNameFor(lc.cert.Leaf.Raw),
			"not_after", lc.cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// loadPair reads and validates the manual certificate files.
func (p *Provider) loadPair() (*loadedCert, error) {
	crtPEM, err := os.ReadFile(p.crtPath)
	if err != nil {
		return nil, fmt.Errorf("certs: certificate file: %w", err)
	}
	keyPEM, err := os.ReadFile(p.keyPath)
	if err != nil {
		return nil, fmt.Errorf("certs: key file: %w", err)
	}
	return p.parsePair(crtPEM, keyPEM)
}

func (p *Provider) parsePair(crtPEM, keyPEM []byte) (*loadedCert, error) {
	cert, err := tls.X509KeyPair(crtPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("certs: %s / %s: %w", p.crtPath, p.keyPath, err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("certs: %s: %w", p.crtPath, err)
		}
		cert.Leaf = leaf
	}
	now := p.now()
	if now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("certs: %s: certificate expired at %s", p.crtPath, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(leaf.NotBefore) {
		return nil, fmt.Errorf("certs: %s: certificate not valid before %s", p.crtPath, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if err := leaf.VerifyHostname(p.cfg.Hostname); err != nil {
		return nil, fmt.Errorf("certs: %s: not valid for hostname %q: %w", p.crtPath, p.cfg.Hostname, err)
	}
	h := sha256.New()
	h.Write(crtPEM)
	h.Write(keyPEM)
	lc := &loadedCert{cert: cert}
	h.Sum(lc.hash[:0])
	return lc, nil
}

// Reload re-reads the manual certificate files and swaps them in if they
// form a valid pair; otherwise it returns the error and the current
// certificate stays in use. Established connections are never touched. In
// letsencrypt mode it does nothing.
func (p *Provider) Reload() error {
	if p.acm != nil {
		return nil
	}
	p.reloadMu.Lock()
	defer p.reloadMu.Unlock()
	lc, err := p.loadPair()
	if err != nil {
		p.m.reloads.With("error").Inc()
		return err
	}
	p.swap(lc)
	return nil
}

// swap installs lc if it differs from the current pair. reloadMu held.
func (p *Provider) swap(lc *loadedCert) {
	old := p.cur.Load()
	if old != nil && old.hash == lc.hash {
		return
	}
	p.cur.Store(lc)
	p.m.reloads.With("ok").Inc()
	p.m.noteExpiry(p.cfg.Hostname, lc.cert.Leaf.NotAfter)
	p.log.Info("loaded new certificate", "crt", p.crtPath,
		"not_after", lc.cert.Leaf.NotAfter.UTC().Format(time.RFC3339),
		"sha256", CertNameFor(lc.cert.Leaf.Raw))
}

// fileStamp identifies a version of the two files cheaply.
type fileStamp struct {
	crtSize, keySize   int64
	crtMtime, keyMtime time.Time
	crtIno, keyIno     uint64
	err                string
}

func stampOf(crt, key string) fileStamp {
	var s fileStamp
	ci, err1 := os.Stat(crt)
	ki, err2 := os.Stat(key)
	if err := errors.Join(err1, err2); err != nil {
		s.err = err.Error()
		return s
	}
	s.crtSize, s.crtMtime, s.crtIno = ci.Size(), ci.ModTime(), inode(ci)
	s.keySize, s.keyMtime, s.keyIno = ki.Size(), ki.ModTime(), inode(ki)
	return s
}

func (p *Provider) startWatch() {
	p.watchStop = make(chan struct{})
	p.watchDone = make(chan struct{})
	go p.watch()
}

// watch polls the files. A change is applied only after the files have
// looked the same for one whole interval, so an operator copying the
// certificate and then the key is not reported as a broken pair in between.
// A broken pair is logged once per distinct content.
func (p *Provider) watch() {
	defer close(p.watchDone)
	t := time.NewTicker(p.cfg.PollInterval)
	defer t.Stop()
	last := stampOf(p.crtPath, p.keyPath)
	applied := last
	var lastBadHash [32]byte
	for {
		select {
		case <-p.watchStop:
			return
		case <-t.C:
		}
		s := stampOf(p.crtPath, p.keyPath)
		if s != last {
			last = s // changed: wait for it to settle
			continue
		}
		if s == applied {
			continue
		}
		applied = s
		crtPEM, err1 := os.ReadFile(p.crtPath)
		keyPEM, err2 := os.ReadFile(p.keyPath)
		if err := errors.Join(err1, err2); err != nil {
			p.m.reloads.With("error").Inc()
			p.log.Error("certificate files unreadable; keeping the current certificate", "err", err)
			continue
		}
		h := sha256.New()
		h.Write(crtPEM)
		h.Write(keyPEM)
		var hash [32]byte
		h.Sum(hash[:0])
		if cur := p.cur.Load(); cur != nil && cur.hash == hash {
			continue // touched, not changed
		}
		p.reloadMu.Lock()
		lc, err := p.parsePair(crtPEM, keyPEM)
		if err == nil {
			p.swap(lc)
		}
		p.reloadMu.Unlock()
		if err != nil && hash != lastBadHash {
			lastBadHash = hash
			p.m.reloads.With("error").Inc()
			p.log.Error("new certificate refused; keeping the current certificate", "err", err)
		}
	}
}

// writeSelfSigned creates an ECDSA P-256 certificate for the IP address host
// (the key type derper uses and every Tailscale client accepts) and writes it
// atomically: key 0600, certificate 0644.
func writeSelfSigned(crtPath, keyPath, host string, now time.Time) error {
	ip := net.ParseIP(host)
	if ip == nil {
		return fmt.Errorf("certs: hostname %q: not an IP address", host)
	}
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("certs: self-signed key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return fmt.Errorf("certs: self-signed serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: host},
		NotBefore:             now.Add(-time.Hour), // tolerate clients whose clock is a little behind
		NotAfter:              now.Add(SelfSignedValidity - time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IPAddresses:           []net.IP{ip},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return fmt.Errorf("certs: self-signed certificate: %w", err)
	}
	kp, err := keyPEM(priv)
	if err != nil {
		return fmt.Errorf("certs: self-signed key: %w", err)
	}
	crtPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := writeFileAtomic(keyPath, kp, 0o600); err != nil {
		return err
	}
	return writeFileAtomic(crtPath, crtPEM, 0o644)
}

// writeFileAtomic writes data to a temporary file in the same directory,
// syncs it and renames it over path.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("certs: write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("certs: write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("certs: write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("certs: write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("certs: write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("certs: write %s: %w", path, err)
	}
	return nil
}
