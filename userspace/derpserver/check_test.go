package derpserver

import (
	"strings"
	"testing"
)

func TestConsistencyCheck(t *testing.T) {
	ts := newTestServer(t, Options{})
	check := func(when string) {
		t.Helper()
		if err := ts.s.ConsistencyCheck(); err != nil {
			t.Fatalf("%s: %v", when, err)
		}
	}
	check("empty")
	b := newClient(t, ts.addr, clientOpts{})
	a1 := newClient(t, ts.addr, clientOpts{})
	a2 := newClient(t, ts.addr, clientOpts{priv: a1.priv})
	ts.waitMetric("derp_current_dup_client_conns", func(v float64) bool { return v == 2 })
	check("duplicate key")
	a1.send(b.pub, []byte("a1 speaks"))
	b.recvPacket()
	a1.barrier()
	check("older duplicate active")
	a2.close()
	ts.waitMetric("derp_current_dup_client_keys", func(v float64) bool { return v == 0 })
	check("duplicate gone")

	// Break the books the way a missed decrement would.
	ts.s.m.curConns.Add(1)
	ts.s.m.dupKeys.Add(1)
	err := ts.s.ConsistencyCheck()
	if err == nil {
		t.Fatal("a gauge off by one passed")
	}
	for _, want := range []string{"derp_current_connections = 3, the registry holds 2", "derp_current_dup_client_keys = 1, the registry holds 0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
	ts.s.m.curConns.Add(-1)
	ts.s.m.dupKeys.Add(-1)

	ts.s.mu.Lock()
	e := ts.s.keys[b.pub]
	e.active.Store(nil)
	ts.s.mu.Unlock()
	if err := ts.s.ConsistencyCheck(); err == nil || !strings.Contains(err.Error(), "selected connection is not its most recently active") {
		t.Errorf("a key with no selected connection: %v", err)
	}
	ts.s.mu.Lock()
	e.active.Store(e.conns[len(e.conns)-1])
	ts.s.mu.Unlock()
	check("repaired")
}
