package derpserver

import (
	"io"
	"net"
	"os"
	"syscall"
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
		for {
			n, rerr = syscall.Read(int(fd), cr.buf[cr.w:])
			if rerr != syscall.EINTR {
				break
			}
		}
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

// waitReadable parks until the socket has data, an error or EOF to report,
// without reading anything; park runs before parking. (The peek must come
// first, for the same reason as in rawFill.)
func waitReadable(rc syscall.RawConn, park func()) error {
	var one [1]byte
	return rc.Read(func(fd uintptr) bool {
		for {
			_, _, err := syscall.Recvfrom(int(fd), one[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			switch err {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				park()
				return false
			}
			return true
		}
	})
}

// rawReadInto reads directly into p.
func rawReadInto(rc syscall.RawConn, p []byte) (int, error) {
	var n int
	var rerr error
	err := rc.Read(func(fd uintptr) bool {
		for {
			n, rerr = syscall.Read(int(fd), p)
			if rerr != syscall.EINTR {
				break
			}
		}
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
		for {
			n, werr = syscall.Write(int(fd), b)
			if werr != syscall.EINTR {
				break
			}
		}
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
