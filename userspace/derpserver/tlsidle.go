package derpserver

import (
	"crypto/tls"
	"net"
	"syscall"
)

// Idle TLS connections. Most DERP connections are idle most of the time,
// and a reader that waits for the next record inside tls.Conn.Read does so
// a dozen frames deep, which keeps its goroutine stack at 4 KiB (amd64)
// where a plain connection's reader needs 2 KiB. So the TCP connections
// under the TLS server are wrapped (TLSListener): between frames the reader
// first asks crypto/tls, without touching the socket, whether it already
// holds a record (connReader.tlsProbe), and otherwise waits for the socket
// to become readable outside crypto/tls, in a fresh goroutine with a small
// stack (sclient.idleRead).

// TLSListener wraps l, whose connections are about to be handed to a TLS
// server (tls.NewListener or an equivalent), so that the relay can wait on
// idle TLS connections cheaply. Connections that are not TCP sockets pass
// through unchanged.
func TLSListener(l net.Listener) net.Listener { return probeListener{l} }

type probeListener struct{ net.Listener }

func (l probeListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if rc := rawConnOf(c); rc != nil {
		return &probeConn{Conn: c, rc: rc}, nil
	}
	return c, nil
}

// probeConn is the TCP connection under a *tls.Conn. While probing is set
// (only by the connection's reader, around its own tls.Conn.Read call),
// Read fails at once with errNoRecord instead of reading the socket.
// crypto/tls passes a temporary net.Error through without recording it, so
// the connection stays usable.
type probeConn struct {
	net.Conn
	rc      syscall.RawConn
	probing bool
}

func (c *probeConn) Read(p []byte) (int, error) {
	if c.probing {
		return 0, errNoRecord
	}
	return c.Conn.Read(p)
}

var errNoRecord error = noRecordError{}

type noRecordError struct{}

func (noRecordError) Error() string   { return "no complete TLS record buffered" }
func (noRecordError) Timeout() bool   { return true }
func (noRecordError) Temporary() bool { return true }

// tlsProbeOf returns the probeConn under c, or nil if c is not a TLS
// connection from a TLSListener.
func tlsProbeOf(c net.Conn) *probeConn {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return nil
	}
	pc, _ := tc.NetConn().(*probeConn)
	return pc
}
