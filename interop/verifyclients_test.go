package interop

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
	"tailscale.com/client/local"
	"tailscale.com/envknob"
	"tailscale.com/ipn/store/mem"
	"tailscale.com/net/netns"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
)

// TestVerifyClients runs the relay the way -verify-clients is deployed: a
// tailscaled on the relay's own machine (here Tailscale's tsnet, a real
// tailscaled backend serving the real LocalAPI) is a node of a tailnet
// whose DERP map names the relay, and the relay asks it about every
// client. Two real Tailscale nodes of that tailnet, made to talk only
// through DERP, must reach each other through the relay; a stranger's key
// must be refused. Run against derper too.
func TestVerifyClients(t *testing.T) {
	// tsnet nodes stay on loopback: no policy routing, UDP off so that
	// everything between them crosses the relay, DERP over plain HTTP as
	// the target serves it.
	netns.SetEnabled(false)
	t.Cleanup(func() { netns.SetEnabled(true) })
	// No port-mapping probes (NAT-PMP, PCP, UPnP) to the machine's
	// gateway: the nodes talk only to loopback.
	for k, v := range map[string]string{"TS_DEBUG_ALWAYS_USE_DERP": "true", "TS_DEBUG_USE_DERP_HTTP": "true", "TS_DISABLE_PORTMAPPER": "true"} {
		old := os.Getenv(k)
		envknob.Setenv(k, v)
		t.Cleanup(func() { envknob.Setenv(k, old) })
	}

	// The relay's tailscaled socket: each connection is handed to the
	// relay node's LocalAPI once that node exists.
	sock := filepath.Join(t.TempDir(), "tailscaled.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	// relayLC is written once, before lcReady is closed.
	lcReady := make(chan struct{})
	var relayLC *local.Client
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				<-lcReady
				api, err := relayLC.Dial(context.Background(), "tcp", "local-tailscaled.sock:80")
				if err != nil {
					return
				}
				defer api.Close()
				go io.Copy(api, c)
				io.Copy(c, api)
			}()
		}
	}()

	s := startServer(t, target.Options{ExtraArgs: []string{"-verify-clients", "-socket", sock}})

	control := &testcontrol.Server{
		DERPMap: &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{
			900: {RegionID: 900, RegionCode: "xderp", RegionName: "relay under test", Nodes: []*tailcfg.DERPNode{{
				Name: "900a", RegionID: 900, HostName: s.Host, IPv4: s.Host, IPv6: "none",
				DERPPort: s.Port, STUNPort: s.STUNPort, InsecureForTests: true,
			}}},
		}},
		Logf: func(string, ...any) {},
	}
	control.HTTPTestServer = httptest.NewServer(control)
	t.Cleanup(control.HTTPTestServer.Close)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	node := func(name string) (*tsnet.Server, *local.Client) {
		n := &tsnet.Server{
			Dir:        filepath.Join(t.TempDir(), name),
			ControlURL: control.HTTPTestServer.URL,
			Hostname:   name,
			Store:      new(mem.Store),
			Ephemeral:  true,
			Logf:       func(string, ...any) {},
			UserLogf:   t.Logf,
		}
		t.Cleanup(func() { n.Close() })
		if _, err := n.Up(ctx); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		lc, err := n.LocalClient()
		if err != nil {
			t.Fatal(err)
		}
		return n, lc
	}
	_, lc := node("relay")
	relayLC = lc
	close(lcReady)
	_, peerLC := node("peer")

	// The peer pings the relay's node. With UDP off the disco ping and
	// its pong can only travel through the relay, so an answer proves
	// that the relay admitted both nodes after asking tailscaled.
	st, err := lc.StatusWithoutPeers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var lastErr error
	for ok := false; !ok; {
		if ctx.Err() != nil {
			t.Fatalf("no ping through the relay: %v\n%s", lastErr, s.LogTail())
		}
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		res, err := peerLC.Ping(pctx, st.TailscaleIPs[0], tailcfg.PingDisco)
		pcancel()
		switch {
		case err != nil:
			lastErr = err
		case res.Err != "":
			lastErr = errString(res.Err)
		case res.DERPRegionID != 900:
			t.Fatalf("pong came by %q/region %d, not through the relay", res.Endpoint, res.DERPRegionID)
		default:
			ok = true
		}
	}

	// A key the tailnet does not know is refused.
	stranger := newPeerKey(t, s, key.NewNode())
	if m, err := stranger.next(10*time.Second, skipControl); err == nil {
		t.Fatalf("stranger received %T", m)
	}
	// The consistency check, which with -verify-clients verifies the
	// relay machine's own key through tailscaled, passes.
	res, err := http.Get(s.HTTPURL() + "/debug/check")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Errorf("/debug/check: %s\n%s", res.Status, body)
	}
	if kind != "reference" {
		if !strings.Contains(string(body), "ok tailscaled\n") {
			t.Errorf("/debug/check does not report the tailscaled part:\n%s", body)
		}
		for result, atLeast := range map[string]float64{"allowed": 2, "denied": 1} {
			v, err := s.Metric(t.Context(), `xderp_admission_requests_total{via="tailscaled",result="`+result+`"}`)
			if err != nil || v < atLeast {
				t.Errorf("xderp_admission_requests_total{via=tailscaled,result=%q} = %v (%v), want at least %v", result, v, err, atLeast)
			}
		}
	}
}

type errString string

func (e errString) Error() string { return string(e) }
