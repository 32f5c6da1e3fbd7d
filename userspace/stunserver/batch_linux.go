package stunserver

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xderp/xderp/userspace/metrics"
	"github.com/xderp/xderp/userspace/stun"
)

// batchSize is the number of datagrams read (and answered) per system call.
const batchSize = 32

// slotSize bounds a request datagram: anything longer is not a request we
// answer (stun.MaxSize is smaller), so the kernel's MSG_TRUNC is enough to
// reject it.
const slotSize = 512

// batch holds the recvmmsg/sendmmsg state of one socket, allocated once.
type batch struct {
	in    [batchSize]unix.Mmsghdr
	out   [batchSize]unix.Mmsghdr
	inIov [batchSize]unix.Iovec
	outIv [batchSize]unix.Iovec
	names [batchSize]unix.RawSockaddrAny
	bufs  [batchSize][slotSize]byte
	resp  [batchSize][64]byte
}

func newBatch() *batch {
	b := new(batch)
	for i := range b.in {
		b.inIov[i].Base = &b.bufs[i][0]
		b.inIov[i].SetLen(slotSize)
		b.in[i].Hdr.Iov = &b.inIov[i]
		b.in[i].Hdr.SetIovlen(1)
		b.in[i].Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
	}
	return b
}

// socket is one SO_REUSEPORT socket in blocking mode, outside the Go
// netpoller, served by one goroutine that sleeps in recvmmsg itself.
//
// Why not the netpoller: about 95% of the CPU per response is the kernel's
// (receiving the request, routing and sending the answer and, on loopback,
// delivering it into the client's socket), so what the server can save is
// the cost of waiting. Through the netpoller, running out of requests costs a
// recvmmsg that fails with EAGAIN, an epoll_pwait wake-up and a goroutine
// hand-off, and the epoll registration is notified of every datagram
// received and every response freed. Blocked in recvmmsg, the thread is woken
// by the kernel itself and every call returns requests. The price is one OS
// thread per socket, asleep while idle.
type socket struct{ fd int }

// newSocket takes c's socket out of the netpoller: it duplicates the
// descriptor, closes c (which deregisters the original from epoll) and puts
// the socket in blocking mode. Binding through net.ListenConfig first keeps
// Go's address handling (a wildcard address is dual-stack).
func newSocket(c *net.UDPConn) (*socket, error) {
	defer c.Close()
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("dup: %w", derr)
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set blocking: %w", err)
	}
	return &socket{fd}, nil
}

// wake makes the goroutine serving k return from recvmmsg or sendmmsg.
// Closing a descriptor does not wake a thread blocked on it; shutdown does:
// on an unconnected UDP socket it fails with ENOTCONN but still marks the
// socket shut down and wakes its waiters, and every later call returns at
// once.
func (k *socket) wake() { unix.Shutdown(k.fd, unix.SHUT_RDWR) }

func (k *socket) close() { unix.Close(k.fd) }

// serve answers requests on sk until Close: up to batchSize per recvmmsg
// (blocking for the first, MSG_WAITFORONE) and one sendmmsg per batch, so a
// busy server makes two system calls per batch instead of two per request.
func (s *Server) serve(sk *socket) {
	defer s.wg.Done()
	b := newBatch()
	fd := uintptr(sk.fd)
	for {
		for i := range b.in {
			b.in[i].Hdr.Namelen = unix.SizeofSockaddrAny
			b.in[i].Hdr.Flags = 0
			b.in[i].Len = 0
		}
		r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.in[0])), batchSize, unix.MSG_WAITFORONE, 0, 0)
		if s.closing.Load() {
			return
		}
		if errno != 0 {
			if errno != unix.EINTR {
				s.readErr.Inc()
			}
			continue
		}
		// Count per batch, not per datagram: one atomic add per counter.
		n, k, bad, v4 := int(r), 0, 0, 0
		for i := 0; i < n; i++ {
			h := &b.in[i]
			if h.Hdr.Flags&unix.MSG_TRUNC != 0 {
				bad++
				continue
			}
			tx, err := stun.ParseBindingRequest(b.bufs[i][:h.Len])
			if err != nil {
				bad++
				continue
			}
			from, ok := sockaddrAddrPort(&b.names[i])
			if !ok {
				bad++
				continue
			}
			if from.Addr().Unmap().Is4() {
				v4++
			}
			resp := stun.AppendResponse(b.resp[i][:0], tx, from)
			b.outIv[k].Base = &b.resp[i][0]
			b.outIv[k].SetLen(len(resp))
			o := &b.out[k]
			o.Hdr.Iov = &b.outIv[k]
			o.Hdr.SetIovlen(1)
			o.Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
			o.Hdr.Namelen = h.Hdr.Namelen
			k++
		}
		addNonZero(s.notSTUN, bad)
		addNonZero(s.ipv4, v4)
		addNonZero(s.ipv6, k-v4)
		s.sendAll(fd, b.out[:k])
	}
}

// sendAll sends every message, blocking while the socket's send buffer is
// full; a message the kernel refuses is counted and skipped.
func (s *Server) sendAll(fd uintptr, msgs []unix.Mmsghdr) {
	for len(msgs) > 0 {
		// First without blocking, and so without the scheduler's
		// system-call bookkeeping: the socket buffer almost always has room.
		r, _, errno := unix.RawSyscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT, 0, 0)
		if errno == unix.EAGAIN {
			r, _, errno = unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), unix.MSG_NOSIGNAL, 0, 0)
		}
		switch {
		case errno == unix.EINTR:
		case errno != 0:
			if s.closing.Load() {
				return
			}
			// The first message failed (an unreachable destination, say):
			// count it and go on with the rest.
			s.writeErr.Inc()
			msgs = msgs[1:]
		default:
			s.success.Add(uint64(r))
			msgs = msgs[r:]
		}
	}
}

func sockaddrAddrPort(sa *unix.RawSockaddrAny) (netip.AddrPort, bool) {
	switch sa.Addr.Family {
	case unix.AF_INET:
		p := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&p.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(p.Addr), port), true
	case unix.AF_INET6:
		p := (*unix.RawSockaddrInet6)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&p.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(p.Addr), port), true
	}
	return netip.AddrPort{}, false
}

func addNonZero(c *metrics.Counter, n int) {
	if n > 0 {
		c.Add(uint64(n))
	}
}
