package interop

import (
	"fmt"
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
	mk, err := key.ParseDERPMesh(regionMeshKey)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, a := range region.Nodes {
		for _, b := range region.Nodes {
			want = append(want, fmt.Sprintf("derp/mesh/%s/%s/mesh", a.Name, b.Name))
		}
	}
	runProber(t, dm, want, prober.WithMeshProbing(15*time.Second), prober.WithMeshKey(mk))
}
