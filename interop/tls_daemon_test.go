package interop

// The daemon itself over TLS: xderpd with -certmode manual and an IP host
// name generates a self-signed certificate; -print-derpmap prints the node
// with its sha256-raw pin; Tailscale's derphttp clients connect with exactly
// that DERP map node and exchange packets (TLS 1.3 with fast start, and 1.2).

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/xderp/xderp/interop/internal/target"
)

func TestDaemonTLSPinnedSelfSigned(t *testing.T) {
	if kind != target.Xderpd {
		t.Skip("xderpd's own TLS front; the reference has no hot-reloadable manual mode")
	}
	node, args, out := startSelfSignedDaemon(t)

	a, aKey, err := certsDerpClient(t, node, nil)
	if err != nil {
		t.Fatalf("client with the printed pin: %v", err)
	}
	b, bKey, err := certsDerpClient(t, node, &tls.Config{MaxVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("TLS 1.2 client: %v", err)
	}
	if v := certsTlsState(t, a).Version; v != tls.VersionTLS13 {
		t.Errorf("a negotiated %s", tls.VersionName(v))
	}
	if v := certsTlsState(t, b).Version; v != tls.VersionTLS12 {
		t.Errorf("b negotiated %s", tls.VersionName(v))
	}
	if _, err := certsExchange(a, aKey, b, "1.3 to 1.2"); err != nil {
		t.Fatal(err)
	}
	if _, err := certsExchange(b, bKey, a, "1.2 to 1.3"); err != nil {
		t.Fatal(err)
	}
	// derper's TLS version metrics: both DERP connections are active, each
	// under its version, and their upgrades were counted as requests. (The
	// scrape itself is a TLS 1.3 request in progress.)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	fams := fetchMetricsURL(t, hc, "https://"+net.JoinHostPort(node.IPv4, strconv.Itoa(node.DERPPort))+"/metrics")
	for name, want := range map[string]map[string]float64{
		"derper_tls_active_version":  {"1.2": 1, "1.3": 2},
		"derper_tls_request_version": {"1.2": 1, "1.3": 2}, // 1.3: at least a's upgrade and this scrape
	} {
		f := fams[name]
		if f == nil {
			t.Errorf("missing derper metric %s", name)
			continue
		}
		got := map[string]float64{}
		for _, m := range f.Metric {
			got[labels(m)["version"]] = value(m)
		}
		exact := name == "derper_tls_active_version" // a gauge of what is open now; requests only add up
		for v, want := range want {
			if exact && got[v] != want || !exact && got[v] < want {
				t.Errorf("%s{version=%q} = %v, want %v (exact: %v)", name, v, got[v], want, exact)
			}
		}
	}
	// The certificate (and so the pin) survives a restart: the same node
	// is printed again.
	out2, err := exec.Command(binPath, append(args, "-print-derpmap")...).Output()
	if err != nil || string(out2) != string(out) {
		t.Errorf("DERP map changed across runs: %v\n%s\n%s", err, out, out2)
	}
}

// startSelfSignedDaemon runs xderpd over TLS on loopback with a self-signed
// certificate for 127.0.0.1 (-certmode manual) and returns the DERP map node
// it printed, its arguments and the printed map.
func startSelfSignedDaemon(t *testing.T) (*tailcfg.DERPNode, []string, []byte) {
	t.Helper()
	dir := t.TempDir()
	port, sport, err := target.FreePort("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"-a", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), "-certmode", "manual",
		"-hostname", "127.0.0.1", "-certdir", filepath.Join(dir, "certs"), "-c", filepath.Join(dir, "key"),
		"-stun-port", strconv.Itoa(sport), "-http-port", "-1", "-xdp", "off"}
	out, err := exec.Command(binPath, append(args, "-print-derpmap")...).Output()
	if err != nil {
		t.Fatalf("-print-derpmap: %v", err)
	}
	var dm tailcfg.DERPMap
	if err := json.Unmarshal(out, &dm); err != nil {
		t.Fatalf("-print-derpmap output is not a DERP map: %v\n%s", err, out)
	}
	node := dm.Regions[900].Nodes[0]
	if node.CertName == "" || node.DERPPort != port || node.IPv4 != "127.0.0.1" {
		t.Fatalf("DERP map node %+v", node)
	}
	node.IPv6 = "none"

	cmd := exec.Command(binPath, args...)
	logf, _ := os.Create(filepath.Join(dir, "log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); logf.Close() })
	waitHTTPS(t, "https://"+net.JoinHostPort("127.0.0.1", strconv.Itoa(port))+"/derp/probe")
	return node, args, out
}

func waitHTTPS(t *testing.T, url string) {
	t.Helper()
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("%s not ready", url)
}

// TestDaemonACMEIPCert runs xderpd as an operator would for a node known
// only by its address: -hostname <IP> -acme-ip-certs on port 443, the ACME
// CA (Pebble) validating through the port-80 listener. Tailscale's client,
// with a pin-free DERP map entry, trusts the served certificate through
// Pebble's root.
func TestDaemonACMEIPCert(t *testing.T) {
	if kind != target.Xderpd {
		t.Skip("derper cannot be pointed at another ACME directory than Let's Encrypt's")
	}
	if os.Geteuid() != 0 {
		t.Skip("ACME mode serves TLS only on port 443, which needs root")
	}
	const host = "127.0.0.2" // loopback, and away from anything on 127.0.0.1:443
	httpPort := certsFreePort(t)
	pb := certsStartPebble(t, certsPebbleOpts{httpPort: httpPort, tlsPort: 443, shortlived: 3600})
	// xderpd reaches Pebble's ACME API over HTTPS: trust its certificate.
	caFile := filepath.Join(t.TempDir(), "pebble-api.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: pb.serverCert.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	acmeArgs := []string{"-hostname", host, "-certmode", "letsencrypt", "-acme-ip-certs",
		"-acme-directory", pb.dirURL, "-certdir", filepath.Join(t.TempDir(), "certs")}
	s := startServer(t, target.Options{
		Host: host, Port: 443, ReadyWait: 60 * time.Second,
		ClientTLS: &tls.Config{RootCAs: pb.roots},
		Env:       []string{"SSL_CERT_FILE=" + caFile},
		ExtraArgs: append(acmeArgs, "-http-port", strconv.Itoa(httpPort)),
	})
	// The DERP map entry the operator pastes: the address, no pin.
	out, err := exec.Command(binPath, append(acmeArgs, "-a", host+":443", "-stun-port", strconv.Itoa(s.STUNPort), "-print-derpmap")...).Output()
	if err != nil {
		t.Fatalf("-print-derpmap: %v", err)
	}
	var dm tailcfg.DERPMap
	if err := json.Unmarshal(out, &dm); err != nil || dm.Regions[900] == nil {
		t.Fatalf("-print-derpmap output is not a DERP map: %v\n%s", err, out)
	}
	node := dm.Regions[900].Nodes[0]
	if node.CertName != "" || node.HostName != host || node.IPv4 != host || node.DERPPort != 0 {
		t.Fatalf("DERP map node %+v: want HostName and IPv4 %s, port 443, no pin", node, host)
	}
	node.IPv6 = "none"
	a, aKey, err := certsDerpClient(t, node, &tls.Config{RootCAs: pb.roots})
	if err != nil {
		t.Fatalf("client trusting Pebble's root: %v\n%s", err, s.LogTail())
	}
	b, _, err := certsDerpClient(t, node, &tls.Config{RootCAs: pb.roots})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certsExchange(a, aKey, b, "through an IP certificate"); err != nil {
		t.Fatal(err)
	}
	leaf := certsTlsState(t, a).PeerCertificates[0]
	if len(leaf.IPAddresses) != 1 || leaf.IPAddresses[0].String() != host {
		t.Errorf("leaf for %v", leaf.IPAddresses)
	}
	if !strings.Contains(s.LogTail(), "ACME certificate for the IP address obtained") {
		t.Errorf("no issuance line in the log:\n%s", s.LogTail())
	}
}
