package interop

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"go4.org/mem"
	"tailscale.com/types/key"
)

// Raw DERP framing, written from the wire spec, for the tests that must send
// what no well-behaved client sends.

const (
	frameServerKey  = 0x01
	frameClientInfo = 0x02
	frameServerInfo = 0x03
	frameSendPacket = 0x04
	framePing       = 0x12
	framePong       = 0x13
)

var serverKeyMagic = []byte("DERP\xf0\x9f\x94\x91")

type rawConn struct {
	net.Conn
	br *bufio.Reader
}

func writeFrame(w io.Writer, typ byte, payload []byte) error {
	hdr := make([]byte, 5, 5+len(payload))
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(payload)))
	_, err := w.Write(append(hdr, payload...))
	return err
}

func readFrame(br *bufio.Reader, max uint32) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > max {
		return 0, nil, fmt.Errorf("frame type %#x length %d over %d", hdr[0], n, max)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(br, b); err != nil {
		return 0, nil, err
	}
	return hdr[0], b, nil
}

// dialRaw opens a TCP connection to the shared server.
func dialRaw(t testing.TB) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", srv.HostPort(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{Conn: c, br: bufio.NewReader(c)}
}

const upgradeRequest = "GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"

// upgrade sends the HTTP upgrade and reads the 101 response and the
// ServerKey frame; it returns the response and the server key.
func (c *rawConn) upgrade(t testing.TB) (*http.Response, key.NodePublic) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, upgradeRequest); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("read upgrade response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %s, want 101", resp.Status)
	}
	typ, b, err := readFrame(c.br, 1024)
	if err != nil {
		t.Fatalf("read ServerKey: %v", err)
	}
	if typ != frameServerKey || len(b) < 40 || string(b[:8]) != string(serverKeyMagic) {
		t.Fatalf("first frame type %#x len %d, want ServerKey with magic", typ, len(b))
	}
	var raw [32]byte
	copy(raw[:], b[8:40])
	return resp, key.NodePublicFromRaw32(mem.B(raw[:]))
}

// clientInfo builds a ClientInfo payload claiming key claimed, sealed by
// sealer to the server.
func clientInfo(claimed key.NodePublic, sealer key.NodePrivate, server key.NodePublic) []byte {
	js, _ := json.Marshal(map[string]any{"version": 2, "CanAckPings": true})
	b := claimed.AppendTo(nil)
	return append(b, sealer.SealTo(server, js)...)
}

// handshake completes the DERP handshake as priv and reads ServerInfo.
func (c *rawConn) handshake(t testing.TB, priv key.NodePrivate) {
	t.Helper()
	_, serverPub := c.upgrade(t)
	if err := writeFrame(c, frameClientInfo, clientInfo(priv.Public(), priv, serverPub)); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	typ, _, err := readFrame(c.br, 1<<20)
	if err != nil {
		t.Fatalf("read ServerInfo: %v", err)
	}
	if typ != frameServerInfo {
		t.Fatalf("frame after ClientInfo: type %#x, want ServerInfo", typ)
	}
}

// expectClosed reads (discarding frames) until the server closes the
// connection; it fails if that does not happen within d.
func (c *rawConn) expectClosed(t testing.TB, d time.Duration, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c.br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: server kept the connection open for %v", what, d)
	}
	// nil (EOF) or a reset: closed either way.
}

// TestUpgradeResponse checks the raw 101 answer (Derp-Version,
// Derp-Public-Key) and the 426 for a request without Upgrade.
func TestUpgradeResponse(t *testing.T) {
	c := dialRaw(t)
	resp, serverPub := c.upgrade(t)
	if serverPub != srv.Key.Public() {
		t.Errorf("ServerKey frame carries %v, want %v", serverPub, srv.Key.Public())
	}
	if got := resp.Header.Get("Derp-Version"); got != "2" {
		t.Errorf("Derp-Version = %q, want 2", got)
	}
	raw := srv.Key.Public().Raw32()
	if got, want := resp.Header.Get("Derp-Public-Key"), hex.EncodeToString(raw[:]); got != want {
		t.Errorf("Derp-Public-Key = %q, want %q", got, want)
	}
	if !strings.EqualFold(resp.Header.Get("Upgrade"), "DERP") {
		t.Errorf("Upgrade = %q, want DERP", resp.Header.Get("Upgrade"))
	}

	r, err := http.Get(srv.HTTPURL() + "/derp")
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != http.StatusUpgradeRequired {
		t.Errorf("GET /derp without Upgrade: %s, want 426", r.Status)
	}
}

// TestEndpoints checks the small HTTP endpoints clients and operators use.
func TestEndpoints(t *testing.T) {
	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{"GET", "/derp/probe", 200},
		{"HEAD", "/derp/probe", 200},
		{"GET", "/derp/latency-check", 200},
		{"HEAD", "/derp/latency-check", 200},
		{"GET", "/generate_204", 204},
		{"GET", "/robots.txt", 200},
		{"GET", "/", 200},
	} {
		req, _ := http.NewRequest(tc.method, srv.HTTPURL()+tc.path, nil)
		if tc.path == "/generate_204" {
			req.Header.Set("X-Tailscale-Challenge", "ts_Chal.lenge-1:2")
		}
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(r.Body)
		r.Body.Close()
		if r.StatusCode != tc.want {
			t.Errorf("%s %s: %s, want %d", tc.method, tc.path, r.Status, tc.want)
		}
		switch tc.path {
		case "/generate_204":
			if got := r.Header.Get("X-Tailscale-Response"); got != "response ts_Chal.lenge-1:2" {
				t.Errorf("X-Tailscale-Response = %q, want %q", got, "response ts_Chal.lenge-1:2")
			}
		case "/robots.txt":
			if !strings.Contains(string(body), "Disallow") {
				t.Errorf("robots.txt = %q, want a Disallow rule", body)
			}
		}
	}
}

// countFDs returns the number of open descriptors of the server process.
func countFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}

// TestFastStart: with Derp-Fast-Start: 1 the server writes no HTTP
// response; the first bytes are the ServerKey frame. The Upgrade value is
// matched case-insensitively.
func TestFastStart(t *testing.T) {
	for _, upgrade := range []string{"DERP", "derp", "DeRp"} {
		c := dialRaw(t)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: "+upgrade+"\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n")
		typ, b, err := readFrame(c.br, 1024)
		if err != nil {
			t.Fatalf("Upgrade: %s, fast start: read first frame: %v", upgrade, err)
		}
		if typ != frameServerKey || len(b) < 40 || string(b[:8]) != string(serverKeyMagic) {
			t.Fatalf("Upgrade: %s, fast start: first bytes are not a ServerKey frame (type %#x, len %d: %q)", upgrade, typ, len(b), b[:min(len(b), 16)])
		}
		var raw [32]byte
		copy(raw[:], b[8:40])
		if keyFromRaw(raw) != srv.Key.Public() {
			t.Fatalf("ServerKey frame carries the wrong key")
		}
		// The handshake completes over the fast-started stream.
		priv := key.NewNode()
		if err := writeFrame(c, frameClientInfo, clientInfo(priv.Public(), priv, srv.Key.Public())); err != nil {
			t.Fatal(err)
		}
		typ, _, err = readFrame(c.br, 1<<20)
		if err != nil || typ != frameServerInfo {
			t.Fatalf("after ClientInfo: type %#x, err %v; want ServerInfo", typ, err)
		}
		c.Close()
	}
}
