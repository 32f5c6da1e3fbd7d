package interop

// Three xderpd processes meshed through the daemon's own flags
// (-mesh-psk-file, -mesh-with with plain-HTTP URLs, the node itself
// included as derper operators do): Tailscale derphttp clients homed on
// different nodes reach each other both ways, byte-exact and in order, and a
// killed node's clients are reported gone to the survivors.

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/xderp/xderp/interop/internal/target"
)

func TestDaemonMeshThreeNodes(t *testing.T) {
	if kind != target.Xderpd {
		t.Skip("drives xderpd's -mesh-with flags")
	}
	nodes := startMeshedDaemons(t, 3)
	client := func(i int) *regionClient {
		return dialRegion(t, &regionNode{name: "node" + strconv.Itoa(i), addr: nodes[i].HostPort()}, key.NewNode())
	}
	a, b, c := client(0), client(1), client(2)
	// Every node must have learned every remote client before the checks
	// below mean anything: reach each pair both ways.
	for _, p := range [][2]*regionClient{{a, b}, {b, a}, {a, c}, {c, a}, {b, c}, {c, b}} {
		reach(t, p[0], p[1], 15*time.Second)
	}
	exchange(t, a, b, 200)
	exchange(t, b, a, 200)
	exchange(t, c, b, 200)

	// Kill node 2: its client c leaves the region, and a (which received
	// from c) is told c is gone; a and b keep talking.
	nodes[2].Kill()
	defer func() {
		if t.Failed() {
			t.Log(nodes[0].LogTail())
		}
	}()
	waitGone(t, a, c.pub, 15*time.Second)
	exchange(t, a, b, 100)
}

// startMeshedDaemons runs n xderpd processes on loopback that mesh with each
// other (one pre-shared key, every node named in -mesh-with).
func startMeshedDaemons(t *testing.T, n int) []*target.Server {
	t.Helper()
	dir := t.TempDir()
	psk := filepath.Join(dir, "mesh.key")
	if err := os.WriteFile(psk, []byte(strings.Repeat("5a", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Pick the ports first so every node can name all of them.
	ports := make([]int, n)
	var urls []string
	for i := range ports {
		p, _, err := target.FreePort("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = p
		urls = append(urls, "http://"+net.JoinHostPort("127.0.0.1", strconv.Itoa(p))+"/derp")
	}
	nodes := make([]*target.Server, n)
	for i := range nodes {
		sdir := filepath.Join(dir, strconv.Itoa(i))
		os.MkdirAll(sdir, 0o700)
		s, err := target.Start(kind, binPath, target.Options{Dir: sdir, Port: ports[i],
			ExtraArgs: []string{"-mesh-psk-file", psk, "-mesh-with", strings.Join(urls, ",")}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Stop(5 * time.Second) })
		nodes[i] = s
	}
	return nodes
}
