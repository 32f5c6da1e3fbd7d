package derpserver

import (
	"bufio"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// benchPair is two clients relaying through the server.
type benchPair struct{ a, b *testClient }

func benchPairs(b *testing.B, ts *testServer, n int) []benchPair {
	pairs := make([]benchPair, n)
	for i := range pairs {
		pairs[i] = benchPair{newClient(b, ts.addr, clientOpts{}), newClient(b, ts.addr, clientOpts{})}
	}
	return pairs
}

// BenchmarkRelayClosedLoop: 16 pairs, 1200-byte packets, 32 in flight per
// pair; b receives from a and echoes back, each echo lets a send again.
// Reports relayed packets per second (both directions count).
func BenchmarkRelayClosedLoop(b *testing.B) {
	const (
		npairs   = 16
		inFlight = 32
		size     = 1200
	)
	ts := newTestServer(b, Options{})
	pairs := benchPairs(b, ts, npairs)
	payload := make([]byte, size)
	var relayed atomic.Int64
	target := int64(b.N)
	var wg sync.WaitGroup
	b.SetBytes(size)
	b.ResetTimer()
	start := time.Now()
	for _, p := range pairs {
		wg.Add(2)
		// Echo side.
		go func() {
			defer wg.Done()
			br := bufio.NewReaderSize(p.b.conn, 64<<10)
			bw := bufio.NewWriterSize(p.b.conn, 64<<10)
			fr := derp.NewFrameReader(br, 0)
			var out []byte
			for {
				typ, pl, err := fr.ReadFrame()
				if err != nil {
					return
				}
				if typ != derp.FrameRecvPacket {
					continue
				}
				relayed.Add(1)
				out = derp.AppendSendPacket(out[:0], p.a.pub, pl[derp.KeyLen:])
				bw.Write(out)
				if br.Buffered() == 0 {
					if bw.Flush() != nil {
						return
					}
				}
			}
		}()
		// Sending side.
		go func() {
			defer wg.Done()
			br := bufio.NewReaderSize(p.a.conn, 64<<10)
			bw := bufio.NewWriterSize(p.a.conn, 64<<10)
			fr := derp.NewFrameReader(br, 0)
			frame := derp.AppendSendPacket(nil, p.b.pub, payload)
			for range inFlight {
				bw.Write(frame)
			}
			bw.Flush()
			for {
				typ, _, err := fr.ReadFrame()
				if err != nil {
					return
				}
				if typ != derp.FrameRecvPacket {
					continue
				}
				if relayed.Add(1) >= target {
					p.a.conn.Close()
					p.b.conn.Close()
					return
				}
				bw.Write(frame)
				if br.Buffered() == 0 {
					if bw.Flush() != nil {
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(relayed.Load())/elapsed.Seconds(), "pkts/s")
	b.ReportMetric(ts.metric("xderp_write_frames_total")/max(1, ts.metric("xderp_write_flushes_total")), "frames/flush")
}

// BenchmarkRelayOverload: 16 unthrottled senders, each to its own
// receiver. Reports delivered packets per second and the drop share.
func BenchmarkRelayOverload(b *testing.B) {
	const (
		npairs = 16
		size   = 1200
	)
	ts := newTestServer(b, Options{})
	pairs := benchPairs(b, ts, npairs)
	payload := make([]byte, size)
	var delivered atomic.Int64
	target := int64(b.N)
	done := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	b.SetBytes(size)
	b.ResetTimer()
	start := time.Now()
	for _, p := range pairs {
		wg.Add(2)
		go func() {
			defer wg.Done()
			br := bufio.NewReaderSize(p.b.conn, 64<<10)
			fr := derp.NewFrameReader(br, 0)
			for {
				typ, _, err := fr.ReadFrame()
				if err != nil {
					return
				}
				if typ == derp.FrameRecvPacket && delivered.Add(1) >= target {
					once.Do(func() { close(done) })
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			var burst []byte
			frame := derp.AppendSendPacket(nil, p.b.pub, payload)
			for range 32 {
				burst = append(burst, frame...)
			}
			deadline := time.Now().Add(30 * time.Second) // bounded in time
			for time.Now().Before(deadline) {
				select {
				case <-done:
					return
				default:
				}
				p.a.conn.SetWriteDeadline(time.Now().Add(time.Second))
				if _, err := p.a.conn.Write(burst); err != nil {
					if isTimeout(err) {
						continue
					}
					return
				}
			}
			once.Do(func() { close(done) })
		}()
	}
	<-done
	elapsed := time.Since(start)
	b.StopTimer()
	for _, p := range pairs {
		p.a.conn.Close()
		p.b.conn.Close()
	}
	wg.Wait()
	b.ReportMetric(float64(delivered.Load())/elapsed.Seconds(), "pkts/s")
	ts.waitMetric("derp_current_connections", func(v float64) bool { return v == 0 })
	recv := ts.metric("derp_packets_received")
	b.Logf("recv=%v sent=%v write_timeouts=%v closed_write=%v head=%v gone=%v werr=%v", recv, ts.metric("derp_packets_sent"),
		ts.metric("derp_sclient_write_timeouts"), ts.metric(`xderp_connections_closed_total{reason="write_error"}`),
		ts.metric(`derp_packets_dropped{reason="queue_head",kind="other"}`), ts.metric(`derp_packets_dropped{reason="gone_disconnected",kind="other"}`),
		ts.metric(`derp_packets_dropped{reason="write_error",kind="other"}`))
	if recv > 0 {
		b.ReportMetric(100*ts.metric(`derp_packets_dropped{reason="queue_head",kind="other"}`)/recv, "%dropped")
	}
}

func isTimeout(err error) bool {
	type timeout interface{ Timeout() bool }
	t, ok := err.(timeout)
	return ok && t.Timeout()
}

// BenchmarkIdleConnMemory reports heap bytes per idle established
// connection (server side only; the clients live in the same process, so
// their share is estimated separately and subtracted).
func BenchmarkIdleConnMemory(b *testing.B) {
	const n = 500
	ts := newTestServer(b, Options{})
	for range b.N {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		clients := make([]*testClient, n)
		for i := range clients {
			clients[i] = newClient(b, ts.addr, clientOpts{})
		}
		ts.waitMetric("derp_current_connections", func(v float64) bool { return v == n })
		// Idle server: wait for the writers to exit after their linger.
		deadline := time.Now().Add(defaultWriterLinger + 10*time.Second)
		for ts.metric("xderp_writers_active") != 0 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapInuse+after.StackInuse-before.HeapInuse-before.StackInuse)/n, "bytes/conn(client+server)")
		b.ReportMetric(float64(after.StackInuse-before.StackInuse)/n, "stack-bytes/conn")
		b.ReportMetric(float64(runtime.NumGoroutine())/n, "goroutines/conn")
		for _, c := range clients {
			c.close()
		}
		ts.waitMetric("derp_current_connections", func(v float64) bool { return v == 0 })
	}
}
