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
// stack (sclient.idleRead). The wait ends with a read of whatever arrived
// (probeConn.fill), which crypto/tls then takes from memory: waking costs
// one system call, not a readiness check plus crypto/tls's own read.

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

// probeConn is the TCP connection under a *tls.Conn. Read first serves
// what fill read ahead. While probing is set (only by the connection's
// reader, around its own tls.Conn.Read call), Read then fails at once with
// errNoRecord instead of reading the socket. crypto/tls passes a temporary
// net.Error through without recording it, so the connection stays usable.
// Only the connection's reader calls fill, and Read (through tls.Conn.Read).
type probeConn struct {
	net.Conn
	rc      syscall.RawConn
	probing bool

	chunk *[]byte // pooled buffer behind pre; nil when nothing is read ahead
	pre   []byte  // read by fill, not yet taken by crypto/tls
	err   error   // what the read in fill reported (then pre is empty)
}

func (c *probeConn) Read(p []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(p, c.pre)
		c.pre = c.pre[n:]
		if len(c.pre) == 0 {
			c.dropChunk()
		}
		return n, nil
	}
	if err := c.err; err != nil {
		c.err = nil
		return 0, err
	}
	if c.probing {
		return 0, errNoRecord
	}
	return c.Conn.Read(p)
}

// dropChunk gives the read-ahead buffer back to the pool.
func (c *probeConn) dropChunk() {
	if c.chunk != nil {
		readChunkPool.Put(c.chunk)
	}
	c.chunk, c.pre = nil, nil
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
