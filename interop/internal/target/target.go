// Package target builds and runs the relay under test (xderpd, or Tailscale's
// derper as the reference) as a separate process on loopback, and answers
// the questions the interop tests and the benchmark ask about it: where it
// listens, whether it is ready, how much memory it holds.
package target

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"tailscale.com/types/key"
)

// Kind names a relay implementation.
type Kind string

const (
	// Xderpd is this project's daemon, github.com/xderp/xderp/cmd/xderpd.
	Xderpd Kind = "xderpd"
	// Reference is Tailscale's derper (tailscale.com/cmd/derper), which
	// wraps tailscale.com/derp/derpserver and tailscale.com/net/stunserver.
	Reference Kind = "reference"
)

// EnvTarget selects the implementation the interop tests run against.
const EnvTarget = "XDERP_INTEROP_TARGET"

// FromEnv returns the kind named by XDERP_INTEROP_TARGET (default xderpd).
func FromEnv() (Kind, error) {
	switch v := os.Getenv(EnvTarget); v {
	case "", string(Xderpd):
		return Xderpd, nil
	case string(Reference), "derper":
		return Reference, nil
	default:
		return "", fmt.Errorf("%s=%q: want xderpd or reference", EnvTarget, v)
	}
}

// EnvXderpdBin, if set, names a prebuilt xderpd binary to use instead of
// building one (for example the bin/xderpd that `make build` writes).
const EnvXderpdBin = "XDERP_XDERPD_BIN"

// Build compiles the binary for k into dir and returns its path. It must
// run inside the interop module (tests and `go run ./bench` do).
//
// xderpd is built in the main module (the parent of the interop module),
// not through the interop module's replace directive: there its
// dependencies would be resolved together with tailscale.com's, and the
// binary under test would differ from the one `make build` produces.
// derper is built from the pinned tailscale.com requirement (a `tool` in
// interop/go.mod).
func Build(k Kind, dir string) (string, error) {
	out := filepath.Join(dir, string(k))
	var cmd *exec.Cmd
	switch k {
	case Reference:
		cmd = exec.Command("go", "build", "-o", out, "tailscale.com/cmd/derper")
	case Xderpd:
		if bin := os.Getenv(EnvXderpdBin); bin != "" {
			abs, err := filepath.Abs(bin)
			if err != nil {
				return "", fmt.Errorf("%s: %w", EnvXderpdBin, err)
			}
			if _, err := os.Stat(abs); err != nil {
				return "", fmt.Errorf("%s: %w", EnvXderpdBin, err)
			}
			return abs, nil
		}
		root, err := mainModuleDir()
		if err != nil {
			return "", err
		}
		cmd = exec.Command("go", "build", "-o", out, "./cmd/xderpd")
		cmd.Dir = root
	default:
		return "", fmt.Errorf("unknown target %q", k)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build %s: %w: %s", k, err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// mainModuleDir finds the xderp checkout: the parent of the interop
// module's directory.
func mainModuleDir() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the interop module (run from interop/)")
	}
	root := filepath.Dir(filepath.Dir(gomod))
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		return "", fmt.Errorf("main module not found above %s: %w", filepath.Dir(gomod), err)
	}
	return root, nil
}

// FreePort returns a TCP port and a UDP port on host that were free a moment
// ago (the kernel picked them). The window between closing and reuse is the
// usual one for tests; Start retries on a bind failure.
func FreePort(host string) (tcp, udp int, err error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, 0, fmt.Errorf("pick tcp port: %w", err)
	}
	defer l.Close()
	u, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, 0, fmt.Errorf("pick udp port: %w", err)
	}
	defer u.Close()
	return l.Addr().(*net.TCPAddr).Port, u.LocalAddr().(*net.UDPAddr).Port, nil
}

// WriteKeyFile writes a derper-format key file ({"PrivateKey":"privkey:<hex>"})
// for a fresh node key and returns the key.
func WriteKeyFile(path string) (key.NodePrivate, error) {
	k := key.NewNode()
	txt, err := k.MarshalText()
	if err != nil {
		return key.NodePrivate{}, fmt.Errorf("marshal key: %w", err)
	}
	body := fmt.Sprintf("{\n\t\"PrivateKey\": %q\n}\n", txt)
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		return key.NodePrivate{}, fmt.Errorf("write key file: %w", err)
	}
	return k, nil
}

// Server is one running relay process.
type Server struct {
	Kind     Kind
	Host     string // "127.0.0.1" or "::1"
	Port     int    // DERP/HTTP port
	STUNPort int    // STUN UDP port
	Key      key.NodePrivate
	LogPath  string

	cmd    *exec.Cmd
	done   chan struct{}
	err    error // exit status, valid after done is closed
	scheme string
	hc     *http.Client
}

// Options tune Start.
type Options struct {
	Host      string        // listen IP; default 127.0.0.1
	Dir       string        // where the key file and log go (required)
	ReadyWait time.Duration // how long to wait for /derp/probe; default 20s
	ExtraArgs []string      // appended to the command line
	Port      int           // DERP port to use (0: a free one, retried on a clash)
	// ClientTLS, when set, means the server serves TLS (ExtraArgs carry its
	// certificate flags): readiness and metrics are fetched over HTTPS with
	// this client configuration.
	ClientTLS *tls.Config
	// Env is added to the server's environment.
	Env []string
}

// Start runs bin (built for k) on free loopback ports and waits until GET
// /derp/probe answers 200.
func Start(k Kind, bin string, o Options) (*Server, error) {
	if o.Host == "" {
		o.Host = "127.0.0.1"
	}
	if o.ReadyWait == 0 {
		o.ReadyWait = 20 * time.Second
	}
	keyPath := filepath.Join(o.Dir, fmt.Sprintf("%s-%d.key", k, time.Now().UnixNano()))
	priv, err := WriteKeyFile(keyPath)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, sport, err := FreePort(o.Host)
		if err != nil {
			return nil, err
		}
		if o.Port != 0 {
			port = o.Port
		}
		s := &Server{Kind: k, Host: o.Host, Port: port, STUNPort: sport, Key: priv,
			LogPath: keyPath + fmt.Sprintf(".%d.log", attempt), done: make(chan struct{}),
			scheme: "http", hc: &http.Client{}}
		if o.ClientTLS != nil {
			s.scheme = "https"
			s.hc.Transport = &http.Transport{TLSClientConfig: o.ClientTLS}
		}
		args := []string{
			"-a", net.JoinHostPort(o.Host, strconv.Itoa(port)),
			"-stun-port", strconv.Itoa(sport),
			"-c", keyPath,
			"-http-port", "-1",
		}
		if k == Xderpd {
			args = append(args, "-xdp", "off")
		}
		args = append(args, o.ExtraArgs...)
		logf, err := os.Create(s.LogPath)
		if err != nil {
			return nil, fmt.Errorf("create log: %w", err)
		}
		s.cmd = exec.Command(bin, args...)
		s.cmd.Stdout = logf
		s.cmd.Stderr = logf
		s.cmd.Dir = o.Dir
		s.cmd.Env = append(append(os.Environ(), "HOME="+o.Dir, "XDG_CACHE_HOME="+o.Dir), o.Env...)
		bindLifetime(s.cmd)
		if err := s.cmd.Start(); err != nil {
			logf.Close()
			return nil, fmt.Errorf("start %s: %w", bin, err)
		}
		go func() {
			s.err = s.cmd.Wait()
			logf.Close()
			close(s.done)
		}()
		if err := s.waitReady(o.ReadyWait); err != nil {
			lastErr = err
			s.Kill()
			continue
		}
		return s, nil
	}
	return nil, lastErr
}

func (s *Server) waitReady(d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		select {
		case <-s.done:
			return fmt.Errorf("%s exited before ready (%v): %s", s.Kind, s.err, s.LogTail())
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		req, _ := http.NewRequestWithContext(ctx, "GET", s.HTTPURL()+"/derp/probe", nil)
		resp, err := s.hc.Do(req)
		cancel()
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready within %v (last error %v): %s", s.Kind, d, err, s.LogTail())
		}
		select {
		case <-s.done:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// HostPort is the DERP listen address.
func (s *Server) HostPort() string { return net.JoinHostPort(s.Host, strconv.Itoa(s.Port)) }

// STUNAddr is the STUN listen address.
func (s *Server) STUNAddr() string { return net.JoinHostPort(s.Host, strconv.Itoa(s.STUNPort)) }

// HTTPURL is the base URL, e.g. http://127.0.0.1:1234 (https:// with
// Options.ClientTLS).
func (s *Server) HTTPURL() string { return s.scheme + "://" + s.HostPort() }

// DERPURL is the URL derphttp clients connect to.
func (s *Server) DERPURL() string { return s.HTTPURL() + "/derp" }

// PID of the process.
func (s *Server) PID() int { return s.cmd.Process.Pid }

// Alive reports whether the process has not exited.
func (s *Server) Alive() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// ExitErr returns the exit status once the process is gone.
func (s *Server) ExitErr() error {
	<-s.done
	return s.err
}

// MetricsPath is the Prometheus text page both implementations serve.
// derper has only /debug/varz; xderpd serves both (the tests check /metrics too).
func (s *Server) MetricsPath() string { return "/debug/varz" }

// Stop sends SIGTERM and waits up to d for exit; it kills after that.
// It returns the exit error (nil for status 0).
func (s *Server) Stop(d time.Duration) error {
	if !s.Alive() {
		return s.err
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		return s.err
	case <-time.After(d):
		s.Kill()
		return fmt.Errorf("%s did not exit within %v of SIGTERM", s.Kind, d)
	}
}

// Kill ends the process without grace and waits for it.
func (s *Server) Kill() {
	if s.Alive() {
		_ = s.cmd.Process.Kill()
	}
	<-s.done
}

// LogTail returns the last lines of the process log.
func (s *Server) LogTail() string {
	b, err := os.ReadFile(s.LogPath)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

// RSSKiB reads VmRSS of the process from /proc.
func (s *Server) RSSKiB() (int64, error) { return RSSKiB(s.PID()) }

// RSSKiB reads VmRSS (KiB) of pid from /proc/PID/status.
func RSSKiB(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read rss: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			v = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB"))
			return strconv.ParseInt(v, 10, 64)
		}
	}
	return 0, errors.New("read rss: no VmRSS line")
}

// Metric fetches the metrics page and returns the value of the first sample
// of the metric called name (e.g. `derp_current_connections`). It is a
// quick poll helper; the exposition format itself is checked with the
// Prometheus parser in the tests.
func (s *Server) Metric(ctx context.Context, name string) (float64, error) {
	v, n, err := s.metric(ctx, name, true)
	if err == nil && n == 0 {
		err = fmt.Errorf("metric %s not found", name)
	}
	return v, err
}

// MetricSum returns the sum over all samples (all label sets) of name.
func (s *Server) MetricSum(ctx context.Context, name string) (float64, error) {
	v, n, err := s.metric(ctx, name, false)
	if err == nil && n == 0 {
		err = fmt.Errorf("metric %s not found", name)
	}
	return v, err
}

func (s *Server) metric(ctx context.Context, name string, first bool) (sum float64, n int, err error) {
	req, err := http.NewRequestWithContext(ctx, "GET", s.HTTPURL()+s.MetricsPath(), nil)
	if err != nil {
		return 0, 0, err
	}
	resp, err := s.hc.Do(req)
	if err != nil {
		return 0, 0, fmt.Errorf("fetch metrics: %w", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, 0, fmt.Errorf("metric %s: %w", name, err)
		}
		sum += v
		n++
		if first {
			break
		}
	}
	return sum, n, sc.Err()
}

// Signal sends sig to the process.
func (s *Server) Signal(sig os.Signal) error { return s.cmd.Process.Signal(sig) }

// CPUSeconds returns the user+system CPU time the process has used, from
// /proc/PID/stat (clock ticks of 1/100 s, the Linux USER_HZ).
func (s *Server) CPUSeconds() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.PID()))
	if err != nil {
		return 0, fmt.Errorf("read cpu time: %w", err)
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("read cpu time: malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// After ")": field 3 is f[0]; utime is field 14, stime field 15.
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
