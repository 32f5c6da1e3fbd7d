// Package stunserver owns the userspace STUN responder: the fallback that
// answers binding requests when XDP is off, and whatever XDP passes to the
// kernel. It opens several SO_REUSEPORT sockets on one address so the kernel
// spreads requests over all cores, and answers with the same codec
// (userspace/stun) that the XDP tests use as their oracle.
package stunserver

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/xderp/xderp/userspace/metrics"
)

// Options configures a Server.
type Options struct {
	// Metrics receives derper's stun_requests and stun_addrfamily families.
	// Nil means a private registry.
	Metrics *metrics.Registry
}

// Server answers STUN binding requests on one UDP address.
type Server struct {
	socks []*socket
	addr  netip.AddrPort
	wg    sync.WaitGroup

	closing   atomic.Bool // set by Close before it wakes the serving goroutines
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
		if i == 0 {
			s.addr = c.LocalAddr().(*net.UDPAddr).AddrPort()
			addr = c.LocalAddr().String() // later sockets join the port the first one got
		}
		k, err := newSocket(c)
		if err != nil {
			s.Close()
			return fmt.Errorf("stun: %s: %w", addr, err)
		}
		s.socks = append(s.socks, k)
	}
	for _, k := range s.socks {
		s.wg.Add(1)
		go s.serve(k)
	}
	return nil
}

// LocalAddr returns the bound address, or the zero value before Start.
func (s *Server) LocalAddr() netip.AddrPort {
	return s.addr
}

// Close stops serving, waits for the serving goroutines and closes every
// socket. The descriptors are closed only once no goroutine uses them, so a
// number the kernel hands out again is never read by a late system call.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.closing.Store(true)
		for _, k := range s.socks {
			k.wake()
		}
		s.wg.Wait()
		for _, k := range s.socks {
			k.close()
		}
	})
	return nil
}
