package certs

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"syscall"
	"time"
)

// WrapListener returns a listener whose Accept yields *tls.Conn values that
// have already completed their handshake. Handshakes run in their own
// goroutines (at most MaxPendingHandshakes at a time, each bounded by
// HandshakeTimeout), so a slow or silent client never blocks Accept. Every
// outcome is counted (CountHandshake); TLS-ALPN-01 validation connections
// are answered and closed here and never reach the caller.
//
// Use it with http.Server.Serve (not ServeTLS): net/http sees a *tls.Conn
// whose handshake is done and fills Request.TLS as usual.
func (p *Provider) WrapListener(l net.Listener) net.Listener {
	wl := &tlsListener{
		Listener: l,
		p:        p,
		cfg:      p.TLSConfig(),
		ready:    make(chan *tls.Conn),
		done:     make(chan struct{}),
		sem:      make(chan struct{}, p.cfg.MaxPendingHandshakes),
	}
	go wl.acceptLoop()
	return wl
}

type tlsListener struct {
	net.Listener
	p     *Provider
	cfg   *tls.Config
	ready chan *tls.Conn
	done  chan struct{}
	sem   chan struct{}

	errMu     sync.Mutex
	err       error
	closeOnce sync.Once
}

func (l *tlsListener) acceptLoop() {
	var delay time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) ||
				errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ECONNABORTED) {
				// Transient: back off like net/http does.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(delay):
					continue
				case <-l.done:
					return
				}
			}
			l.errMu.Lock()
			l.err = err
			l.errMu.Unlock()
			l.Close()
			return
		}
		delay = 0
		select {
		case l.sem <- struct{}{}:
			go l.handshake(c)
		default:
			c.Close()
			l.p.CountHandshake(tls.ConnectionState{}, errOverload, c.RemoteAddr())
		}
	}
}

var errOverload = overloadError{}

type overloadError struct{}

func (overloadError) Error() string { return "too many handshakes in flight" }

func (l *tlsListener) handshake(c net.Conn) {
	tc := tls.Server(c, l.cfg)
	ctx, cancel := context.WithTimeout(context.Background(), l.p.cfg.HandshakeTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	<-l.sem
	if err != nil {
		l.p.CountHandshake(tls.ConnectionState{}, err, c.RemoteAddr())
		c.Close()
		return
	}
	cs := tc.ConnectionState()
	if cs.NegotiatedProtocol == "acme-tls/1" {
		l.p.m.challenges.Inc()
		tc.Close()
		return
	}
	l.p.CountHandshake(cs, nil, nil)
	select {
	case l.ready <- tc:
	case <-l.done:
		tc.Close()
	}
}

func (l *tlsListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ready:
		return c, nil
	case <-l.done:
		l.errMu.Lock()
		err := l.err
		l.errMu.Unlock()
		if err == nil {
			err = net.ErrClosed
		}
		return nil, err
	}
}

func (l *tlsListener) Close() error {
	var err error
	l.closeOnce.Do(func() {
		close(l.done)
		err = l.Listener.Close()
	})
	return err
}
