package derpserver

import (
	"errors"
	"io"
	"math"
	"net"
	"syscall"

	"github.com/xderp/xderp/userspace/derp"
)

// connReader parses the DERP stream of one connection. It reads into pooled
// chunks; on sockets that expose a raw file descriptor it waits for
// readability without holding a chunk, so idle connections cost no read
// buffer. It is owned by the connection's reader goroutine.
type connReader struct {
	conn  net.Conn
	rc    syscall.RawConn // nil: plain net.Conn reads (TLS, pipes, wrappers)
	bufp  *[]byte
	buf   []byte // nil when no chunk is held
	r, w  int
	reads uint64

	// Raw mode only: hot counts reads since the reader last parked in
	// the netpoller; onPark runs just before it parks.
	hot    int
	onPark func()

	// Plain mode only: the first read after idling lands here. Small on
	// purpose: it is all an idle connection holds, and the rest of the
	// record is read from the connection's own buffer right after.
	small [16]byte

	// TLS over a TLSListener connection only (see tlsidle.go).
	tls    *probeConn
	woke   bool  // idleRead found the socket readable: read without probing
	idleNs int64 // how long the last idle wait lasted (MaxInt64 before the first)
}

// directReadMin is the payload size above which a payload missing from the
// chunk is read straight into its destination buffer.
const directReadMin = 8 << 10

func newConnReader(c net.Conn, initial []byte) *connReader {
	cr := &connReader{conn: c, rc: rawConnOf(c), tls: tlsProbeOf(c), idleNs: math.MaxInt64}
	if len(initial) > 0 {
		cr.acquire()
		if len(initial) > len(cr.buf) {
			// Cannot happen with net/http's 4 KiB reader, but never lose bytes.
			cr.buf = make([]byte, len(initial))
		}
		cr.w = copy(cr.buf, initial)
	}
	return cr
}

func (cr *connReader) acquire() {
	cr.bufp = readChunkPool.Get().(*[]byte)
	cr.buf = *cr.bufp
	cr.r, cr.w = 0, 0
}

// release gives the chunk back; only valid when nothing is buffered.
func (cr *connReader) release() {
	if cr.bufp != nil && len(*cr.bufp) == readChunkSize {
		readChunkPool.Put(cr.bufp)
	}
	cr.bufp, cr.buf = nil, nil
	cr.r, cr.w = 0, 0
}

func (cr *connReader) buffered() int { return cr.w - cr.r }

// moreBuffered reports whether another frame has (at least in part)
// arrived: its header is in the chunk, or, over TLS, bytes of a further
// record have been read (crypto/tls holds one record at most, and readMore
// takes the rest of its plaintext into the chunk whole when it fits).
func (cr *connReader) moreBuffered() bool {
	return cr.buffered() >= derp.FrameHeaderLen || cr.tls != nil && cr.tls.more()
}

// readMore reads at least one more byte into the chunk.
func (cr *connReader) readMore() error {
	if cr.r == cr.w {
		cr.release() // wait for data without holding a chunk
		if cr.rc == nil {
			return cr.plainFillIdle()
		}
	} else if cr.w == len(cr.buf) {
		// Move the partial frame to the front.
		cr.w = copy(cr.buf, cr.buf[cr.r:cr.w])
		cr.r = 0
	}
	cr.reads++
	if cr.rc != nil {
		return cr.rawFill()
	}
	if cr.buf == nil {
		cr.acquire()
	}
	n, err := cr.conn.Read(cr.buf[cr.w:])
	cr.w += n
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// plainFillIdle is readMore for plain connections (TLS, WebSocket) with
// nothing buffered: the blocking read goes into a small array inside the
// reader, and a chunk is taken only once data has arrived, so an idle
// connection holds no chunk. (A TLS connection keeps the rest of the
// record it decrypted and serves the next read from it, so the small first
// read costs no extra system call.)
func (cr *connReader) plainFillIdle() error {
	n, err := cr.conn.Read(cr.small[:])
	if n > 0 {
		cr.acquire()
		cr.w = copy(cr.buf, cr.small[:n])
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// park runs just before the reader waits in the netpoller.
func (cr *connReader) park() {
	cr.hot = 0
	if cr.onPark != nil {
		cr.onPark()
	}
}

// tlsProbe is called between frames, with nothing buffered, on a connection
// from a TLSListener. It takes what crypto/tls already holds (decrypted, or
// as complete records) without touching the socket, and reports idle when
// there is nothing; the caller then waits with waitIdle.
func (cr *connReader) tlsProbe() (idle bool, err error) {
	cr.release()
	cr.tls.probing = true
	n, err := cr.conn.Read(cr.small[:])
	cr.tls.probing = false
	if n > 0 {
		cr.acquire()
		cr.w = copy(cr.buf, cr.small[:n])
		cr.hot++
		return false, nil
	}
	if errors.Is(err, errNoRecord) {
		return true, nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return false, err
}

// waitIdle parks until the TLS connection's socket is readable (or has an
// error or EOF to report), outside crypto/tls, reads what arrived for
// crypto/tls to take, and notes how long the wait took.
func (cr *connReader) waitIdle() error {
	start := monoNow()
	err := cr.tls.fill(cr.park)
	cr.idleNs = monoNow() - start
	return err
}

// next returns the next n bytes (n <= readChunkSize), valid until the next
// call on cr. It returns io.EOF only if the stream ended with nothing
// buffered, io.ErrUnexpectedEOF if it ended part way.
func (cr *connReader) next(n int) ([]byte, error) {
	for cr.w-cr.r < n {
		if cr.buf != nil && len(cr.buf)-cr.r < n {
			cr.w = copy(cr.buf, cr.buf[cr.r:cr.w])
			cr.r = 0
		}
		if err := cr.readMore(); err != nil {
			if cr.r == cr.w && errors.Is(err, io.EOF) {
				return nil, io.EOF // clean end between frames
			}
			return nil, cr.midFrame(err)
		}
	}
	b := cr.buf[cr.r : cr.r+n]
	cr.r += n
	return b, nil
}

// readFull fills p from the stream.
func (cr *connReader) readFull(p []byte) error {
	n := copy(p, cr.buf[cr.r:cr.w])
	cr.r += n
	p = p[n:]
	for len(p) > 0 {
		if len(p) >= directReadMin {
			m, err := cr.readDirect(p)
			p = p[m:]
			if err != nil && len(p) > 0 {
				return cr.midFrame(err)
			}
			continue
		}
		if err := cr.readMore(); err != nil {
			return cr.midFrame(err)
		}
		n := copy(p, cr.buf[cr.r:cr.w])
		cr.r += n
		p = p[n:]
	}
	return nil
}

// discard skips n bytes.
func (cr *connReader) discard(n int) error {
	for n > 0 {
		if cr.r == cr.w {
			if err := cr.readMore(); err != nil {
				return cr.midFrame(err)
			}
		}
		m := min(n, cr.w-cr.r)
		cr.r += m
		n -= m
	}
	return nil
}

func (cr *connReader) readDirect(p []byte) (int, error) {
	cr.reads++
	if cr.rc != nil {
		return rawReadInto(cr.rc, p)
	}
	n, err := cr.conn.Read(p)
	if n == 0 && err == nil {
		err = io.ErrNoProgress
	}
	return n, err
}

func (cr *connReader) midFrame(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// close returns any chunk to the pool.
func (cr *connReader) close() {
	if cr.bufp != nil {
		cr.release()
	}
}
