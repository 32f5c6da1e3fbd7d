package derpserver

import (
	"crypto/tls"
	"net"
	"syscall"
	"time"
)

// TCP round-trip times, as derper's derp_tcp_rtt: every RTTSampleInterval
// the kernel's smoothed RTT of each established connection is read
// (TCP_INFO) and counted in one bucket. One timer serves the whole server,
// started with the first connection, so an idle connection costs no timer
// of its own.

// DefaultRTTSampleInterval is derper's sampling interval.
const DefaultRTTSampleInterval = 10 * time.Second

// rttBuckets are derper's upper bounds and label values.
var rttBuckets = [...]struct {
	le    time.Duration
	label string
}{
	{10 * time.Millisecond, "10ms"},
	{20 * time.Millisecond, "20ms"},
	{50 * time.Millisecond, "50ms"},
	{100 * time.Millisecond, "100ms"},
	{150 * time.Millisecond, "150ms"},
	{250 * time.Millisecond, "250ms"},
	{500 * time.Millisecond, "500ms"},
}

// rttBucket returns the index into serverMetrics.rtt for d: a bucket of
// rttBuckets, or len(rttBuckets) for "inf".
func rttBucket(d time.Duration) int {
	for i, b := range rttBuckets {
		if d <= b.le {
			return i
		}
	}
	return len(rttBuckets)
}

// tcpSocketOf returns the TCP socket under nc (through TLS, the TLS
// listener's wrapper and WebSocket framing), or nil if there is none.
func tcpSocketOf(nc net.Conn) syscall.RawConn {
	for {
		switch c := nc.(type) {
		case *net.TCPConn:
			rc, err := c.SyscallConn()
			if err != nil {
				return nil
			}
			return rc
		case *tls.Conn:
			nc = c.NetConn()
		case *probeConn:
			nc = c.Conn
		case *wsConn:
			nc = c.Conn
		default:
			return nil
		}
	}
}

// noteRTTSocket records a new connection's socket for sampling (or counts
// it as non-TCP) and starts the sampling timer with the first one. It is
// called with connsMu held.
func (s *Server) noteRTTSocketLocked(c *sclient) {
	if s.opts.RTTSampleInterval < 0 {
		return
	}
	if _, plain := c.conn.(*net.TCPConn); plain && c.rc != nil {
		c.tcp = c.rc // the inline writes' handle on the same socket
	} else {
		c.tcp = tcpSocketOf(c.conn)
	}
	if c.tcp == nil {
		s.m.rttNonTCP.Inc()
		return
	}
	if s.rttTimer == nil {
		s.rttTimer = time.AfterFunc(s.opts.RTTSampleInterval, s.sampleRTT)
	}
}

// sampleRTT reads the RTT of every established TCP connection and counts
// it, then schedules the next round.
func (s *Server) sampleRTT() {
	s.connsMu.Lock()
	if s.closed.Load() {
		s.connsMu.Unlock()
		return
	}
	socks := s.rttSocks[:0]
	for c := range s.clients {
		if c.tcp != nil {
			socks = append(socks, c.tcp)
		}
	}
	s.connsMu.Unlock()

	var counts [len(rttBuckets) + 1]uint64
	var errs uint64
	for i, rc := range socks {
		socks[i] = nil
		var rtt time.Duration
		var serr error
		// Control fails once the connection is closed (nothing to count);
		// while it runs, the descriptor cannot be closed and reused.
		if err := rc.Control(func(fd uintptr) { rtt, serr = socketRTT(fd) }); err != nil {
			continue
		}
		if serr != nil {
			errs++
			continue
		}
		counts[rttBucket(rtt)]++
	}
	for i, n := range counts {
		if n > 0 {
			s.m.rtt[i].Add(n)
		}
	}
	if errs > 0 {
		s.m.rttErrors.Add(errs)
	}

	s.connsMu.Lock()
	defer s.connsMu.Unlock()
	s.rttSocks = socks[:0]
	if !s.closed.Load() {
		s.rttTimer.Reset(s.opts.RTTSampleInterval)
	}
}
