//go:build !linux

package stunserver

import "net"

func (s *Server) serveConn(c *net.UDPConn) {
	defer s.wg.Done()
	s.serveConnSimple(c)
}
