package metrics

import (
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"sync"
	"time"
)

// KindSummary families are written as Prometheus summaries: name{quantile}
// lines, then name_sum and name_count.
const KindSummary Kind = "summary"

// RegisterGo registers the Go runtime's figures under the names and types
// of the Prometheus Go client's collector (go_memstats_*, go_gc_*,
// go_threads, ...), which derper exports and Go dashboards chart. The
// memory statistics are read once per scrape (runtime.ReadMemStats, reused
// for a second).
func (r *Registry) RegisterGo() {
	var (
		mu sync.Mutex
		ms runtime.MemStats
		at time.Time
	)
	snap := func() runtime.MemStats {
		mu.Lock()
		defer mu.Unlock()
		if time.Since(at) > time.Second {
			runtime.ReadMemStats(&ms)
			at = time.Now()
		}
		return ms
	}
	gauge := func(name, help string, f func(*runtime.MemStats) uint64) {
		r.GaugeFunc(name, help, func() float64 { m := snap(); return float64(f(&m)) })
	}
	counter := func(name, help string, f func(*runtime.MemStats) uint64) {
		r.CounterFunc(name, help, func() float64 { m := snap(); return float64(f(&m)) })
	}

	r.GaugeFunc("go_goroutines", "Number of goroutines that currently exist.", func() float64 { return float64(runtime.NumGoroutine()) })
	r.GaugeFunc("go_threads", "Number of OS threads created.", func() float64 { n, _ := runtime.ThreadCreateProfile(nil); return float64(n) })
	r.Register("go_info", "Information about the Go environment.", KindGauge, []string{"version"}, func() []Sample {
		return []Sample{{Labels: []string{runtime.Version()}, Value: 1}}
	})
	r.GaugeFunc("go_sched_gomaxprocs_threads", "The current runtime.GOMAXPROCS setting.", func() float64 { return float64(runtime.GOMAXPROCS(0)) })
	r.GaugeFunc("go_gc_gogc_percent", "Heap size target percentage configured by the user (GOGC), otherwise 100.", func() float64 { return readRuntimeMetric("/gc/gogc:percent") })
	r.GaugeFunc("go_gc_gomemlimit_bytes", "Go runtime memory limit configured by the user (GOMEMLIMIT), otherwise math.MaxInt64.", func() float64 { return readRuntimeMetric("/gc/gomemlimit:bytes") })
	r.Register("go_gc_duration_seconds", "A summary of the wall-time pause (stop-the-world) duration in garbage collection cycles.", KindSummary, []string{"quantile"}, func() []Sample {
		st := debug.GCStats{PauseQuantiles: make([]time.Duration, 5)}
		debug.ReadGCStats(&st)
		out := make([]Sample, 0, 7)
		for i, q := range []string{"0", "0.25", "0.5", "0.75", "1"} {
			out = append(out, Sample{Labels: []string{q}, Value: st.PauseQuantiles[i].Seconds()})
		}
		return append(out, Sample{Suffix: "_sum", Value: st.PauseTotal.Seconds()}, Sample{Suffix: "_count", Value: float64(st.NumGC)})
	})

	gauge("go_memstats_alloc_bytes", "Number of bytes allocated in heap and currently in use.", func(m *runtime.MemStats) uint64 { return m.Alloc })
	counter("go_memstats_alloc_bytes_total", "Total number of bytes allocated in heap until now, even if released already.", func(m *runtime.MemStats) uint64 { return m.TotalAlloc })
	counter("go_memstats_mallocs_total", "Total number of heap objects allocated.", func(m *runtime.MemStats) uint64 { return m.Mallocs })
	counter("go_memstats_frees_total", "Total number of heap objects frees.", func(m *runtime.MemStats) uint64 { return m.Frees })
	gauge("go_memstats_sys_bytes", "Number of bytes obtained from system.", func(m *runtime.MemStats) uint64 { return m.Sys })
	gauge("go_memstats_heap_alloc_bytes", "Number of heap bytes allocated and currently in use.", func(m *runtime.MemStats) uint64 { return m.HeapAlloc })
	gauge("go_memstats_heap_sys_bytes", "Number of heap bytes obtained from system.", func(m *runtime.MemStats) uint64 { return m.HeapSys })
	gauge("go_memstats_heap_idle_bytes", "Number of heap bytes waiting to be used.", func(m *runtime.MemStats) uint64 { return m.HeapIdle })
	gauge("go_memstats_heap_inuse_bytes", "Number of heap bytes that are in use.", func(m *runtime.MemStats) uint64 { return m.HeapInuse })
	gauge("go_memstats_heap_released_bytes", "Number of heap bytes released to OS.", func(m *runtime.MemStats) uint64 { return m.HeapReleased })
	gauge("go_memstats_heap_objects", "Number of currently allocated objects.", func(m *runtime.MemStats) uint64 { return m.HeapObjects })
	gauge("go_memstats_stack_inuse_bytes", "Number of bytes obtained from system for stack allocator in non-CGO environments.", func(m *runtime.MemStats) uint64 { return m.StackInuse })
	gauge("go_memstats_stack_sys_bytes", "Number of bytes obtained from system for stack allocator.", func(m *runtime.MemStats) uint64 { return m.StackSys })
	gauge("go_memstats_mspan_inuse_bytes", "Number of bytes in use by mspan structures.", func(m *runtime.MemStats) uint64 { return m.MSpanInuse })
	gauge("go_memstats_mspan_sys_bytes", "Number of bytes used for mspan structures obtained from system.", func(m *runtime.MemStats) uint64 { return m.MSpanSys })
	gauge("go_memstats_mcache_inuse_bytes", "Number of bytes in use by mcache structures.", func(m *runtime.MemStats) uint64 { return m.MCacheInuse })
	gauge("go_memstats_mcache_sys_bytes", "Number of bytes used for mcache structures obtained from system.", func(m *runtime.MemStats) uint64 { return m.MCacheSys })
	gauge("go_memstats_buck_hash_sys_bytes", "Number of bytes used by the profiling bucket hash table.", func(m *runtime.MemStats) uint64 { return m.BuckHashSys })
	gauge("go_memstats_gc_sys_bytes", "Number of bytes used for garbage collection system metadata.", func(m *runtime.MemStats) uint64 { return m.GCSys })
	gauge("go_memstats_other_sys_bytes", "Number of bytes used for other system allocations.", func(m *runtime.MemStats) uint64 { return m.OtherSys })
	gauge("go_memstats_next_gc_bytes", "Number of heap bytes when next garbage collection will take place.", func(m *runtime.MemStats) uint64 { return m.NextGC })
	r.GaugeFunc("go_memstats_last_gc_time_seconds", "Number of seconds since 1970 of last garbage collection.", func() float64 { m := snap(); return float64(m.LastGC) / 1e9 })
}

// readRuntimeMetric reads one runtime/metrics value as a float (0 if the
// runtime does not have it).
func readRuntimeMetric(name string) float64 {
	s := []rtmetrics.Sample{{Name: name}}
	rtmetrics.Read(s)
	switch s[0].Value.Kind() {
	case rtmetrics.KindUint64:
		return float64(s[0].Value.Uint64())
	case rtmetrics.KindFloat64:
		return s[0].Value.Float64()
	}
	return 0
}
