package daemon

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xderp/xderp/userspace/config"
)

// The README must document every flag and every metric the daemon has.
func readme(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestREADMEListsEveryFlag(t *testing.T) {
	doc := readme(t)
	var c config.Config
	config.NewFlagSet(&c, io.Discard).VisitAll(func(f *flag.Flag) {
		if !strings.Contains(doc, "`-"+f.Name+"`") {
			t.Errorf("README does not document flag -%s", f.Name)
		}
	})
}

func TestREADMEListsEveryMetric(t *testing.T) {
	doc := readme(t)
	cfg, err := config.Parse([]string{"-a", "127.0.0.1:0", "-xdp", "off", "-c", filepath.Join(t.TempDir(), "k")}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(cfg, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range d.Metrics().Families() {
		if !strings.Contains(doc, "`"+f.Name+"`") {
			t.Errorf("README does not document metric %s (%s)", f.Name, f.Help)
		}
	}
}
