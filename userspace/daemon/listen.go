package daemon

import (
	"context"
	"math"
	"net"
	"sync"
	"time"

	"github.com/xderp/xderp/userspace/metrics"
)

// listenTCP opens the main listener with derper's TCP tuning: keepalive idle
// time and TCP_USER_TIMEOUT (set on the listening socket, inherited by every
// accepted one).
func listenTCP(ctx context.Context, addr string, keepAlive, userTimeout time.Duration) (net.Listener, error) {
	lc := net.ListenConfig{
		KeepAliveConfig: net.KeepAliveConfig{Enable: keepAlive > 0, Idle: keepAlive},
		Control:         func(network, address string, c syscallRawConn) error { return setUserTimeout(c, userTimeout) },
	}
	if keepAlive == 0 {
		lc.KeepAlive = -1
	}
	lc.SetMultipathTCP(false) // TCP_USER_TIMEOUT does not apply to MPTCP
	return lc.Listen(ctx, "tcp", addr)
}

// limitedListener accepts at most rate connections per second with the given
// burst; connections over the budget are accepted and closed at once, so a
// flood costs the kernel's accept queue and not the relay's memory.
type limitedListener struct {
	net.Listener
	accepted, rejected *metrics.Counter

	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

func newLimitedListener(l net.Listener, rate float64, burst int, accepted, rejected *metrics.Counter) net.Listener {
	return &limitedListener{Listener: l, rate: rate, burst: float64(burst), tokens: float64(burst), accepted: accepted, rejected: rejected}
}

func (l *limitedListener) allow(now time.Time) bool {
	if math.IsInf(l.rate, 1) {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() {
		l.tokens = math.Min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	}
	l.last = now
	if l.tokens >= 1 {
		l.tokens--
		return true
	}
	return false
}

func (l *limitedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.allow(time.Now()) {
			l.accepted.Inc()
			return c, nil
		}
		l.rejected.Inc()
		c.Close()
	}
}
