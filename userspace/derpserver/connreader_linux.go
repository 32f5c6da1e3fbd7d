package derpserver

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// rawConnOf returns the raw descriptor access of plain TCP and Unix
// sockets, or nil for anything else (TLS, pipes, wrappers).
func rawConnOf(c net.Conn) syscall.RawConn {
	var sc syscall.Conn
	switch c := c.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// rawFill reads into the chunk, taking a chunk from the pool only once the
// socket is readable: the function passed to RawConn.Read returns false on
// EAGAIN, which parks the goroutine in the netpoller with no chunk held.
// (It must try the read first: RawConn.Read resets the poller's readiness
// before calling f, so parking without a read could miss data that
// arrived earlier.)
func (cr *connReader) rawFill() error {
	var n int
	var rerr error
	err := cr.rc.Read(func(fd uintptr) bool {
		if cr.buf == nil {
			cr.acquire()
		}
		n, rerr = nbRead(fd, cr.buf[cr.w:])
		if rerr == syscall.EAGAIN {
			if cr.r == cr.w {
				cr.release()
			}
			cr.park()
			return false
		}
		return true
	})
	if err != nil {
		return err
	}
	if rerr != nil {
		return os.NewSyscallError("read", rerr)
	}
	if n <= 0 {
		return io.EOF
	}
	cr.w += n
	cr.hot++
	return nil
}

// fill parks until the socket has data, an error or EOF to report, and
// then reads what is there into the probeConn's chunk, from which Read
// serves crypto/tls; park runs before parking. (The read must come first,
// for the same reason as in rawFill.) An error or EOF is kept for Read to
// report. A chunk is held while parked only if part of a record header
// has arrived.
func (c *probeConn) fill(park func()) error {
	return c.rc.Read(func(fd uintptr) bool {
		n, err := nbRead(fd, c.room())
		if n > 0 {
			c.w += n
		}
		if c.r == c.w {
			c.dropChunk()
		}
		switch {
		case err == syscall.EAGAIN:
			park()
			return false
		case err != nil:
			c.err = os.NewSyscallError("read", err)
		case n == 0:
			c.err = io.EOF
		}
		return true
	})
}

// rawReadInto reads directly into p.
func rawReadInto(rc syscall.RawConn, p []byte) (int, error) {
	var n int
	var rerr error
	err := rc.Read(func(fd uintptr) bool {
		n, rerr = nbRead(fd, p)
		return rerr != syscall.EAGAIN
	})
	if err != nil {
		return 0, err
	}
	if rerr != nil {
		return 0, os.NewSyscallError("read", rerr)
	}
	if n <= 0 {
		return 0, io.EOF
	}
	return n, nil
}

// rawWriteNow writes as much of b as the socket takes without waiting.
// It returns syscall.EAGAIN (with n == 0) if the socket buffer is full.
func rawWriteNow(rc syscall.RawConn, b []byte) (int, error) {
	var n int
	var werr error
	err := rc.Write(func(fd uintptr) bool {
		n, werr = nbWrite(fd, b)
		return true // never wait: the caller queues what is left
	})
	if n < 0 {
		n = 0
	}
	if err != nil {
		return n, err
	}
	return n, werr
}

// rawWriteAll writes all of b, parking in the netpoller while the socket
// buffer is full; the connection's write deadline applies.
func rawWriteAll(rc syscall.RawConn, b []byte) (int, error) {
	var n int
	var werr error
	err := rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			k, e := nbWrite(fd, b[n:])
			if e == syscall.EAGAIN {
				return false // wait until writable
			}
			if e != nil {
				werr = os.NewSyscallError("write", e)
				return true
			}
			if k == 0 { // not for a socket, but never loop on it
				werr = io.ErrShortWrite
				return true
			}
			n += k
		}
		return true
	})
	if err != nil {
		return n, err
	}
	return n, werr
}

// nbRead and nbWrite are read(2) and write(2) on a non-blocking socket,
// made without the scheduler's system-call bookkeeping (RawSyscall): they
// never sleep, so there is nothing to hand the P over for. Going through
// entersyscall instead wakes sysmon from its idle sleep on every call of a
// relay that goes idle between packets, and sysmon, finding the P still in
// a system call that takes a loopback delivery's few microseconds, hands the
// P to another thread: on a lightly loaded relay those wake-ups cost more
// CPU than the relaying itself. EINTR is retried; a nil error means success.
func nbRead(fd uintptr, p []byte) (int, error) { return nbIO(syscall.SYS_READ, fd, p) }

func nbWrite(fd uintptr, p []byte) (int, error) { return nbIO(syscall.SYS_WRITE, fd, p) }

func nbIO(trap, fd uintptr, p []byte) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	for {
		r, _, e := syscall.RawSyscall(trap, fd, uintptr(ptr), uintptr(len(p)))
		switch e {
		case 0:
			return int(r), nil
		case syscall.EINTR:
			continue
		}
		return 0, e
	}
}
