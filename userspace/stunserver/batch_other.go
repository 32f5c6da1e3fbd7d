//go:build !linux

package stunserver

import (
	"errors"
	"net"

	"github.com/xderp/xderp/userspace/stun"
)

// socket is one listening socket; without recvmmsg it stays a plain
// net.UDPConn served through the Go netpoller.
type socket struct{ c *net.UDPConn }

func newSocket(c *net.UDPConn) (*socket, error) { return &socket{c}, nil }

// wake unblocks the serving goroutine: closing the connection makes its read
// fail with net.ErrClosed.
func (k *socket) wake() { k.c.Close() }

func (k *socket) close() {}

// serve answers requests on k's connection one datagram at a time until
// Close closes it.
func (s *Server) serve(k *socket) {
	defer s.wg.Done()
	c := k.c
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
