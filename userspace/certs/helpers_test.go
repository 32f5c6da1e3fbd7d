package certs

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/xderp/xderp/userspace/internal/testlog"
	"github.com/xderp/xderp/userspace/metrics"
)

var testDERPKey = [32]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
	17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32}

// pair is a PEM certificate and key.
type pair struct {
	crt, key []byte
	der      []byte
}

// makePair creates a self-signed certificate for host valid in
// [notBefore, notAfter].
func makePair(t *testing.T, host string, notBefore, notAfter time.Time) pair {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: host},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	if ip := net.ParseIP(host); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{host}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	kd, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return pair{
		crt: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}),
		der: der,
	}
}

func validPair(t *testing.T, host string) pair {
	now := time.Now()
	return makePair(t, host, now.Add(-time.Hour), now.Add(24*time.Hour))
}

// install writes p into dir as host.crt/.key, each by atomic rename (as a
// careful operator or a deploy tool would).
func install(t *testing.T, dir, host string, p pair) {
	t.Helper()
	crt, key := filePaths(dir, host)
	if err := writeFileAtomic(key, p.key, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(crt, p.crt, 0o644); err != nil {
		t.Fatal(err)
	}
}

type testEnv struct {
	p    *Provider
	reg  *metrics.Registry
	logs *testlog.Buffer
	addr string
}

func baseConfig(t testing.TB, dir, host string) (Config, *metrics.Registry, *testlog.Buffer) {
	reg := metrics.NewRegistry()
	logs := &testlog.Buffer{}
	return Config{
		Mode:          ModeManual,
		Dir:           dir,
		Hostname:      host,
		DERPPublicKey: testDERPKey,
		PollInterval:  20 * time.Millisecond,
		Logger:        slog.New(slog.NewTextHandler(logs, nil)),
		Metrics:       reg,
	}, reg, logs
}

// serve starts an echo server on a wrapped loopback listener.
func serve(t *testing.T, p *Provider) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	wl := p.WrapListener(ln)
	t.Cleanup(func() { wl.Close() })
	go func() {
		for {
			c, err := wl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func newEnv(t *testing.T, cfg Config, reg *metrics.Registry, logs *testlog.Buffer) *testEnv {
	t.Helper()
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return &testEnv{p: p, reg: reg, logs: logs, addr: serve(t, p)}
}

// dial completes a TLS handshake with cfg (InsecureSkipVerify unless the
// caller set verification up) and returns the connection.
func dial(t *testing.T, addr string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return c, nil
}

// echo writes a line and expects it back.
func echo(t *testing.T, c net.Conn, msg string) error {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != msg+"\n" {
		return fmt.Errorf("echo: got %q want %q", line, msg)
	}
	return nil
}

// leafOf returns the first certificate the server presented.
func leafOf(c *tls.Conn) *x509.Certificate { return c.ConnectionState().PeerCertificates[0] }

// metricValue reads one sample (e.g. `x_total{reason="eof"}`) from reg.
func metricValue(t *testing.T, reg *metrics.Registry, sample string) float64 {
	t.Helper()
	var b bytes.Buffer
	if err := reg.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(b.String(), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", sample, err)
			}
			return f
		}
	}
	return -1
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// pinnedConfig verifies the server the way Tailscale clients verify a
// "sha256-raw:" CertName: ignore derpkey meta certificates, require exactly
// one other certificate whose SHA-256 matches, valid now and for the name.
func pinnedConfig(certName, serverName string) *tls.Config {
	want, _ := strings.CutPrefix(certName, "sha256-raw:")
	return &tls.Config{
		ServerName:         serverName,
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			var good int
			for _, c := range cs.PeerCertificates {
				if strings.HasPrefix(c.Subject.CommonName, "derpkey") {
					continue
				}
				good++
				sum := sha256.Sum256(c.Raw)
				if hex.EncodeToString(sum[:]) != want {
					return errors.New("cert hash does not match pin")
				}
				if err := c.VerifyHostname(serverName); err != nil {
					return err
				}
				now := time.Now()
				if now.After(c.NotAfter) || now.Before(c.NotBefore) {
					return errors.New("cert outside validity")
				}
			}
			if good != 1 {
				return fmt.Errorf("want exactly one non-meta cert, got %d", good)
			}
			return nil
		},
	}
}

func fileMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}
