package derpserver

import (
	"errors"
	"fmt"
	"slices"
)

// ConsistencyCheck cross-checks the registry against itself and against the
// connection gauges, as derper's /debug/check does: every key with local
// connections has one of them selected and the selected one last, no
// removed or empty entry is still registered, and derp_current_connections,
// derp_current_dup_client_keys and derp_current_dup_client_conns agree with
// the registered connections. It returns nil, or every problem found.
func (s *Server) ConsistencyCheck() error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var errs []error
	var localKeys, conns, dupKeys, dupConns int
	for k, e := range s.keys {
		if e.key != k {
			errs = append(errs, fmt.Errorf("key %s: registered under %s", e.key.ShortString(), k.ShortString()))
		}
		if e.dead.Load() {
			errs = append(errs, fmt.Errorf("key %s: removed entry still registered", k.ShortString()))
		}
		n := len(e.conns)
		active := e.active.Load()
		switch {
		case n == 0 && len(e.fwds) == 0:
			errs = append(errs, fmt.Errorf("key %s: registered with no connection and no forwarder", k.ShortString()))
		case n == 0 && active != nil:
			errs = append(errs, fmt.Errorf("key %s: a selected connection but none registered", k.ShortString()))
		case n > 0 && active != e.conns[n-1]:
			errs = append(errs, fmt.Errorf("key %s: selected connection is not its most recently active of %d", k.ShortString(), n))
		}
		for _, c := range e.conns {
			if c.entry != e || c.unregistered {
				errs = append(errs, fmt.Errorf("key %s: a connection that does not belong to the entry", k.ShortString()))
			}
		}
		if n > 0 {
			localKeys++
			conns += n
		}
		if n > 1 {
			dupKeys++
			dupConns += n
		}
	}
	if localKeys != s.numLocalKeys {
		errs = append(errs, fmt.Errorf("%d keys have local connections, the count says %d", localKeys, s.numLocalKeys))
	}
	for _, g := range []struct {
		name string
		got  int64
		want int
	}{
		{"derp_current_connections", s.m.curConns.Value(), conns},
		{"derp_current_dup_client_keys", s.m.dupKeys.Value(), dupKeys},
		{"derp_current_dup_client_conns", s.m.dupConns.Value(), dupConns},
	} {
		if g.got != int64(g.want) {
			errs = append(errs, fmt.Errorf("%s = %d, the registry holds %d", g.name, g.got, g.want))
		}
	}
	// Sorted, so two reads of the same state read the same.
	slices.SortFunc(errs, func(a, b error) int {
		switch {
		case a.Error() < b.Error():
			return -1
		case a.Error() > b.Error():
			return 1
		}
		return 0
	})
	return errors.Join(errs...)
}
