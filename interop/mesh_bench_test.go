package interop

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/meshbench"
)

// BenchmarkMeshForward measures packets forwarded across a two-node region
// (16 senders on one node, their receivers on the other, 1200-byte
// packets) for xderp and for two meshed derpers under the same load, at
// several offered loads (packets/s over all senders; 0 = unthrottled). The
// loads above a relay's capacity are the overload cases: delivered
// throughput should stay near capacity, not collapse. Each sub-benchmark is
// one timed window; the figures are the reported metrics. Each node runs in
// its own process (internal/meshbench/meshnode), as in a real region; the
// load generator is this process.
//
//	XDERP_INTEROP_TARGET=derper go test -run '^$' -bench MeshForward -benchtime 1x .
func BenchmarkMeshForward(b *testing.B) {
	bin := filepath.Join(b.TempDir(), "meshnode")
	build := exec.Command("go", "build", "-o", bin, "./internal/meshbench/meshnode")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build meshnode: %v\n%s", err, out)
	}
	for _, rate := range []float64{50000, 100000, 200000, 400000, 0} {
		res := map[meshbench.Kind]meshbench.Result{}
		for _, kind := range []meshbench.Kind{meshbench.Xderp, meshbench.Derper} {
			name := fmt.Sprintf("%s/offered=%.0f", kind, rate)
			if rate == 0 {
				name = string(kind) + "/offered=max"
			}
			b.Run(name, func(b *testing.B) {
				var r meshbench.Result
				for range b.N {
					var err error
					r, err = meshbench.Run(context.Background(), meshbench.Options{Kind: kind, Pairs: 16, Rate: rate, Duration: 3 * time.Second, NodeBin: bin})
					if err != nil {
						b.Fatal(err)
					}
				}
				res[kind] = r
				b.ReportMetric(float64(r.Sent)/r.Duration.Seconds(), "sent-pkt/s")
				b.ReportMetric(r.PPS, "pkt/s")
				b.ReportMetric(r.Mbps, "Mbit/s")
				b.ReportMetric(100*r.Loss(), "loss%")
				b.Log(r)
				if r.Detail != "" {
					b.Log("\n" + r.Detail)
				}
			})
		}
		if x, d := res[meshbench.Xderp], res[meshbench.Derper]; d.PPS > 0 {
			b.Logf("offered %.0f: xderp/derper delivered ratio %.2f (target >= 2)", rate, x.PPS/d.PPS)
		}
	}
}
