// Package metrics owns xderp's counters, gauges and labelled families and
// writes them in the Prometheus text exposition format (version 0.0.4).
//
// It is deliberately small: atomic counters that cost one atomic add on the hot
// path, label sets fixed at registration or looked up once per connection, and
// collector callbacks for values that live elsewhere (BPF maps, queue lengths)
// and are read only at scrape time.
package metrics

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Counter is a monotonically increasing value. The zero value is ready to use.
type Counter struct{ v atomic.Uint64 }

// Inc adds one.
func (c *Counter) Inc() { c.v.Add(1) }

// Add adds n.
func (c *Counter) Add(n uint64) { c.v.Add(n) }

// Value returns the current count.
func (c *Counter) Value() uint64 { return c.v.Load() }

// Gauge is a value that goes up and down. The zero value is ready to use.
type Gauge struct{ v atomic.Int64 }

// Set stores n.
func (g *Gauge) Set(n int64) { g.v.Store(n) }

// Add adds n (which may be negative).
func (g *Gauge) Add(n int64) { g.v.Add(n) }

// Value returns the current value.
func (g *Gauge) Value() int64 { return g.v.Load() }

// Kind is a Prometheus metric type.
type Kind string

// Metric types used in TYPE lines.
const (
	KindCounter Kind = "counter"
	KindGauge   Kind = "gauge"
	KindUntyped Kind = "untyped"
	// KindHistogram families are written as Prometheus histograms:
	// cumulative name_bucket{le} lines, then name_sum and name_count.
	KindHistogram Kind = "histogram"
)

// Sample is one line of a family: label values (in the family's label order)
// and a value. Suffix is appended to the family's name (a histogram's
// "_bucket", "_sum" and "_count" lines); a sample with fewer label values
// than the family has labels is written with only those.
type Sample struct {
	Suffix string
	Labels []string
	Value  float64
}

// Histogram counts integer observations (frames per write, say) in fixed
// buckets. Observe costs two atomic adds; the buckets are made cumulative
// only when scraped.
type Histogram struct {
	bounds []uint64
	counts []atomic.Uint64 // counts[i]: observations in (bounds[i-1], bounds[i]]; the last is above every bound
	sum    atomic.Uint64
}

// Observe records one observation of v.
func (h *Histogram) Observe(v uint64) { h.ObserveN(v, 1) }

// ObserveN records n observations of v.
func (h *Histogram) ObserveN(v, n uint64) {
	i := 0
	for i < len(h.bounds) && v > h.bounds[i] {
		i++
	}
	h.counts[i].Add(n)
	h.sum.Add(v * n)
}

func (h *Histogram) samples() []Sample {
	out := make([]Sample, 0, len(h.bounds)+3)
	var cum uint64
	for i := range h.counts {
		cum += h.counts[i].Load()
		le := "+Inf"
		if i < len(h.bounds) {
			le = strconv.FormatUint(h.bounds[i], 10)
		}
		out = append(out, Sample{Suffix: "_bucket", Labels: []string{le}, Value: float64(cum)})
	}
	// The sum is read after the buckets, so a concurrent Observe can make
	// it run ahead of them by a little; the count is the +Inf bucket.
	return append(out,
		Sample{Suffix: "_sum", Value: float64(h.sum.Load())},
		Sample{Suffix: "_count", Value: float64(cum)})
}

// Vec is a labelled family of counters or gauges created on first use of a
// label combination. Look a child up once and keep the pointer on hot paths.
type Vec[T any] struct {
	mu       sync.RWMutex
	children map[string]*vecChild[T]
}

type vecChild[T any] struct {
	labels []string
	m      T
}

// With returns the child for the given label values, creating it if needed.
func (v *Vec[T]) With(values ...string) *T {
	key := strings.Join(values, "\xff")
	v.mu.RLock()
	c := v.children[key]
	v.mu.RUnlock()
	if c != nil {
		return &c.m
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if c = v.children[key]; c == nil {
		if v.children == nil {
			v.children = make(map[string]*vecChild[T])
		}
		c = &vecChild[T]{labels: append([]string(nil), values...)}
		v.children[key] = c
	}
	return &c.m
}

func (v *Vec[T]) snapshot(val func(*T) float64) []Sample {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]Sample, 0, len(v.children))
	for _, c := range v.children {
		out = append(out, Sample{Labels: c.labels, Value: val(&c.m)})
	}
	return out
}

// CounterVec is a labelled counter family.
type CounterVec = Vec[Counter]

// GaugeVec is a labelled gauge family.
type GaugeVec = Vec[Gauge]

type family struct {
	name, help string
	kind       Kind
	labels     []string
	collect    func() []Sample
}

// Registry holds metric families in registration order. It is safe for
// concurrent use; registration normally happens at start-up.
type Registry struct {
	mu       sync.Mutex
	families []*family
	names    map[string]bool
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{names: make(map[string]bool)} }

// Register adds a family whose samples are produced by collect at scrape time.
// It panics on a duplicate or invalid name: that is a programming error.
func (r *Registry) Register(name, help string, kind Kind, labels []string, collect func() []Sample) {
	if !validName(name) {
		panic("metrics: invalid metric name " + strconv.Quote(name))
	}
	for _, l := range labels {
		if !validName(l) || strings.HasPrefix(l, "__") {
			panic("metrics: invalid label name " + strconv.Quote(l))
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.names[name] {
		panic("metrics: duplicate metric " + name)
	}
	r.names[name] = true
	r.families = append(r.families, &family{name: name, help: help, kind: kind, labels: labels, collect: collect})
}

// Counter registers and returns a counter.
func (r *Registry) Counter(name, help string) *Counter {
	c := new(Counter)
	r.Register(name, help, KindCounter, nil, func() []Sample { return []Sample{{Value: float64(c.Value())}} })
	return c
}

// Gauge registers and returns a gauge.
func (r *Registry) Gauge(name, help string) *Gauge {
	g := new(Gauge)
	r.Register(name, help, KindGauge, nil, func() []Sample { return []Sample{{Value: float64(g.Value())}} })
	return g
}

// CounterVec registers and returns a labelled counter family.
func (r *Registry) CounterVec(name, help string, labels ...string) *CounterVec {
	v := new(CounterVec)
	r.Register(name, help, KindCounter, labels, func() []Sample {
		return v.snapshot(func(c *Counter) float64 { return float64(c.Value()) })
	})
	return v
}

// GaugeVec registers and returns a labelled gauge family.
func (r *Registry) GaugeVec(name, help string, labels ...string) *GaugeVec {
	v := new(GaugeVec)
	r.Register(name, help, KindGauge, labels, func() []Sample {
		return v.snapshot(func(g *Gauge) float64 { return float64(g.Value()) })
	})
	return v
}

// Histogram registers and returns a histogram with the given upper bucket
// bounds (ascending; +Inf is added).
func (r *Registry) Histogram(name, help string, bounds ...uint64) *Histogram {
	for i := 1; i < len(bounds); i++ {
		if bounds[i] <= bounds[i-1] {
			panic("metrics: histogram " + name + ": bounds not ascending")
		}
	}
	h := &Histogram{bounds: append([]uint64(nil), bounds...), counts: make([]atomic.Uint64, len(bounds)+1)}
	r.Register(name, help, KindHistogram, []string{"le"}, h.samples)
	return h
}

// CounterFunc registers a counter whose value is read by f at scrape time.
func (r *Registry) CounterFunc(name, help string, f func() float64) {
	r.Register(name, help, KindCounter, nil, func() []Sample { return []Sample{{Value: f()}} })
}

// GaugeFunc registers a gauge whose value is read by f at scrape time.
func (r *Registry) GaugeFunc(name, help string, f func() float64) {
	r.Register(name, help, KindGauge, nil, func() []Sample { return []Sample{{Value: f()}} })
}

// WriteText writes every family in the Prometheus text format. Samples within
// a family are sorted by label values so the output is stable.
func (r *Registry) WriteText(w io.Writer) error {
	r.mu.Lock()
	fams := append([]*family(nil), r.families...)
	r.mu.Unlock()
	bw := bufio.NewWriter(w)
	for _, f := range fams {
		samples := f.collect()
		if len(samples) == 0 && len(f.labels) > 0 {
			continue // a labelled family with no children yet has nothing to say
		}
		if f.kind != KindHistogram && f.kind != KindSummary { // their lines are already in order
			sort.Slice(samples, func(i, j int) bool { return lessLabels(samples[i].Labels, samples[j].Labels) })
		}
		fmt.Fprintf(bw, "# HELP %s %s\n# TYPE %s %s\n", f.name, escapeHelp(f.help), f.name, f.kind)
		for _, s := range samples {
			bw.WriteString(f.name)
			bw.WriteString(s.Suffix)
			if n := min(len(f.labels), len(s.Labels)); n > 0 {
				bw.WriteByte('{')
				for i, l := range f.labels[:n] {
					if i > 0 {
						bw.WriteByte(',')
					}
					bw.WriteString(l)
					bw.WriteString(`="`)
					bw.WriteString(escapeLabel(s.Labels[i]))
					bw.WriteByte('"')
				}
				bw.WriteByte('}')
			}
			bw.WriteByte(' ')
			bw.WriteString(formatValue(s.Value))
			bw.WriteByte('\n')
		}
	}
	return bw.Flush()
}

func lessLabels(a, b []string) bool {
	for i := 0; i < len(a) && i < len(b); i++ {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return len(a) < len(b)
}

func formatValue(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	case v == math.Trunc(v) && math.Abs(v) < 1e15:
		return strconv.FormatInt(int64(v), 10)
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

var helpEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
var labelEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)

func escapeHelp(s string) string  { return helpEscaper.Replace(s) }
func escapeLabel(s string) string { return labelEscaper.Replace(s) }

func validName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		switch {
		case c == '_' || c == ':' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'):
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// FamilyInfo describes a registered family (for documentation and tests).
type FamilyInfo struct {
	Name, Help string
	Kind       Kind
	Labels     []string
}

// Families lists the registered families in registration order.
func (r *Registry) Families() []FamilyInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]FamilyInfo, len(r.families))
	for i, f := range r.families {
		out[i] = FamilyInfo{Name: f.name, Help: f.help, Kind: f.kind, Labels: append([]string(nil), f.labels...)}
	}
	return out
}
