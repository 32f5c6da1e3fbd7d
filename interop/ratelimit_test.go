package interop

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
)

// TestRateConfig runs derper's per-client receive limit (-rate-config,
// derper's own file format) against xderpd and derper: Tailscale's client
// sending beyond its bucket is slowed to the configured rate and loses
// nothing, derper's metrics report the limit, and a SIGHUP after the file
// changes lifts the limit for connections already open.
func TestRateConfig(t *testing.T) {
	const rate = 1 << 20 // bytes per second
	file := filepath.Join(t.TempDir(), "rate.json")
	writeRate := func(body string) {
		t.Helper()
		if err := os.WriteFile(file, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeRate(`{"PerClientRateLimitBytesPerSec": 1048576}`)
	s := startServer(t, target.Options{ExtraArgs: []string{"-rate-config", file}})
	metric := func(name string) float64 {
		t.Helper()
		v, err := s.Metric(t.Context(), name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return v
	}
	if v := metric("derp_rate_limit_per_client_bytes_per_second"); v != rate {
		t.Fatalf("derp_rate_limit_per_client_bytes_per_second = %v, want %d", v, rate)
	}
	// Both raise the bucket to one largest frame (64 KiB + 32).
	burst := metric("derp_rate_limit_per_client_burst_bytes")
	if burst != 64<<10+32 {
		t.Fatalf("derp_rate_limit_per_client_burst_bytes = %v, want %d", burst, 64<<10+32)
	}

	a, b := newPeer(t, s), newPeer(t, s)
	syncPeers(t, a, b)
	const size = 16 << 10
	// A full bucket, then 512 KiB beyond it.
	n := int((burst + 512<<10) / (size + 32))
	send := func() time.Duration {
		t.Helper()
		start := time.Now()
		errc := make(chan error, 1)
		go func() {
			for i := range n {
				pkt := make([]byte, size)
				pkt[0], pkt[size-1] = byte(i), byte(i)
				if err := a.c.Send(b.pub, pkt); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
		for i := range n {
			p, err := b.nextPacket(30 * time.Second)
			if err != nil {
				t.Fatalf("packet %d of %d: %v", i, n, err)
			}
			if len(p.Data) != size || p.Data[0] != byte(i) || p.Data[size-1] != byte(i) {
				t.Fatalf("packet %d: %d bytes, marks %d/%d", i, len(p.Data), p.Data[0], p.Data[size-1])
			}
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		return time.Since(start)
	}
	owed := time.Duration((float64(n*(size+32)) - burst) / rate * float64(time.Second))
	if elapsed := send(); elapsed < owed*95/100 {
		t.Errorf("%d bytes beyond the bucket went through in %v; at %d B/s that takes at least %v", int(float64(n*(size+32))-burst), elapsed, rate, owed)
	}
	waited := metric("derp_rate_limit_per_client_waited")
	if waited == 0 {
		t.Error("derp_rate_limit_per_client_waited did not count the paced frames")
	}

	// Lift the limit and reload: the open connection is no longer paced.
	writeRate(`{"PerClientRateLimitBytesPerSec": 0}`)
	if err := s.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for {
		v, err := s.Metric(ctx, "derp_rate_limit_per_client_bytes_per_second")
		if err == nil && v == 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("limit still %v after SIGHUP (%v)", v, err)
		}
	}
	send()
	if v := metric("derp_rate_limit_per_client_waited"); v != waited {
		t.Errorf("%v more frames paced after the limit was lifted", v-waited)
	}
}
