// Package lograte limits how often a log line that the network can trigger
// is written: internet scanners, refused clients and outages must not flood
// the log, and the line that is written says how many were left out.
package lograte

import (
	"sync"
	"time"
)

// Limiter is a token bucket for log lines: burst lines at once, then one
// per interval. It counts what it suppressed so the next line can say so.
type Limiter struct {
	mu         sync.Mutex
	burst      float64
	tokens     float64
	interval   time.Duration
	last       time.Time
	suppressed uint64
}

// New returns a full Limiter.
func New(burst int, interval time.Duration) *Limiter {
	return &Limiter{burst: float64(burst), tokens: float64(burst), interval: interval}
}

// Allow reports whether a line may be written at now and, if so, how many
// were suppressed since the last one written.
func (l *Limiter) Allow(now time.Time) (bool, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() {
		l.tokens = min(l.burst, l.tokens+float64(now.Sub(l.last))/float64(l.interval))
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed++
		return false, 0
	}
	l.tokens--
	s := l.suppressed
	l.suppressed = 0
	return true, s
}

// Attrs returns the slog attributes for a written line: args, plus the
// count of suppressed lines when there were any.
func Attrs(suppressed uint64, args ...any) []any {
	if suppressed > 0 {
		args = append(args, "suppressed", suppressed)
	}
	return args
}
