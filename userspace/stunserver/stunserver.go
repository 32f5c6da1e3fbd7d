// Package stunserver owns the userspace STUN responder: the fallback that
// answers binding requests when XDP is off, and whatever XDP passes to the
// kernel. It opens several SO_REUSEPORT sockets on one address so the kernel
// spreads requests over all cores, and answers with the same codec
// (userspace/stun) that the XDP tests use as their oracle.
package stunserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"

	"github.com/xderp/xderp/userspace/metrics"
	"github.com/xderp/xderp/userspace/stun"
)

// Options configures a Server.
type Options struct {
	// Metrics receives derper's stun_requests and stun_addrfamily families.
	// Nil means a private registry.
	Metrics *metrics.Registry
}

// Server answers STUN binding requests on one UDP address.
type Server struct {
	conns []*net.UDPConn
	wg    sync.WaitGroup

	closeOnce sync.Once

	success, notSTUN, readErr, writeErr *metrics.Counter
	ipv4, ipv6                          *metrics.Counter
}

// New returns a Server that is not yet listening.
func New(opts Options) *Server {
	reg := opts.Metrics
	if reg == nil {
		reg = metrics.NewRegistry()
	}
	req := reg.CounterVec("stun_requests", "STUN requests by disposition (success, not_stun, read_error, write_error).", "disposition")
	fam := reg.CounterVec("stun_addrfamily", "STUN binding requests answered, by client address family.", "family")
	s := &Server{
		success:  req.With("success"),
		notSTUN:  req.With("not_stun"),
		readErr:  req.With("read_error"),
		writeErr: req.With("write_error"),
		ipv4:     fam.With("ipv4"),
		ipv6:     fam.With("ipv6"),
	}
	return s
}

// Start binds sockets SO_REUSEPORT sockets (0: one per CPU; one where the
// platform lacks SO_REUSEPORT) to addr ("host:port"; an empty host means every
// address, dual-stack). With port 0 the first socket picks the port and the
// others share it.
// It then answers requests in the background until Close.
func (s *Server) Start(ctx context.Context, addr string, sockets int) error {
	if sockets <= 0 {
		sockets = runtime.NumCPU()
	}
	if !reusePortSupported {
		sockets = 1
	}
	lc := net.ListenConfig{Control: reusePort}
	for i := 0; i < sockets; i++ {
		pc, err := lc.ListenPacket(ctx, "udp", addr)
		if err != nil {
			s.Close()
			return fmt.Errorf("stun: listen %s: %w", addr, err)
		}
		c := pc.(*net.UDPConn)
		s.conns = append(s.conns, c)
		if i == 0 {
			addr = c.LocalAddr().String() // later sockets join the port the first one got
		}
	}
	for _, c := range s.conns {
		s.wg.Add(1)
		go s.serveConn(c)
	}
	return nil
}

// LocalAddr returns the bound address, or the zero value before Listen.
func (s *Server) LocalAddr() netip.AddrPort {
	if len(s.conns) == 0 {
		return netip.AddrPort{}
	}
	return s.conns[0].LocalAddr().(*net.UDPAddr).AddrPort()
}

// Close closes every socket and waits for the serving goroutines.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		for _, c := range s.conns {
			c.Close()
		}
	})
	s.wg.Wait()
	return nil
}

// serveConnSimple answers requests on c one datagram at a time (platforms
// without recvmmsg).
func (s *Server) serveConnSimple(c *net.UDPConn) {
	buf := make([]byte, 64<<10)
	out := make([]byte, 0, 64)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.readErr.Inc()
			continue
		}
		tx, err := stun.ParseBindingRequest(buf[:n])
		if err != nil {
			s.notSTUN.Inc()
			continue
		}
		if from.Addr().Unmap().Is4() {
			s.ipv4.Inc()
		} else {
			s.ipv6.Inc()
		}
		out = stun.AppendResponse(out[:0], tx, from)
		if _, err := c.WriteToUDPAddrPort(out, from); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.writeErr.Inc()
			continue
		}
		s.success.Inc()
	}
}
