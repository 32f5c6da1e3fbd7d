package derpserver

import (
	"bytes"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

func TestRateLimitNormalize(t *testing.T) {
	for _, tc := range []struct{ in, want RateLimit }{
		{RateLimit{}, RateLimit{}},
		{RateLimit{BurstBytes: 1 << 20}, RateLimit{}}, // no rate: no limit at all
		{RateLimit{BytesPerSec: 1000}, RateLimit{BytesPerSec: 1000, BurstBytes: MinRateBurst}},
		{RateLimit{BytesPerSec: 1000, BurstBytes: 10}, RateLimit{BytesPerSec: 1000, BurstBytes: MinRateBurst}},
		{RateLimit{BytesPerSec: 1000, BurstBytes: 1 << 20}, RateLimit{BytesPerSec: 1000, BurstBytes: 1 << 20}},
	} {
		if got := tc.in.normalize(); got != tc.want {
			t.Errorf("%+v: %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

// sendPaced sends n packets of size bytes from a to b and checks that all
// arrive, in order and intact: pacing slows a sender, it never drops.
func sendPaced(t *testing.T, a, b *testClient, n, size int) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range n {
			pkt := bytes.Repeat([]byte{byte(i)}, size)
			a.send(b.pub, pkt)
		}
	}()
	for i := range n {
		_, pkt := b.recvPacket()
		if len(pkt) != size || pkt[0] != byte(i) || pkt[size-1] != byte(i) {
			t.Fatalf("packet %d: %d bytes starting %d", i, len(pkt), pkt[0])
		}
	}
	<-done
}

func TestRateLimitPacesSenderWithoutLoss(t *testing.T) {
	const rate = 1 << 20 // 1 MiB/s
	ts := newTestServer(t, Options{RateLimit: &RateLimit{BytesPerSec: rate}, MeshKey: testMeshKey})
	if got := ts.s.CurrentRateLimit(); got.BurstBytes != MinRateBurst {
		t.Fatalf("burst %d, want it raised to %d", got.BurstBytes, MinRateBurst)
	}
	a := newClient(t, ts.addr, clientOpts{})
	b := newClient(t, ts.addr, clientOpts{})

	// A full bucket, then 512 KiB more than it holds: at 1 MiB/s the
	// sender cannot be done in less than half a second.
	const size = 16 << 10
	frame := size + derp.KeyLen
	n := (MinRateBurst + 512<<10) / frame
	start := time.Now()
	sendPaced(t, a, b, n, size)
	elapsed := time.Since(start)
	owed := time.Duration(float64(n*frame-MinRateBurst) / rate * float64(time.Second))
	if elapsed < owed*95/100 {
		t.Errorf("%d bytes beyond the bucket went through in %v; at %d B/s that takes at least %v", n*frame-MinRateBurst, elapsed, rate, owed)
	}
	if v := ts.metric("derp_rate_limit_per_client_waited"); v == 0 {
		t.Error("no paced frame counted")
	}
	if v := ts.metric("derp_rate_limit_per_client_bytes_per_second"); v != rate {
		t.Errorf("derp_rate_limit_per_client_bytes_per_second = %v", v)
	}

	// A mesh peer is never paced.
	waited := ts.metric("derp_rate_limit_per_client_waited")
	m := newClient(t, ts.addr, clientOpts{info: meshInfo(t)})
	sendPaced(t, m, b, n, size)
	if v := ts.metric("derp_rate_limit_per_client_waited"); v != waited {
		t.Errorf("mesh peer paced %v times", v-waited)
	}

	// Lifting the limit applies to connections already open.
	ts.s.SetRateLimit(RateLimit{})
	sendPaced(t, a, b, n, size)
	if v := ts.metric("derp_rate_limit_per_client_waited"); v != waited {
		t.Errorf("paced %v times after the limit was lifted", v-waited)
	}
	if v := ts.metric("derp_rate_limit_per_client_bytes_per_second"); v != 0 {
		t.Errorf("derp_rate_limit_per_client_bytes_per_second = %v after lifting", v)
	}
}

// A reader waiting off a long debt stops when the server closes, rather
// than holding Close for the whole debt.
func TestRateLimitWaitEndsOnClose(t *testing.T) {
	ts := newTestServer(t, Options{RateLimit: &RateLimit{BytesPerSec: 1000}, CloseGrace: 100 * time.Millisecond})
	a := newClient(t, ts.addr, clientOpts{})
	b := newClient(t, ts.addr, clientOpts{})
	// Two maximum frames: the second owes 65 s at 1000 B/s.
	big := make([]byte, derp.MaxPacketSize)
	a.send(b.pub, big)
	a.send(b.pub, big)
	b.recvPacket()
	ts.waitMetric("derp_rate_limit_per_client_waited", func(v float64) bool { return v == 1 })
	closed := make(chan struct{})
	go func() {
		ts.s.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close waited for a paced reader's debt")
	}
}
