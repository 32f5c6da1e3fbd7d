package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/xderp/xderp/userspace/internal/lograte"
	"github.com/xderp/xderp/userspace/metrics"
)

// Handshake error reasons (label values of xderp_tls_handshake_errors_total).
const (
	ReasonTimeout     = "timeout"     // no complete handshake within HandshakeTimeout
	ReasonEOF         = "eof"         // peer closed or reset before finishing
	ReasonNotTLS      = "not_tls"     // first bytes were not a TLS record (HTTP, SSH, noise)
	ReasonVersion     = "version"     // peer offered only versions below TLS 1.2 (or SSLv2)
	ReasonCipher      = "cipher"      // no shared cipher suite, curve or signature scheme
	ReasonCertificate = "certificate" // no certificate for the requested name (SNI, ACME failure)
	ReasonPeerAlert   = "peer_alert"  // the peer aborted with an alert (often: it rejected our cert)
	ReasonOverload    = "overload"    // too many handshakes in flight; closed unread
	ReasonOther       = "other"       // anything else
)

// Reasons lists every reason label, in a stable order.
var Reasons = []string{ReasonTimeout, ReasonEOF, ReasonNotTLS, ReasonVersion, ReasonCipher,
	ReasonCertificate, ReasonPeerAlert, ReasonOverload, ReasonOther}

type tlsMetrics struct {
	handshakes *metrics.CounterVec // version
	errors     *metrics.CounterVec // reason
	challenges *metrics.Counter
	reloads    *metrics.CounterVec // result

	expMu    sync.Mutex
	expiry   map[string]time.Time
	lastLeaf atomic.Pointer[x509.Certificate]

	logLimiter *lograte.Limiter
}

func newTLSMetrics(r *metrics.Registry, p *Provider) *tlsMetrics {
	m := &tlsMetrics{
		handshakes: r.CounterVec("xderp_tls_handshakes_total", "Completed TLS handshakes by negotiated version.", "version"),
		errors:     r.CounterVec("xderp_tls_handshake_errors_total", "Failed TLS handshakes by reason.", "reason"),
		challenges: r.Counter("xderp_tls_acme_challenge_handshakes_total", "TLS-ALPN-01 validation handshakes answered (acme-tls/1)."),
		reloads:    r.CounterVec("xderp_tls_cert_reloads_total", "Manual certificate reload attempts by result (ok: a new pair was installed, error: refused, old pair kept).", "result"),
		expiry:     make(map[string]time.Time),
		logLimiter: lograte.New(5, time.Second),
	}
	for _, v := range []string{"1.2", "1.3"} {
		m.handshakes.With(v)
	}
	for _, reason := range Reasons {
		m.errors.With(reason)
	}
	m.reloads.With("ok")
	m.reloads.With("error")
	r.Register("xderp_tls_cert_expiry_seconds", "Seconds until the served certificate's NotAfter, per name (negative once expired).",
		metrics.KindGauge, []string{"name"}, func() []metrics.Sample {
			now := p.now()
			m.expMu.Lock()
			defer m.expMu.Unlock()
			out := make([]metrics.Sample, 0, len(m.expiry))
			for name, na := range m.expiry {
				out = append(out, metrics.Sample{Labels: []string{name}, Value: float64(na.Sub(now) / time.Second)})
			}
			return out
		})
	if lc := p.cur.Load(); lc != nil {
		m.noteExpiry(p.cfg.Hostname, lc.cert.Leaf.NotAfter)
	}
	return m
}

func (m *tlsMetrics) noteExpiry(name string, notAfter time.Time) {
	m.expMu.Lock()
	m.expiry[name] = notAfter
	m.expMu.Unlock()
}

// noteExpiryLeaf is the per-handshake path: a pointer compare unless the
// certificate changed.
func (m *tlsMetrics) noteExpiryLeaf(name string, leaf *x509.Certificate) {
	if m.lastLeaf.Swap(leaf) != leaf {
		m.noteExpiry(name, leaf.NotAfter)
	}
}

// VersionLabel maps a negotiated TLS version to its label value ("1.2",
// "1.3", ...), the same values derper uses for derper_tls_request_version,
// which the daemon can count per HTTP request with this function.
func VersionLabel(v uint16) string {
	switch v {
	case tls.VersionTLS12:
		return "1.2"
	case tls.VersionTLS13:
		return "1.3"
	case tls.VersionTLS11:
		return "1.1"
	case tls.VersionTLS10:
		return "1.0"
	}
	return "unknown"
}

// ClassifyHandshakeError maps a server-side handshake error to one of the
// Reason* labels. It only looks at error types and crypto/tls's stable
// message texts; unknown errors are ReasonOther.
func ClassifyHandshakeError(err error) string {
	if err == nil {
		return ""
	}
	var rhe tls.RecordHeaderError
	var ne net.Error
	msg := err.Error()
	switch {
	case errors.Is(err, errOverload):
		return ReasonOverload
	case errors.Is(err, ErrNoCertificate):
		return ReasonCertificate
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return ReasonTimeout
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, net.ErrClosed), errors.Is(err, syscall.EPIPE):
		return ReasonEOF
	case errors.As(err, &rhe):
		return ReasonNotTLS
	case strings.Contains(msg, "unsupported versions"), strings.Contains(msg, "SSLv2"),
		strings.Contains(msg, "protocol version"):
		return ReasonVersion
	case strings.Contains(msg, "no cipher suite"), strings.Contains(msg, "no ECDHE curve"),
		strings.Contains(msg, "no mutually supported"), strings.Contains(msg, "signature"),
		strings.Contains(msg, "application protocol"):
		return ReasonCipher
	case strings.Contains(msg, "remote error"):
		return ReasonPeerAlert
	}
	return ReasonOther
}

// CountHandshake records the outcome of one server handshake: a version on
// success, a reason (and a rate-limited log line) on failure. Daemons that
// run their own handshakes call it; WrapListener does it itself.
func (p *Provider) CountHandshake(cs tls.ConnectionState, err error, remote net.Addr) {
	if err == nil {
		p.m.handshakes.With(VersionLabel(cs.Version)).Inc()
		return
	}
	reason := ClassifyHandshakeError(err)
	p.m.errors.With(reason).Inc()
	if ok, suppressed := p.m.logLimiter.Allow(p.now()); ok {
		attrs := []any{"reason", reason, "err", err}
		if remote != nil {
			attrs = append(attrs, "remote", remote.String())
		}
		p.log.Info("tls handshake failed", lograte.Attrs(suppressed, attrs...)...)
	}
}
