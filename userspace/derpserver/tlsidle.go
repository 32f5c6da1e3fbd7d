package derpserver

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
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

// probeConn is the TCP connection under a *tls.Conn.
//
// Reading: everything read from the socket goes through a pooled chunk
// (pre), and Read hands crypto/tls at most the rest of the TLS record the
// next byte belongs to, never bytes of the record after it. So crypto/tls
// never holds more than one record, and whatever else has arrived is in
// pre, where the relay can see it (more). While probing is set (only by
// the connection's reader, around its own tls.Conn.Read call), Read fails
// at once with errNoRecord instead of reading the socket; crypto/tls
// passes a temporary net.Error through without recording it, so the
// connection stays usable. Only one goroutine reads at a time: the TLS
// handshake and net/http before the connection is hijacked, then the
// connection's reader, which alone calls fill.
//
// Writing: between beginNonblock and endNonblock, Write never waits for
// socket space: what the socket does not take at once is kept (wpend) and
// written before anything else, by drain or by the next Write. The relay
// uses that to write a packet from the sender's goroutine through
// crypto/tls (sclient.writeInline) as it does on plain sockets.
type probeConn struct {
	net.Conn
	rc      syscall.RawConn
	probing bool

	chunk *[]byte // read buffer; nil when nothing is read ahead
	r, w  int     // pre is (*chunk)[r:w]
	left  int     // bytes of the current record not yet passed on; 0 at a record boundary
	err   error   // what a read in fill reported, for Read to return

	wmu      sync.Mutex
	nonblock bool   // guarded by wmu
	wpend    []byte // guarded by wmu: record bytes accepted but not yet written
}

// tlsRecordHeaderLen is the length of a TLS record header (type, version,
// length).
const tlsRecordHeaderLen = 5

func (c *probeConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if n := c.take(p); n > 0 {
			return n, nil
		}
		if err := c.err; err != nil {
			c.err = nil
			return 0, err
		}
		if c.probing {
			return 0, errNoRecord
		}
		if err := c.readMore(); err != nil {
			return 0, err
		}
	}
}

// take moves bytes of the current record from pre to p. At a record
// boundary it waits (returns 0) until the whole next header is in pre.
func (c *probeConn) take(p []byte) int {
	pre := c.pre()
	if c.left == 0 {
		if len(pre) < tlsRecordHeaderLen {
			return 0
		}
		c.left = tlsRecordHeaderLen + (int(pre[3])<<8 | int(pre[4]))
	}
	n := copy(p[:min(len(p), c.left)], pre)
	c.r += n
	c.left -= n
	if c.r == c.w {
		c.dropChunk()
	}
	return n
}

// pre returns what has been read ahead and not yet passed on.
func (c *probeConn) pre() []byte {
	if c.chunk == nil {
		return nil
	}
	return (*c.chunk)[c.r:c.w]
}

// more reports whether bytes beyond what crypto/tls holds have been read.
func (c *probeConn) more() bool { return c.r < c.w }

// room returns the chunk's free space after pre, taking a chunk or moving
// pre to the front as needed.
func (c *probeConn) room() []byte {
	if c.chunk == nil {
		c.chunk = readChunkPool.Get().(*[]byte)
		c.r, c.w = 0, 0
	} else if c.w == len(*c.chunk) {
		c.w = copy(*c.chunk, (*c.chunk)[c.r:c.w])
		c.r = 0
	}
	return (*c.chunk)[c.w:]
}

// readMore reads from the socket into the chunk, waiting for data.
func (c *probeConn) readMore() error {
	n, err := c.Conn.Read(c.room())
	c.w += n
	if c.r == c.w {
		c.dropChunk()
	}
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// dropChunk gives the read buffer back to the pool; only valid when
// nothing is read ahead.
func (c *probeConn) dropChunk() {
	if c.chunk != nil {
		readChunkPool.Put(c.chunk)
	}
	c.chunk, c.r, c.w = nil, 0, 0
}

func (c *probeConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.nonblock {
		n := 0
		if len(c.wpend) == 0 {
			var err error
			n, err = rawWriteNow(c.rc, p)
			if err != nil && err != syscall.EAGAIN {
				return n, err
			}
		}
		c.wpend = append(c.wpend, p[n:]...)
		return len(p), nil
	}
	if err := c.drainLocked(); err != nil {
		return 0, err
	}
	return c.Conn.Write(p)
}

// beginNonblock makes Writes take what the socket does not at once. It
// fails, changing nothing, if a Write is waiting for socket space.
func (c *probeConn) beginNonblock() bool {
	if !c.wmu.TryLock() {
		return false
	}
	c.nonblock = true
	c.wmu.Unlock()
	return true
}

// endNonblock ends what beginNonblock began and reports whether bytes
// are left for drain.
func (c *probeConn) endNonblock() (pending bool) {
	c.wmu.Lock()
	c.nonblock = false
	pending = len(c.wpend) > 0
	c.wmu.Unlock()
	return pending
}

// drain writes what Writes left, waiting for socket space (under the
// connection's write deadline).
func (c *probeConn) drain() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.drainLocked()
}

func (c *probeConn) drainLocked() error {
	for len(c.wpend) > 0 {
		n, err := c.Conn.Write(c.wpend)
		c.wpend = c.wpend[n:]
		if err != nil {
			return err
		}
	}
	c.wpend = nil
	return nil
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
