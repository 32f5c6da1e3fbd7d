package interop

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/prober"
	"tailscale.com/tailcfg"
)

// tlsFront terminates TLS on a loopback port and relays the bytes to the
// relay's plain-HTTP port. Tailscale's prober insists on TLS state for its
// mesh probe (it checks the server name of the connection); the relay's own
// TLS belongs to another part of the project, so the test supplies it.
func tlsFront(t *testing.T, backend string) *net.TCPAddr {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: priv}}}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				b, err := net.Dial("tcp", backend)
				if err != nil {
					return
				}
				defer b.Close()
				done := make(chan struct{}, 2)
				go func() { io.Copy(b, c); b.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
				go func() { io.Copy(c, b); done <- struct{}{} }()
				<-done
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr)
}

// TestProber runs Tailscale's prober the way `derpprobe -once` does, with a
// DERP map file that points at the relay: the map probe, the STUN probe, the
// single-node mesh probe (two prober clients exchange a packet; the first
// frame each sees must be ServerInfo) and a bandwidth probe (1 MB in
// packets of up to 64 KiB, ordered and byte-exact). The TLS certificate
// probe is left out: it checks the certificate, not the relay, and this
// relay's certificate comes from the front above.
func TestProber(t *testing.T) {
	front := tlsFront(t, srv.HostPort())
	dm := &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{
		900: {
			RegionID:   900,
			RegionCode: "interop",
			RegionName: "xderp interop",
			Nodes: []*tailcfg.DERPNode{{
				Name:             "900a",
				RegionID:         900,
				HostName:         "localhost",
				IPv4:             "127.0.0.1",
				IPv6:             "", // empty: no udp6 probe (the daemon listens on one IP; IPv6 STUN is TestSTUNIPv6)
				STUNPort:         srv.STUNPort,
				DERPPort:         front.Port,
				InsecureForTests: true,
			}},
		},
	}}
	runProber(t, dm, []string{
		"derpmap-probe",
		"derp/interop/900a/udp",
		"derp/interop/900a/900a/mesh",
		"derp/interop/900a/900a/bw",
	}, prober.WithMeshProbing(15*time.Second),
		prober.WithSTUNProbing(15*time.Second),
		prober.WithBandwidthProbing(15*time.Second, 1_000_000, ""))
	requireAlive(t)
}

// TestProberPlainHTTP runs the prober's plain-HTTP mode
// (TS_DEBUG_USE_DERP_HTTP, as against `derper -dev`) straight at the
// daemon's port: the map, STUN and bandwidth probes. The mesh probe is not
// included: it requires TLS state by design ("no TLS state").
func TestProberPlainHTTP(t *testing.T) {
	envknob.SetenvForTest(t, "TS_DEBUG_USE_DERP_HTTP", "true")
	dm := &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{
		901: {
			RegionID:   901,
			RegionCode: "plain",
			RegionName: "xderp interop, plain HTTP",
			Nodes: []*tailcfg.DERPNode{{
				Name:     "901a",
				RegionID: 901,
				HostName: "127.0.0.1",
				IPv4:     "127.0.0.1",
				STUNPort: srv.STUNPort,
				DERPPort: srv.Port,
			}},
		},
	}}
	runProber(t, dm, []string{
		"derpmap-probe",
		"derp/plain/901a/udp",
		"derp/plain/901a/901a/bw",
	}, prober.WithSTUNProbing(15*time.Second),
		prober.WithBandwidthProbing(15*time.Second, 1_000_000, ""))
	requireAlive(t)
}

// runProber writes dm to a file and runs one round of every probe the
// options enable, like `derpprobe -once -derp-map file://...`; every probe
// must succeed and every name in want must have run.
func runProber(t *testing.T, dm *tailcfg.DERPMap, wantNames []string, opts ...prober.DERPOpt) {
	t.Helper()
	mapPath := filepath.Join(t.TempDir(), "derpmap.json")
	js, err := json.Marshal(dm)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(mapPath, js, 0o644); err != nil {
		t.Fatal(err)
	}

	p := prober.New().WithSpread(false).WithOnce(true).WithMetricNamespace("derpprobe")
	dp, err := prober.DERP(p, "file://"+mapPath, opts...)
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
	for _, n := range wantNames {
		want[n] = false
	}
	var names []string
	for name, info := range p.ProbeInfo() {
		names = append(names, name)
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
	sort.Strings(names)
	for name, ok := range want {
		if !ok {
			t.Errorf("probe %s did not succeed (probes run: %s)", name, strings.Join(names, ", "))
		}
	}
}
