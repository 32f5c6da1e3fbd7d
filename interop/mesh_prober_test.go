package interop

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"tailscale.com/prober"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// TestMeshProber runs Tailscale's prober mesh probe (derp/<region>/<from>/<to>/mesh:
// two prober clients with the mesh key, one on each node, exchange a
// packet) between every ordered pair of a mixed region: two xderp nodes
// and one derper node, all meshed with the same key. Each node sits behind
// a TLS front because the prober insists on TLS.
func TestMeshProber(t *testing.T) {
	x1 := newRegionNode(t, "x1", nodeXderp)
	x2 := newRegionNode(t, "x2", nodeXderp)
	d := newRegionNode(t, "d", nodeDerper)
	nodes := []*regionNode{x1, x2, d}
	fullMesh(nodes...)

	// Wait until the mesh has formed: a client on each node reaches a
	// client on every other node.
	var clients []*regionClient
	for _, n := range nodes {
		clients = append(clients, dialRegion(t, n, key.NewNode()))
	}
	for i, a := range clients {
		for j, b := range clients {
			if i != j {
				reach(t, a, b, 15*time.Second)
			}
		}
	}

	region := &tailcfg.DERPRegion{RegionID: 901, RegionCode: "mesh", RegionName: "xderp mesh interop"}
	for _, n := range nodes {
		front := tlsFront(t, n.addr)
		region.Nodes = append(region.Nodes, &tailcfg.DERPNode{
			Name:             "901" + n.name,
			RegionID:         901,
			HostName:         "localhost",
			IPv4:             "127.0.0.1",
			STUNPort:         -1,
			DERPPort:         front.Port,
			InsecureForTests: true,
		})
	}
	dm := &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{901: region}}
	mapPath := filepath.Join(t.TempDir(), "derpmap.json")
	js, err := json.Marshal(dm)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(mapPath, js, 0o644); err != nil {
		t.Fatal(err)
	}
	mk, err := key.ParseDERPMesh(regionMeshKey)
	if err != nil {
		t.Fatal(err)
	}

	p := prober.New().WithSpread(false).WithOnce(true).WithMetricNamespace("derpprobe")
	dp, err := prober.DERP(p, "file://"+mapPath, prober.WithMeshProbing(15*time.Second), prober.WithMeshKey(mk))
	if err != nil {
		t.Fatal(err)
	}
	p.Run("derpmap-probe", 15*time.Second, nil, dp.ProbeMap)
	waitDone := make(chan struct{})
	go func() { p.Wait(); close(waitDone) }()
	select {
	case <-waitDone:
	case <-time.After(60 * time.Second):
		t.Fatal("prober did not finish within 60s")
	}

	want := map[string]bool{}
	for _, a := range region.Nodes {
		for _, b := range region.Nodes {
			want[fmt.Sprintf("derp/mesh/%s/%s/mesh", a.Name, b.Name)] = false
		}
	}
	for name, info := range p.ProbeInfo() {
		if info.End.IsZero() {
			t.Errorf("probe %s did not finish", name)
			continue
		}
		if info.Status != prober.ProbeStatusSucceeded {
			t.Errorf("bad: %s: %s", name, info.Error)
			continue
		}
		t.Logf("good: %s: %v", name, info.Latency)
		if _, ok := want[name]; ok {
			want[name] = true
		}
	}
	for name, ok := range want {
		if !ok {
			t.Errorf("probe %s did not succeed", name)
		}
	}
}
