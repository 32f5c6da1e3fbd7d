package stunserver

import (
	"encoding/binary"
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

// serveConn answers requests on c, up to batchSize per recvmmsg and one
// sendmmsg per batch, so a busy server makes two system calls per batch
// instead of two per request.
func (s *Server) serveConn(c *net.UDPConn) {
	defer s.wg.Done()
	rc, err := c.SyscallConn()
	if err != nil {
		s.serveConnSimple(c)
		return
	}
	b := newBatch()
	for {
		var n int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			for i := range b.in {
				b.in[i].Hdr.Namelen = unix.SizeofSockaddrAny
				b.in[i].Hdr.Flags = 0
				b.in[i].Len = 0
			}
			r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.in[0])), batchSize, unix.MSG_DONTWAIT, 0, 0)
			if errno == unix.EAGAIN || errno == unix.EWOULDBLOCK {
				return false
			}
			if errno != 0 {
				rerr = errno
			}
			n = int(r)
			return true
		})
		if err != nil { // closed
			return
		}
		if rerr != nil {
			if rerr == unix.EINTR {
				continue
			}
			s.readErr.Inc()
			continue
		}
		// Count per batch, not per datagram: one atomic add per counter.
		k, bad, v4 := 0, 0, 0
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
		s.sendAll(rc, b.out[:k])
	}
}

// sendAll sends every message, waiting for socket space as needed; a
// message the kernel refuses is counted and skipped.
func (s *Server) sendAll(rc interface {
	Write(func(uintptr) bool) error
}, msgs []unix.Mmsghdr) {
	for len(msgs) > 0 {
		var sent int
		var werr unix.Errno
		err := rc.Write(func(fd uintptr) bool {
			r, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), unix.MSG_DONTWAIT, 0, 0)
			if errno == unix.EAGAIN || errno == unix.EWOULDBLOCK {
				return false
			}
			werr, sent = errno, int(r)
			return true
		})
		if err != nil {
			return
		}
		switch {
		case werr == unix.EINTR:
		case werr != 0:
			// The first message failed (an unreachable destination, say):
			// count it and go on with the rest.
			s.writeErr.Inc()
			msgs = msgs[1:]
		default:
			s.success.Add(uint64(sent))
			msgs = msgs[sent:]
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
