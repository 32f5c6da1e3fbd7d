package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// benchCert is the one self-signed certificate both servers serve in TLS
// mode, so that key type, signature algorithm and chain are identical.
type benchCert struct {
	dir      string // holds 127.0.0.1.crt and 127.0.0.1.key
	der      []byte
	certName string // "sha256-raw:<hex>", as a DERP map pins it
	pool     *x509.CertPool
}

var (
	certOnce sync.Once
	certVal  *benchCert
	certErr  error
)

// sharedCert creates (once) an ECDSA P-256 certificate for the IP address
// 127.0.0.1 in dir/certs, in the file names both servers' manual mode
// looks for (<certdir>/<hostname>.crt and .key).
func sharedCert(dir string) (*benchCert, error) {
	certOnce.Do(func() { certVal, certErr = makeCert(filepath.Join(dir, "certs")) })
	return certVal, certErr
}

func makeCert(dir string) (*benchCert, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cert dir: %w", err)
	}
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	crt := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	kp := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	if err := os.WriteFile(filepath.Join(dir, "127.0.0.1.crt"), crt, 0o644); err != nil {
		return nil, fmt.Errorf("write certificate: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "127.0.0.1.key"), kp, 0o600); err != nil {
		return nil, fmt.Errorf("write key: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	sum := sha256.Sum256(der)
	return &benchCert{dir: dir, der: der, certName: "sha256-raw:" + hex.EncodeToString(sum[:]), pool: pool}, nil
}

// clientConfig is the TLS configuration of the bench's own dials (readiness,
// metrics, handshakes): the certificate is trusted as its own root and the
// server name is the IP address. No session cache, so every handshake is
// a full one.
func (c *benchCert) clientConfig() *tls.Config {
	return &tls.Config{RootCAs: c.pool, ServerName: "127.0.0.1", NextProtos: []string{"http/1.1"}}
}

// tlsRelay is a server in TLS (manual certificate) mode, run by the shared
// target package, with the bench's pinned certificate.
type tlsRelay struct {
	*target.Server
	cert *benchCert
}

// startTLS runs bin with -certmode manual -hostname 127.0.0.1 and the shared
// certificate, on free loopback ports, and waits until GET /derp/probe over
// TLS answers 200.
func startTLS(k target.Kind, bin, dir string) (*tlsRelay, error) {
	cert, err := sharedCert(dir)
	if err != nil {
		return nil, err
	}
	s, err := target.Start(k, bin, target.Options{Dir: dir, ClientTLS: cert.clientConfig(),
		ExtraArgs: []string{"-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", cert.dir}})
	if err != nil {
		return nil, err
	}
	return &tlsRelay{Server: s, cert: cert}, nil
}

func (s *tlsRelay) kind() target.Kind { return s.Kind }

// region is the one-node DERP map the derphttp clients dial: the node's
// IPv4 address, port and pinned CertName, no IPv6.
func (s *tlsRelay) region() *tailcfg.DERPRegion {
	return &tailcfg.DERPRegion{
		RegionID:   900,
		RegionCode: "bench",
		Nodes: []*tailcfg.DERPNode{{
			Name:     "900a",
			RegionID: 900,
			HostName: "127.0.0.1",
			IPv4:     "127.0.0.1",
			IPv6:     "none",
			DERPPort: s.Port,
			STUNPort: -1,
			CertName: s.cert.certName,
		}},
	}
}

func (s *tlsRelay) newClient(priv key.NodePrivate) (*derphttp.Client, error) {
	reg := s.region()
	return derphttp.NewRegionClient(priv, quiet, netmon.NewStatic(), func() *tailcfg.DERPRegion { return reg }), nil
}

// handshakeRate runs handshake-parallel dialers that each repeat: TCP
// connect to the DERP port, a full TLS handshake (no resumption) verified
// against the pinned certificate, close_notify, wait for the server to
// close, close (SO_LINGER 0, so no TIME_WAIT piles up).
// It returns completed handshakes per second and per server CPU-second,
// counted over the phase duration after the warm-up, or until
// handshake-max handshakes.
func handshakeRate(s *tlsRelay) (perSec, perCPUSec float64, err error) {
	var (
		counting, stop atomic.Bool
		done           atomic.Int64
		wg             sync.WaitGroup
		errMu          sync.Mutex
		firstErr       error
		stateOnce      sync.Once
	)
	limitHit := make(chan struct{})
	var limitOnce sync.Once
	conf := s.cert.clientConfig()
	addr := s.HostPort()
	for range *flagHSParallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{Timeout: 2 * time.Second}
			for !stop.Load() {
				nc, err := d.Dial("tcp", addr)
				if err != nil {
					if !stop.Load() {
						errMu.Lock()
						firstErr = cmpErr(firstErr, fmt.Errorf("dial: %w", err))
						errMu.Unlock()
					}
					return
				}
				nc.(*net.TCPConn).SetLinger(0)
				tc := tls.Client(nc, conf)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				err = tc.HandshakeContext(ctx)
				cancel()
				if err == nil {
					stateOnce.Do(func() {
						st := tc.ConnectionState()
						log.Printf("%s TLS: %s, %s, key exchange %s", s.Kind, tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite), st.CurveID)
					})
				}
				if err == nil {
					// The server has the handshake only once it has read
					// our Finished: send close_notify and read until the
					// server closes (its HTTP server sees EOF), so every
					// counted handshake completed on both sides.
					tc.SetDeadline(time.Now().Add(2 * time.Second))
					if err = tc.CloseWrite(); err == nil {
						_, err = io.Copy(io.Discard, tc)
						if err != nil {
							err = fmt.Errorf("waiting for the server to close: %w", err)
						}
					}
				}
				tc.Close()
				if err != nil {
					if !stop.Load() {
						errMu.Lock()
						firstErr = cmpErr(firstErr, fmt.Errorf("handshake: %w", err))
						errMu.Unlock()
					}
					return
				}
				if counting.Load() && done.Add(1) >= int64(*flagHSMax) {
					limitOnce.Do(func() { close(limitHit) })
				}
			}
		}()
	}
	time.Sleep(*flagWarmup) // warm-up
	cpu0, _ := s.CPUSeconds()
	self0 := selfCPU()
	counting.Store(true)
	start := time.Now()
	select {
	case <-time.After(*flagDuration): // measuring window
	case <-limitHit:
	}
	counting.Store(false)
	elapsed := time.Since(start)
	n := done.Load()
	cpu1, _ := s.CPUSeconds()
	srvCPU := cpu1 - cpu0
	log.Printf("%s TLS handshakes: %d in %v; CPU cores busy: server %.2f, load generator %.2f",
		s.Kind, n, elapsed.Round(time.Millisecond), srvCPU/elapsed.Seconds(), (selfCPU()-self0)/elapsed.Seconds())
	stop.Store(true)
	wg.Wait()
	perSec = float64(n) / elapsed.Seconds()
	if srvCPU > 0 {
		perCPUSec = float64(n) / srvCPU
	}
	return perSec, perCPUSec, firstErr
}

// cmpErr keeps the first error.
func cmpErr(first, next error) error {
	if first != nil {
		return first
	}
	return next
}
