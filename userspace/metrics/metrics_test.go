package metrics

import (
	"runtime"
	"strconv"
	"strings"
	"testing"
)

func TestWriteText(t *testing.T) {
	r := NewRegistry()
	c := r.Counter("derp_accepts", "Accepted connections.")
	c.Add(3)
	g := r.Gauge("derp_current_connections", "Current connections.")
	g.Set(2)
	v := r.CounterVec("derp_packets_dropped", "Dropped packets.", "reason", "kind")
	v.With("unknown_dest", "other").Inc()
	v.With("queue_full", "disco").Add(5)
	r.CounterVec("xderp_unused_total", "Never touched.", "x")
	r.GaugeFunc("xderp_answer", "Help with \\ and\nnewline.", func() float64 { return 0.5 })
	var sb strings.Builder
	if err := r.WriteText(&sb); err != nil {
		t.Fatal(err)
	}
	want := `# HELP derp_accepts Accepted connections.
# TYPE derp_accepts counter
derp_accepts 3
# HELP derp_current_connections Current connections.
# TYPE derp_current_connections gauge
derp_current_connections 2
# HELP derp_packets_dropped Dropped packets.
# TYPE derp_packets_dropped counter
derp_packets_dropped{reason="queue_full",kind="disco"} 5
derp_packets_dropped{reason="unknown_dest",kind="other"} 1
# HELP xderp_answer Help with \\ and\nnewline.
# TYPE xderp_answer gauge
xderp_answer 0.5
`
	if sb.String() != want {
		t.Fatalf("got:\n%s\nwant:\n%s", sb.String(), want)
	}
}

func TestLabelEscaping(t *testing.T) {
	r := NewRegistry()
	r.CounterVec("x_total", "x", "l").With("a\"b\\c\nd").Inc()
	var sb strings.Builder
	r.WriteText(&sb)
	if !strings.Contains(sb.String(), `x_total{l="a\"b\\c\nd"} 1`) {
		t.Fatalf("bad escaping:\n%s", sb.String())
	}
}

func TestRegisterRejectsBadNames(t *testing.T) {
	for _, name := range []string{"", "1abc", "a-b", "a b"} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("name %q accepted", name)
				}
			}()
			NewRegistry().Counter(name, "")
		}()
	}
	r := NewRegistry()
	r.Counter("dup", "")
	defer func() {
		if recover() == nil {
			t.Error("duplicate accepted")
		}
	}()
	r.Counter("dup", "")
}

func TestHistogram(t *testing.T) {
	r := NewRegistry()
	h := r.Histogram("derp_buffered_write_frames", "Frames per flush.", 1, 2, 5)
	for _, v := range []uint64{2, 3, 5, 6, 40} {
		h.Observe(v)
	}
	h.ObserveN(1, 2)
	var sb strings.Builder
	if err := r.WriteText(&sb); err != nil {
		t.Fatal(err)
	}
	// Cumulative buckets in ascending order, +Inf last, then sum and count.
	want := `# HELP derp_buffered_write_frames Frames per flush.
# TYPE derp_buffered_write_frames histogram
derp_buffered_write_frames_bucket{le="1"} 2
derp_buffered_write_frames_bucket{le="2"} 3
derp_buffered_write_frames_bucket{le="5"} 5
derp_buffered_write_frames_bucket{le="+Inf"} 7
derp_buffered_write_frames_sum 58
derp_buffered_write_frames_count 7
`
	if sb.String() != want {
		t.Fatalf("got:\n%s\nwant:\n%s", sb.String(), want)
	}
}

func TestHistogramRejectsUnorderedBounds(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("bounds 2, 1 accepted")
		}
	}()
	NewRegistry().Histogram("x", "", 2, 1)
}

func TestRegisterGo(t *testing.T) {
	r := NewRegistry()
	r.RegisterGo()
	runtime.GC()
	var sb strings.Builder
	if err := r.WriteText(&sb); err != nil {
		t.Fatal(err)
	}
	page := sb.String()
	value := func(line string) float64 {
		for l := range strings.SplitSeq(page, "\n") {
			if rest, ok := strings.CutPrefix(l, line+" "); ok {
				v, err := strconv.ParseFloat(rest, 64)
				if err != nil {
					t.Fatalf("%s: %v", l, err)
				}
				return v
			}
		}
		t.Fatalf("no line %s in\n%s", line, page)
		return 0
	}
	if value(`go_info{version="`+runtime.Version()+`"}`) != 1 {
		t.Error("go_info")
	}
	if value("go_gc_duration_seconds_count") < 1 || value(`go_gc_duration_seconds{quantile="1"}`) < value(`go_gc_duration_seconds{quantile="0"}`) {
		t.Error("go_gc_duration_seconds after a GC")
	}
	if !strings.Contains(page, "# TYPE go_gc_duration_seconds summary\n") {
		t.Error("go_gc_duration_seconds is not a summary")
	}
	if v := value("go_memstats_heap_inuse_bytes"); v <= 0 || v > value("go_memstats_heap_sys_bytes") {
		t.Errorf("heap in use %v of %v", v, value("go_memstats_heap_sys_bytes"))
	}
	if value("go_memstats_mallocs_total") < value("go_memstats_frees_total") || value("go_threads") < 1 ||
		value("go_sched_gomaxprocs_threads") != float64(runtime.GOMAXPROCS(0)) || value("go_gc_gogc_percent") <= 0 {
		t.Error("runtime figures implausible")
	}
}
