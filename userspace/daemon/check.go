package daemon

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// /debug/check: derper's consistency check, answered 200 when every part
// holds and 500 otherwise, with one line per part, so a monitor can alert
// on the status code and a person can read why.
//
// The parts: the relay's registry agrees with itself and its gauges;
// with -verify-clients, this machine's own node key verifies through
// tailscaled (derper's two checks); with XDP, this daemon's program is still
// the one the interface runs (another daemon's replacement, or a removed
// interface, would otherwise go unnoticed while STUN falls back).

// checkTimeout bounds the whole check (tailscaled may be slow to answer).
const checkTimeout = 10 * time.Second

type checkResult struct {
	part string
	err  error
}

func (d *Daemon) consistencyCheck(ctx context.Context) []checkResult {
	var out []checkResult
	if d.derp != nil {
		out = append(out, checkResult{"derp", d.derp.ConsistencyCheck()})
	}
	if d.tailscaled != nil {
		out = append(out, checkResult{"tailscaled", d.tailscaled.check(ctx)})
	}
	if x := d.xdpNow(); x != nil {
		out = append(out, checkResult{"xdp", x.Check()})
	}
	return out
}

func (d *Daemon) serveCheck(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), checkTimeout)
	defer cancel()
	var b strings.Builder
	status := http.StatusOK
	for _, c := range d.consistencyCheck(ctx) {
		if c.err == nil {
			fmt.Fprintf(&b, "ok %s\n", c.part)
			continue
		}
		status = http.StatusInternalServerError
		// One line per problem: an error joining several keeps its lines.
		for _, line := range strings.Split(c.err.Error(), "\n") {
			fmt.Fprintf(&b, "FAIL %s: %s\n", c.part, line)
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if status == http.StatusOK {
		b.WriteString("consistency check okay\n")
	}
	w.Write([]byte(b.String()))
}
