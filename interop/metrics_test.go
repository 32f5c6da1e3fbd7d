package interop

import (
	"context"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/xderp/xderp/interop/internal/target"
)

// fetchMetrics GETs path from the shared server and parses it with the
// Prometheus text parser.
func fetchMetrics(t *testing.T, path string) map[string]*dto.MetricFamily {
	t.Helper()
	return fetchMetricsURL(t, http.DefaultClient, srv.HTTPURL()+path)
}

// fetchMetricsURL GETs url with c and parses the page with the Prometheus
// text parser.
func fetchMetricsURL(t *testing.T, c *http.Client, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s: %s", url, resp.Status, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("GET %s: Content-Type %q, want text/plain", url, ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("GET %s: Prometheus text parser: %v", url, err)
	}
	return fams
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	return 0
}

// sameSet reports whether a and b hold the same strings, in any order.
func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

func labels(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.Label {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// derperNames are metric names derper exposes with the same meaning that
// a dashboard built for derper reads.
var derperNames = map[string]dto.MetricType{
	"derp_current_connections":           dto.MetricType_GAUGE,
	"derp_current_home_connections":      dto.MetricType_GAUGE,
	"derp_clients_local":                 dto.MetricType_GAUGE,
	"derp_clients_total":                 dto.MetricType_GAUGE,
	"derp_current_dup_client_keys":       dto.MetricType_GAUGE,
	"derp_accepts":                       dto.MetricType_COUNTER,
	"derp_packets_received":              dto.MetricType_COUNTER,
	"derp_packets_sent":                  dto.MetricType_COUNTER,
	"derp_bytes_received":                dto.MetricType_COUNTER,
	"derp_bytes_sent":                    dto.MetricType_COUNTER,
	"derp_packets_dropped":               dto.MetricType_COUNTER,
	"derp_bytes_dropped":                 dto.MetricType_COUNTER,
	"derp_got_ping":                      dto.MetricType_COUNTER,
	"derp_sent_pong":                     dto.MetricType_COUNTER,
	"derp_peer_gone_disconnected_frames": dto.MetricType_COUNTER,
	"derp_peer_gone_not_here_frames":     dto.MetricType_COUNTER,
	"stun_requests":                      dto.MetricType_COUNTER,
	"derp_buffered_write_frames":         dto.MetricType_HISTOGRAM,
	"derp_mesh_update_batch_size":        dto.MetricType_HISTOGRAM,
	"derp_mesh_update_loop_count":        dto.MetricType_HISTOGRAM,
	// The standard process collector's, which derper exports too.
	"process_cpu_seconds_total":     dto.MetricType_COUNTER,
	"process_resident_memory_bytes": dto.MetricType_GAUGE,
	"process_open_fds":              dto.MetricType_GAUGE,
	"process_max_fds":               dto.MetricType_GAUGE,
	// And the Go collector's.
	"go_gc_duration_seconds":        dto.MetricType_SUMMARY,
	"go_goroutines":                 dto.MetricType_GAUGE,
	"go_threads":                    dto.MetricType_GAUGE,
	"go_memstats_heap_inuse_bytes":  dto.MetricType_GAUGE,
	"go_memstats_alloc_bytes_total": dto.MetricType_COUNTER,
	"go_memstats_sys_bytes":         dto.MetricType_GAUGE,
}

// derperBuckets are the upper bounds (without +Inf) of derper's histograms.
var derperBuckets = map[string][]float64{
	"derp_buffered_write_frames":  {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25, 50, 100},
	"derp_mesh_update_batch_size": {0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000},
	"derp_mesh_update_loop_count": {0, 1, 2, 5, 10, 20, 50, 100},
}

func TestMetrics(t *testing.T) {
	// Some traffic first, so counters have moved.
	a, b := newPeer(t, srv), newPeer(t, srv)
	syncPeers(t, a, b)
	stunRoundTrip(t, "127.0.0.1", srv.STUNAddr())

	paths := []string{"/debug/varz"}
	if kind != "reference" { // derper has no /metrics
		paths = append(paths, "/metrics")
	}
	for _, path := range paths {
		t.Run(strings.TrimPrefix(path, "/"), func(t *testing.T) {
			fams := fetchMetrics(t, path)
			for name, typ := range derperNames {
				f, ok := fams[name]
				if !ok {
					t.Errorf("missing derper metric %s", name)
					continue
				}
				if f.GetType() != typ {
					t.Errorf("%s: type %v, want %v", name, f.GetType(), typ)
				}
			}
			if f := fams["derp_current_connections"]; f != nil {
				if v := value(f.Metric[0]); v < 2 {
					t.Errorf("derp_current_connections = %v with two clients connected", v)
				}
			}
			// A process that has served traffic has used CPU and holds
			// its listeners' and clients' descriptors. (derper's process
			// collector counts CPU in 10 ms clock ticks, so a fresh derper
			// may still show 0.)
			if f := fams["process_cpu_seconds_total"]; f != nil && (value(f.Metric[0]) < 0 || kind != "reference" && value(f.Metric[0]) == 0) {
				t.Errorf("process_cpu_seconds_total = %v", value(f.Metric[0]))
			}
			if f, g := fams["process_open_fds"], fams["process_max_fds"]; f != nil && g != nil {
				if open, max := value(f.Metric[0]), value(g.Metric[0]); open < 4 || max < open {
					t.Errorf("process_open_fds = %v, process_max_fds = %v", open, max)
				}
			}
			if f := fams["derp_packets_received"]; f != nil {
				if v := value(f.Metric[0]); v < 2 {
					t.Errorf("derp_packets_received = %v after packets were relayed", v)
				}
			}
			if f := fams["derp_packets_dropped"]; f != nil {
				reasons := map[string]bool{}
				for _, m := range f.Metric {
					l := labels(m)
					if l["reason"] == "" || (l["kind"] != "disco" && l["kind"] != "other") {
						t.Errorf("derp_packets_dropped sample with labels %v, want reason and kind=disco|other", l)
					}
					reasons[l["reason"]] = true
				}
				for _, r := range []string{"unknown_dest", "queue_head", "gone_disconnected"} {
					if !reasons[r] {
						t.Errorf("derp_packets_dropped has no reason=%q (derper's reasons must all be present from the start)", r)
					}
				}
			}
			// Histograms have derper's buckets (checked against derper's
			// page too, which keeps these lists honest).
			for name, want := range derperBuckets {
				f := fams[name]
				if f == nil || f.GetType() != dto.MetricType_HISTOGRAM || len(f.Metric) == 0 {
					continue // reported above
				}
				var got []float64
				for _, b := range f.Metric[0].GetHistogram().GetBucket() {
					if ub := b.GetUpperBound(); !math.IsInf(ub, 1) {
						got = append(got, ub)
					}
				}
				if !slices.Equal(got, want) {
					t.Errorf("%s buckets %v, want %v", name, got, want)
				}
			}
			// derper's derp_tcp_rtt appears with its first sample (after
			// 10 s); xderpd has every bucket from the start.
			if f := fams["derp_tcp_rtt"]; kind != "reference" || f != nil {
				want := []string{"10ms", "20ms", "50ms", "100ms", "150ms", "250ms", "500ms", "inf", "non-tcp", "error"}
				switch {
				case f == nil:
					t.Errorf("missing derper metric derp_tcp_rtt")
				case f.GetType() != dto.MetricType_COUNTER:
					t.Errorf("derp_tcp_rtt: type %v, want counter", f.GetType())
				case kind != "reference":
					var got []string
					for _, m := range f.Metric {
						got = append(got, labels(m)["le"])
					}
					if !sameSet(got, want) {
						t.Errorf("derp_tcp_rtt buckets %v, want %v", got, want)
					}
				}
			}
			if f := fams["stun_requests"]; f != nil {
				ok := false
				for _, m := range f.Metric {
					if labels(m)["disposition"] == "success" && value(m) >= 1 {
						ok = true
					}
				}
				if !ok {
					t.Errorf("stun_requests{disposition=\"success\"} not counted after a STUN exchange")
				}
			}
		})
	}
}

// TestMetricsTrackConnections: the connection gauge follows clients coming
// and going.
func TestMetricsTrackConnections(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var peers []*peer
	for range 5 {
		peers = append(peers, newPeer(t, srv))
	}
	syncPeers(t, peers...) // all five are registered now
	// Connections closed by earlier tests may still be leaving, so only
	// the drop caused by our own five is asserted.
	with, err := srv.Metric(ctx, "derp_current_connections")
	if err != nil {
		t.Fatal(err)
	}
	if with < 5 {
		t.Fatalf("derp_current_connections = %v with five clients connected", with)
	}
	for _, p := range peers {
		p.c.Close()
	}
	waitMetric(t, ctx, "derp_current_connections", func(v float64) bool { return v <= with-5 })
}

func waitMetric(t *testing.T, ctx context.Context, name string, ok func(float64) bool) {
	t.Helper()
	waitMetricOf(t, ctx, srv, name, ok)
}

// waitMetricOf is waitMetric for a server of the test's own.
func waitMetricOf(t *testing.T, ctx context.Context, s *target.Server, name string, ok func(float64) bool) {
	t.Helper()
	var last float64
	var err error
	for {
		last, err = s.Metric(ctx, name)
		if err == nil && ok(last) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: condition not met (last value %v, err %v)", name, last, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TestNotePreferred: a client's NotePreferred(true) frame is accepted (the
// connection stays up) and counted in derp_current_home_connections; the
// gauge drops again when the client leaves.
func TestNotePreferred(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	p, q := newPeer(t, srv), newPeer(t, srv)
	syncPeers(t, p, q)
	p.c.NotePreferred(true)
	// Pings are handled in order after NotePreferred, so a pong means the
	// frame was read and the connection survived it.
	if err := p.c.Ping(ctx); err != nil {
		t.Fatalf("ping after NotePreferred: %v", err)
	}
	var home float64
	waitMetric(t, ctx, "derp_current_home_connections", func(v float64) bool { home = v; return v >= 1 })
	p.c.Close()
	waitMetric(t, ctx, "derp_current_home_connections", func(v float64) bool { return v <= home-1 })
}
