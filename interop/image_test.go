package interop

// The appliance image, booted in QEMU by appliance-image/test.sh, seen by
// Tailscale's own code: two derphttp clients exchange packets through it over
// TLS verified only by the node's pinned self-signed certificate (CertName),
// and Tailscale's STUN client gets its mapped address from the STUN port.
// Skipped unless the image test sets XDERP_IMAGE_URL.

import (
	"crypto/tls"
	"net"
	"net/netip"
	"net/url"
	"os"
	"testing"
	"time"

	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
)

// Environment set by appliance-image/test.sh.
const (
	envImageURL      = "XDERP_IMAGE_URL"      // https://127.0.0.1:PORT/derp (forwarded to the guest's 443)
	envImageCertName = "XDERP_IMAGE_CERTNAME" // sha256-raw:<hex>, printed on the guest's console
	envImageSTUN     = "XDERP_IMAGE_STUN"     // 127.0.0.1:PORT (forwarded to the guest's 3478), optional
)

// imageLoopback parses a host:port that must be on loopback: the image test
// reaches the guest only through QEMU forwards bound to 127.0.0.1.
func imageLoopback(t *testing.T, hostport string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil || !ap.Addr().IsLoopback() {
		t.Fatalf("%q: want a loopback ip:port (%v)", hostport, err)
	}
	return ap
}

func TestImageDERPOverPinnedTLS(t *testing.T) {
	raw := os.Getenv(envImageURL)
	if raw == "" {
		t.Skip(envImageURL + " not set: run by appliance-image/test.sh")
	}
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" {
		t.Fatalf("%s=%q: want an https URL", envImageURL, raw)
	}
	ap := imageLoopback(t, u.Host)
	certName := os.Getenv(envImageCertName)
	if certName == "" {
		t.Fatalf("%s not set", envImageCertName)
	}
	node := &tailcfg.DERPNode{Name: "900a", RegionID: 900, HostName: ap.Addr().String(),
		IPv4: ap.Addr().String(), IPv6: "none", DERPPort: int(ap.Port()), STUNPort: -1, CertName: certName}

	a, aKey, err := certsDerpClient(t, node, nil)
	if err != nil {
		t.Fatalf("client a with pinned CertName: %v", err)
	}
	b, bKey, err := certsDerpClient(t, node, nil)
	if err != nil {
		t.Fatalf("client b: %v", err)
	}
	if _, err := certsExchange(a, aKey, b, "image: a to b"); err != nil {
		t.Fatal(err)
	}
	if _, err := certsExchange(b, bKey, a, "image: b to a"); err != nil {
		t.Fatal(err)
	}
	if a.ServerPublicKey().IsZero() || a.ServerPublicKey() != b.ServerPublicKey() {
		t.Errorf("server keys seen by the clients: %v, %v", a.ServerPublicKey(), b.ServerPublicKey())
	}
	t.Logf("relay key %v; TLS %s", a.ServerPublicKey().ShortString(), tls.VersionName(certsTlsState(t, a).Version))

	// A client with a different pin must refuse the node.
	bad := *node
	bad.CertName = "sha256-raw:" + "00" + certName[len("sha256-raw:")+2:]
	if _, _, err := certsDerpClient(t, &bad, nil); err == nil {
		t.Error("client accepted the image's certificate under a wrong pin")
	}
}

func TestImageTailscaleSTUN(t *testing.T) {
	hp := os.Getenv(envImageSTUN)
	if hp == "" {
		t.Skip(envImageSTUN + " not set: run by appliance-image/test.sh")
	}
	ap := imageLoopback(t, hp)
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(ap))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1500)
	for i := 0; i < 5; i++ {
		tx := stun.NewTxID()
		if _, err := c.Write(stun.Request(tx)); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		gotTx, mapped, err := stun.ParseResponse(buf[:n])
		if err != nil || gotTx != tx {
			t.Fatalf("request %d: response %x: tx %v want %v, err %v", i, buf[:n], gotTx, tx, err)
		}
		// Through QEMU's user networking the guest sees the forward's
		// source, 10.0.2.2, and some port.
		if !mapped.Addr().Is4() || mapped.Port() == 0 {
			t.Fatalf("request %d: mapped address %v", i, mapped)
		}
		if i == 0 {
			t.Logf("mapped address %v", mapped)
		}
	}
}
