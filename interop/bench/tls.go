package main

import (
	"bufio"
	"bytes"
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
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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

// tlsRelay is a server started by the bench in TLS (manual certificate)
// mode. The shared target package starts servers on plain HTTP only.
type tlsRelay struct {
	k        target.Kind
	port     int
	stunPort int
	cert     *benchCert
	logPath  string
	hc       *http.Client

	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// startTLS runs bin with -certmode manual -hostname 127.0.0.1 and the shared
// certificate, on free loopback ports, and waits until GET /derp/probe over
// TLS answers 200.
func startTLS(k target.Kind, bin, dir string) (*tlsRelay, error) {
	cert, err := sharedCert(dir)
	if err != nil {
		return nil, err
	}
	keyPath := filepath.Join(dir, fmt.Sprintf("%s-tls-%d.key", k, time.Now().UnixNano()))
	if _, err := target.WriteKeyFile(keyPath); err != nil {
		return nil, err
	}
	var lastErr error
	for attempt := range 3 {
		port, sport, err := target.FreePort("127.0.0.1")
		if err != nil {
			return nil, err
		}
		s := &tlsRelay{k: k, port: port, stunPort: sport, cert: cert,
			logPath: fmt.Sprintf("%s.%d.log", keyPath, attempt), done: make(chan struct{}),
			hc: &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: cert.clientConfig()}}}
		args := []string{
			"-a", s.HostPort(),
			"-stun-port", strconv.Itoa(sport),
			"-c", keyPath,
			"-http-port", "-1",
			"-certmode", "manual",
			"-hostname", "127.0.0.1",
			"-certdir", cert.dir,
		}
		if k == target.Xderpd {
			args = append(args, "-xdp", "off")
		}
		logf, err := os.Create(s.logPath)
		if err != nil {
			return nil, fmt.Errorf("create log: %w", err)
		}
		s.cmd = exec.Command(bin, args...)
		s.cmd.Stdout, s.cmd.Stderr = logf, logf
		s.cmd.Dir = dir
		s.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_CACHE_HOME="+dir)
		// The kernel kills the server if the bench dies first.
		s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := s.cmd.Start(); err != nil {
			logf.Close()
			return nil, fmt.Errorf("start %s: %w", bin, err)
		}
		go func() {
			s.err = s.cmd.Wait()
			logf.Close()
			close(s.done)
		}()
		if err := s.waitReady(20 * time.Second); err != nil {
			lastErr = err
			s.kill()
			continue
		}
		return s, nil
	}
	return nil, lastErr
}

func (s *tlsRelay) waitReady(d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		select {
		case <-s.done:
			return fmt.Errorf("%s (tls) exited before ready (%v): %s", s.k, s.err, s.logTail())
		default:
		}
		resp, err := s.hc.Get("https://" + s.HostPort() + "/derp/probe")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s (tls) not ready within %v (last error %v): %s", s.k, d, err, s.logTail())
		}
		select {
		case <-s.done:
		case <-time.After(20 * time.Millisecond): // poll interval
		}
	}
}

func (s *tlsRelay) logTail() string {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(lines, "\n")
}

func (s *tlsRelay) kind() target.Kind { return s.k }
func (s *tlsRelay) PID() int          { return s.cmd.Process.Pid }
func (s *tlsRelay) HostPort() string  { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }
func (s *tlsRelay) STUNAddr() string  { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.stunPort)) }
func (s *tlsRelay) RSSKiB() (int64, error) {
	return target.RSSKiB(s.PID())
}

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
			DERPPort: s.port,
			STUNPort: -1,
			CertName: s.cert.certName,
		}},
	}
}

func (s *tlsRelay) newClient(priv key.NodePrivate) (*derphttp.Client, error) {
	reg := s.region()
	return derphttp.NewRegionClient(priv, quiet, netmon.NewStatic(), func() *tailcfg.DERPRegion { return reg }), nil
}

// CPUSeconds returns user+system CPU time from /proc/PID/stat (USER_HZ 100).
func (s *tlsRelay) CPUSeconds() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.PID()))
	if err != nil {
		return 0, fmt.Errorf("read cpu time: %w", err)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("read cpu time: malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("read cpu time: short stat")
	}
	ut, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("read cpu time: bad utime/stime")
	}
	return (ut + st) / 100, nil
}

func (s *tlsRelay) Metric(ctx context.Context, name string) (float64, error) {
	v, n, err := s.metric(ctx, name, true)
	if err == nil && n == 0 {
		err = fmt.Errorf("metric %s not found", name)
	}
	return v, err
}

func (s *tlsRelay) MetricSum(ctx context.Context, name string) (float64, error) {
	v, n, err := s.metric(ctx, name, false)
	if err == nil && n == 0 {
		err = fmt.Errorf("metric %s not found", name)
	}
	return v, err
}

// metric reads /debug/varz over TLS and sums the samples of name (only
// the first if first is set). A quick scan of the text format, enough for
// counters and gauges; the format itself is checked by the interop tests.
func (s *tlsRelay) metric(ctx context.Context, name string, first bool) (sum float64, n int, err error) {
	req, err := http.NewRequestWithContext(ctx, "GET", "https://"+s.HostPort()+"/debug/varz", nil)
	if err != nil {
		return 0, 0, err
	}
	resp, err := s.hc.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("/debug/varz: %s", resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(rest[strings.LastIndexByte(rest, '}')+1:])
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		sum += v
		n++
		if first {
			break
		}
	}
	return sum, n, sc.Err()
}

func (s *tlsRelay) Stop(d time.Duration) error {
	select {
	case <-s.done:
		return s.err
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		return s.err
	case <-time.After(d):
		s.kill()
		return fmt.Errorf("%s did not exit within %v of SIGTERM", s.k, d)
	}
}

func (s *tlsRelay) kill() {
	select {
	case <-s.done:
	default:
		_ = s.cmd.Process.Kill()
	}
	<-s.done
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
						log.Printf("%s TLS: %s, %s, key exchange %s", s.k, tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite), st.CurveID)
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
		s.k, n, elapsed.Round(time.Millisecond), srvCPU/elapsed.Seconds(), (selfCPU()-self0)/elapsed.Seconds())
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
