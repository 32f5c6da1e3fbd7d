package lograte

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	l := New(2, time.Second)
	t0 := time.Unix(1000, 0)
	for i, want := range []bool{true, true, false, false} {
		if ok, _ := l.Allow(t0); ok != want {
			t.Fatalf("line %d at once: %v, want %v", i, ok, want)
		}
	}
	// A second later one token is back, and the line says two were left out.
	ok, suppressed := l.Allow(t0.Add(time.Second))
	if !ok || suppressed != 2 {
		t.Fatalf("after an interval: %v, %d suppressed; want true, 2", ok, suppressed)
	}
	if ok, _ := l.Allow(t0.Add(time.Second)); ok {
		t.Fatal("a second line in the same instant passed")
	}
	// A long pause refills only up to the burst.
	later := t0.Add(time.Hour)
	for i, want := range []bool{true, true, false} {
		if ok, _ := l.Allow(later); ok != want {
			t.Fatalf("line %d after a pause: %v, want %v", i, ok, want)
		}
	}
	if got := Attrs(3, "k", "v"); len(got) != 4 || got[2] != "suppressed" || got[3] != uint64(3) {
		t.Errorf("Attrs(3) = %v", got)
	}
	if got := Attrs(0, "k", "v"); len(got) != 2 {
		t.Errorf("Attrs(0) = %v", got)
	}
}
