package derpserver

import (
	"crypto/tls"
	"fmt"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/metrics"
)

func TestRTTBucket(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want string
	}{
		{0, "10ms"},
		{10 * time.Millisecond, "10ms"},
		{10*time.Millisecond + 1, "20ms"},
		{120 * time.Millisecond, "150ms"},
		{500 * time.Millisecond, "500ms"},
		{500*time.Millisecond + 1, "inf"},
		{time.Hour, "inf"},
	} {
		i := rttBucket(c.d)
		got := "inf"
		if i < len(rttBuckets) {
			got = rttBuckets[i].label
		}
		if got != c.want {
			t.Errorf("rttBucket(%v) = %s, want %s", c.d, got, c.want)
		}
	}
}

// rttSamples sums the derp_tcp_rtt buckets that hold RTT samples.
func rttSamples(ts *testServer) float64 {
	n := 0.0
	for _, b := range rttBuckets {
		n += ts.metric(`derp_tcp_rtt{le="` + b.label + `"}`)
	}
	return n + ts.metric(`derp_tcp_rtt{le="inf"}`)
}

// TestTCPRTTSamples: every established TCP connection, plain, under TLS or
// under WebSocket framing, is sampled once per interval; a connection without a TCP socket is
// counted once as non-tcp.
func TestTCPRTTSamples(t *testing.T) {
	ts := newTestServer(t, Options{RTTSampleInterval: 5 * time.Millisecond})
	if got := rttSamples(ts); got != 0 {
		t.Fatalf("%v samples before any connection", got)
	}
	newClient(t, ts.addr, clientOpts{})
	newClient(t, ts.addr, clientOpts{})
	// Several rounds over both connections.
	ts.waitMetric(`derp_tcp_rtt{le="10ms"}`, func(float64) bool { return rttSamples(ts) >= 10 })

	// Under TLS the socket is found through the tls.Conn.
	hs := httptest.NewTLSServer(ts.s)
	t.Cleanup(hs.Close)
	conn, err := tls.Dial("tcp", hs.Listener.Addr().String(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := handshakeClient(t, conn, clientOpts{}); err != nil {
		t.Fatal(err)
	}
	// Under WebSocket framing too.
	wsDERPClient(t, ts, 1000)
	ts.s.connsMu.Lock()
	found := map[string]bool{}
	for c := range ts.s.clients {
		kind := fmt.Sprintf("%T", c.conn)
		found[kind] = c.tcp != nil
	}
	ts.s.connsMu.Unlock()
	for _, kind := range []string{"*net.TCPConn", "*tls.Conn", "*derpserver.wsConn"} {
		if sampled, ok := found[kind]; !ok || !sampled {
			t.Errorf("connection %s: present %v, TCP socket found %v", kind, ok, sampled)
		}
	}

	// A connection over a pipe has no TCP socket.
	pipeClient(t, ts.s, true)
	ts.waitMetric(`derp_tcp_rtt{le="non-tcp"}`, func(v float64) bool { return v == 1 })
	if v := ts.metric(`derp_tcp_rtt{le="error"}`); v != 0 {
		t.Fatalf("%v sampling errors", v)
	}
}

// TestRTTSamplingOff: a negative interval samples nothing and starts no
// timer.
func TestRTTSamplingOff(t *testing.T) {
	ts := newTestServer(t, Options{RTTSampleInterval: -1, Metrics: metrics.NewRegistry()})
	newClient(t, ts.addr, clientOpts{})
	ts.s.connsMu.Lock()
	timer := ts.s.rttTimer
	ts.s.connsMu.Unlock()
	if timer != nil {
		t.Fatal("sampling timer started although sampling is off")
	}
}
