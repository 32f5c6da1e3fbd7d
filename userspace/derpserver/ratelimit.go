package derpserver

import (
	"errors"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// Per-client receive limit (derper's -rate-config): every frame a client
// sends is charged by its payload length against that connection's token
// bucket before its body is read. A client over its rate is not dropped:
// its reader waits, the socket's receive buffer fills and TCP flow control
// slows the sender, so nothing is lost and other clients are not affected.
// Mesh peers are exempt. The state is reader-owned: no locks on the path.

// MinRateBurst is the smallest bucket: the largest frame (a maximum
// packet plus its key) must fit, or it could never be admitted.
const MinRateBurst = derp.MaxPacketSize + derp.KeyLen

// rateWaitSlice bounds one uninterrupted wait, so a paced reader notices
// within it that its connection or the server was closed.
const rateWaitSlice = 50 * time.Millisecond

// RateLimit is the per-client receive limit. BytesPerSec 0 disables it.
type RateLimit struct {
	BytesPerSec uint64
	BurstBytes  uint64
}

// normalize applies derper's rules: no rate means no limit at all; the
// bucket holds at least one frame of the largest size.
func (rl RateLimit) normalize() RateLimit {
	if rl.BytesPerSec == 0 {
		return RateLimit{}
	}
	rl.BurstBytes = max(rl.BurstBytes, MinRateBurst)
	return rl
}

// SetRateLimit applies rl to every client, those connected included, and
// returns the limit in effect (see normalize). Each connection starts the
// new limit with a full bucket.
func (s *Server) SetRateLimit(rl RateLimit) RateLimit {
	rl = rl.normalize()
	if rl.BytesPerSec == 0 {
		s.rateLimit.Store(nil)
	} else {
		s.rateLimit.Store(&rl)
	}
	return rl
}

// CurrentRateLimit returns the limit in effect (zero: none).
func (s *Server) CurrentRateLimit() RateLimit {
	if rl := s.rateLimit.Load(); rl != nil {
		return *rl
	}
	return RateLimit{}
}

// recvBucket is one connection's bucket, owned by its reader.
type recvBucket struct {
	limit  *RateLimit // the setting the bucket was filled for
	tokens float64    // may go negative: the debt the reader waits off
	last   int64      // monoNow() of the last charge
}

var errConnClosedWhilePaced = errors.New("connection closed while its reader waited for its rate limit")

// paceRecv charges a frame of n payload bytes to c's bucket and waits, if
// the bucket is in debt, until the debt is paid. Frames are charged at
// most MinRateBurst (larger ones are refused by the frame checks anyway).
func (c *sclient) paceRecv(rl *RateLimit, n uint32) error {
	b := &c.recvLimit
	now := monoNow()
	if b.limit != rl {
		*b = recvBucket{limit: rl, tokens: float64(rl.BurstBytes), last: now}
	}
	rate := float64(rl.BytesPerSec)
	b.tokens = min(float64(rl.BurstBytes), b.tokens+float64(now-b.last)*rate/1e9)
	b.last = now
	b.tokens -= float64(min(n, MinRateBurst))
	if b.tokens >= 0 {
		return nil
	}
	c.s.m.rateLimitWaits.Inc()
	// Flush what this reader counted before it stops for a while.
	c.stats.flush(&c.s.m)
	wait := time.Duration(-b.tokens / rate * 1e9)
	for wait > 0 {
		if c.connClosed.Load() || c.s.closed.Load() {
			return errConnClosedWhilePaced
		}
		d := min(wait, rateWaitSlice)
		<-c.armWaitTimer(d)
		wait -= d
	}
	return nil
}
