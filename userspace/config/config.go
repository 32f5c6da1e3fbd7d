// Package config owns xderpd's configuration schema: the command-line flags
// (derper's names and meanings wherever derper has the flag), their defaults,
// and validation. Every validation error names the flag it is about, so a bad
// command line refuses to start with one clear line.
package config

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// Default addresses and ports.
const (
	DefaultAddr      = ":443"
	DefaultHTTPPort  = 80
	DefaultSTUNPort  = 3478
	DevAddr          = "127.0.0.1:3340"
	DevSTUNAddr      = "127.0.0.1"
	DefaultKeyPath   = "/var/lib/xderp/derper.key"
	DefaultCertDir   = "/var/lib/xderp/certs"
	DefaultPinRoot   = "/sys/fs/bpf/xderp"
	DefaultWriteWait = 2 * time.Second
)

// XDP attach modes accepted by -xdp.
const (
	XDPAuto    = "auto"
	XDPDriver  = "driver"
	XDPGeneric = "generic"
	XDPOff     = "off"
)

// Config is the validated daemon configuration. Zero values are never used
// directly: Parse fills every field with its default first.
type Config struct {
	// Addr is the HTTP(S) listen address (-a, default ":443"). TLS is served
	// when the port is 443 or CertMode is "manual"; otherwise plain HTTP.
	Addr string
	// HTTPPort is the plain-HTTP port used alongside TLS (-http-port, default
	// 80, -1 disables). Bound to the same IP as Addr.
	HTTPPort int
	// STUNPort is the UDP STUN port (-stun-port, default 3478), bound to the
	// same IP as Addr.
	STUNPort int
	// RunSTUN enables the userspace STUN server (-stun, default true).
	RunSTUN bool
	// RunDERP enables the DERP relay (-derp, default true).
	RunDERP bool
	// KeyFile is the server key file in derper's format (-c). Empty means
	// DefaultKeyPath, or a fresh in-memory key with -dev.
	KeyFile string
	// Dev selects development mode (-dev): plain HTTP on 127.0.0.1:3340, STUN
	// on 127.0.0.1:3478, a fresh key unless -c is given.
	Dev bool
	// PrintVersion prints the version and exits (-version).
	PrintVersion bool
	// Hostname is the TLS host name (-hostname).
	Hostname string
	// CertMode is "letsencrypt" or "manual" (-certmode, default letsencrypt).
	CertMode string
	// CertDir holds the ACME cache or the manual <hostname>.crt/.key (-certdir).
	CertDir string
	// ACMEDirectory is the ACME directory URL (-acme-directory; empty = Let's Encrypt).
	ACMEDirectory string
	// ACMEEmail, EABKeyID and EABKey configure the ACME account.
	ACMEEmail, EABKeyID, EABKey string
	// ACMEIPCerts obtains the ACME certificate for an IP -hostname
	// (derper's -acme-ip-certs).
	ACMEIPCerts bool
	// Home selects the root page (-home): "" built-in, "blank", or an
	// http(s) URL to redirect to.
	Home string
	// MeshPSKFile and MeshWith configure region meshing (-mesh-psk-file, -mesh-with).
	MeshPSKFile string
	MeshWith    []string
	// BootstrapDNSNames are resolved and served at /bootstrap-dns
	// (-bootstrap-dns-names).
	BootstrapDNSNames []string
	// UnpublishedBootstrapDNSNames are answered only to ?q=name, to the
	// share of clients a rollout percentage selects: "name" or
	// "name/txtname" (percentage 0-100 in txtname's TXT record).
	UnpublishedBootstrapDNSNames []string
	// RateConfigFile is derper's -rate-config: a JSON file holding the
	// per-client receive limit, re-read on SIGHUP. RateLimit is what it
	// says (zero without the file).
	RateConfigFile string
	RateLimit      RateLimit
	// VerifyClients admits only clients whose node key the local
	// tailscaled knows (derper's -verify-clients).
	VerifyClients bool
	// TailscaledSocket is tailscaled's LocalAPI socket for VerifyClients;
	// empty means the default path.
	TailscaledSocket string
	// VerifyClientURL is the admission webhook asked about every client
	// (-verify-client-url); empty admits everyone.
	VerifyClientURL string
	// VerifyClientURLFailOpen admits clients while the webhook cannot be
	// reached (-verify-client-url-fail-open, default true).
	VerifyClientURLFailOpen bool
	// AcceptLimit is the accepted connections per second allowed (-accept-connection-limit, +Inf = no limit).
	AcceptLimit float64
	// AcceptBurst is the burst for AcceptLimit (-accept-connection-burst).
	AcceptBurst int
	// TCPKeepAlive is the TCP keepalive idle time (-tcp-keepalive-time, default 10m).
	TCPKeepAlive time.Duration
	// TCPUserTimeout is TCP_USER_TIMEOUT for accepted sockets (-tcp-user-timeout, default 15s).
	TCPUserTimeout time.Duration
	// TCPWriteTimeout is the per-write deadline for non-mesh clients (-tcp-write-timeout, default 2s, 0 disables).
	TCPWriteTimeout time.Duration
	// MetricsAllow lists the prefixes allowed to read /metrics and /debug/varz
	// in addition to loopback (-metrics-allow).
	MetricsAllow []netip.Prefix
	// STUNSockets is the number of SO_REUSEPORT STUN sockets per address
	// (-stun-sockets, default: the number of CPUs).
	STUNSockets int
	// XDP is the XDP attach mode (-xdp: auto, driver, generic, off; default auto).
	XDP string
	// XDPIface is the interface to attach to (-xdp-iface; default: the
	// interface of the default route, or lo when serving on loopback).
	XDPIface string
	// XDPPinRoot is the bpffs directory under which per-interface pins live (-xdp-pin-dir).
	XDPPinRoot string
	// XDPDropSTUN makes XDP drop every STUN packet (-xdp-drop-stun, maintenance).
	XDPDropSTUN bool
	// XDPDetach removes the pinned XDP program and exits (-xdp-detach).
	XDPDetach bool
	// Shaping is the inbound rate shaping configuration (off by default).
	Shaping Shaping
	// LogLevel is debug, info, warn or error (-log-level, default info).
	LogLevel string
	// File is the configuration file read before the command line (-config).
	File string
	// PrintDERPMap prints this node's DERP map entry as JSON and exits (-print-derpmap).
	PrintDERPMap bool
}

// Shaping is the inbound shaping configuration enforced by XDP. A zero rate
// means "no limit" for that dimension; shaping is off while every rate is 0.
type Shaping struct {
	// PacketsPerSec and Burst bound the TCP packets per source to the DERP ports.
	PacketsPerSec, PacketBurst uint64
	// BytesPerSec and ByteBurst bound the TCP bytes per source to the DERP ports.
	BytesPerSec, ByteBurst uint64
	// SYNPerSec and SYNBurst bound new connections (SYN without ACK) per source.
	SYNPerSec, SYNBurst uint64
	// STUNPerSec and STUNBurst bound STUN requests per source; 0 (default) never shapes STUN.
	STUNPerSec, STUNBurst uint64
	// Exempt lists source prefixes never shaped (mesh peers are added automatically).
	Exempt []netip.Prefix
}

// Enabled reports whether any shaping limit is configured.
func (s Shaping) Enabled() bool {
	return s.PacketsPerSec > 0 || s.BytesPerSec > 0 || s.SYNPerSec > 0 || s.STUNPerSec > 0
}

// FieldError is a validation error about one flag.
type FieldError struct {
	Flag string
	Msg  string
}

func (e *FieldError) Error() string { return "-" + e.Flag + ": " + e.Msg }

func fieldErr(flag, format string, args ...any) error {
	return &FieldError{Flag: flag, Msg: fmt.Sprintf(format, args...)}
}

// ErrHelp is returned by Parse when -h or -help was given.
var ErrHelp = flag.ErrHelp

// NewFlagSet returns the flag set bound to c with every default filled in.
func NewFlagSet(c *Config, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("xderpd", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&c.Addr, "a", DefaultAddr, "HTTP(S) listen address; TLS when the port is 443 or -certmode=manual, plain HTTP otherwise")
	fs.IntVar(&c.HTTPPort, "http-port", DefaultHTTPPort, "plain-HTTP port served alongside TLS (generate_204, ACME HTTP-01, redirects); -1 disables")
	fs.IntVar(&c.STUNPort, "stun-port", DefaultSTUNPort, "UDP STUN port, bound to the same IP as -a")
	fs.BoolVar(&c.RunSTUN, "stun", true, "run the userspace STUN server")
	fs.BoolVar(&c.RunDERP, "derp", true, "run the DERP relay")
	fs.StringVar(&c.KeyFile, "c", "", "server key file in derper's format {\"PrivateKey\":\"privkey:<hex>\"}; created (0600) if missing; default "+DefaultKeyPath+" (a fresh key with -dev)")
	fs.BoolVar(&c.Dev, "dev", false, "development mode: plain HTTP on "+DevAddr+", STUN on 127.0.0.1:3478, fresh key")
	fs.BoolVar(&c.PrintVersion, "version", false, "print the version and exit")
	fs.StringVar(&c.Hostname, "hostname", "", "TLS host name (a DNS name, or an IP address: self-signed with -certmode=manual, CA-issued with -acme-ip-certs)")
	fs.StringVar(&c.CertMode, "certmode", "letsencrypt", "certificate mode: letsencrypt (ACME) or manual")
	fs.StringVar(&c.CertDir, "certdir", DefaultCertDir, "ACME cache directory, or where manual <hostname>.crt/.key live")
	fs.StringVar(&c.ACMEDirectory, "acme-directory", "", "ACME directory URL (default Let's Encrypt)")
	fs.StringVar(&c.ACMEEmail, "acme-email", "", "ACME account contact e-mail")
	fs.BoolVar(&c.ACMEIPCerts, "acme-ip-certs", false, "with -certmode=letsencrypt and an IP -hostname: obtain a CA-issued certificate for that address (ACME IP identifier, the CA's short-lived profile), renewed when a third of its life is left")
	fs.StringVar(&c.EABKeyID, "acme-eab-kid", "", "ACME External Account Binding key ID")
	fs.StringVar(&c.EABKey, "acme-eab-key", "", "ACME External Account Binding HMAC key (base64url)")
	fs.StringVar(&c.Home, "home", "", "root page: empty for the built-in page, 'blank' for an empty page, or an http(s) URL to redirect to")
	fs.StringVar(&c.MeshPSKFile, "mesh-psk-file", "", "file holding the region's mesh key (64 hex digits)")
	fs.Func("mesh-with", "comma-separated mesh peers: host, host/dialhost, or a URL such as http://127.0.0.1:3341/derp", func(s string) error {
		c.MeshWith = splitList(s)
		return nil
	})
	fs.Func("bootstrap-dns-names", "comma-separated host names resolved every 10 minutes and served at /bootstrap-dns, for clients whose DNS fails", func(s string) error {
		c.BootstrapDNSNames = splitList(s)
		return nil
	})
	fs.Func("unpublished-bootstrap-dns-names", "comma-separated names served at /bootstrap-dns only when asked for (?q=name): name, or name/txtname to answer the share of clients given by txtname's TXT record (0-100)", func(s string) error {
		c.UnpublishedBootstrapDNSNames = splitList(s)
		return nil
	})
	fs.StringVar(&c.RateConfigFile, "rate-config", "", `JSON file with derper's per-client receive limit, {"PerClientRateLimitBytesPerSec":N,"PerClientRateBurstBytes":M} (N 0: no limit); re-read on SIGHUP`)
	fs.BoolVar(&c.VerifyClients, "verify-clients", false, "admit only clients whose node key the local tailscaled knows (this node or a peer in its network map), asked over its LocalAPI socket")
	fs.StringVar(&c.TailscaledSocket, "socket", "", "tailscaled's LocalAPI socket for -verify-clients (empty: /var/run/tailscale/tailscaled.sock)")
	fs.StringVar(&c.VerifyClientURL, "verify-client-url", "", "admission webhook URL: each client's key and IP are POSTed as derper does, and only a 200 answer of {\"Allow\":true} admits it")
	fs.BoolVar(&c.VerifyClientURLFailOpen, "verify-client-url-fail-open", true, "admit clients while the admission webhook cannot be reached (a reachable webhook's refusal always refuses)")
	fs.Float64Var(&c.AcceptLimit, "accept-connection-limit", math.Inf(1), "accepted connections per second allowed (+Inf: no limit)")
	fs.IntVar(&c.AcceptBurst, "accept-connection-burst", math.MaxInt, "burst for -accept-connection-limit")
	fs.DurationVar(&c.TCPKeepAlive, "tcp-keepalive-time", 10*time.Minute, "TCP keepalive idle time")
	fs.DurationVar(&c.TCPUserTimeout, "tcp-user-timeout", 15*time.Second, "TCP_USER_TIMEOUT for client connections")
	fs.DurationVar(&c.TCPWriteTimeout, "tcp-write-timeout", DefaultWriteWait, "per-write deadline for non-mesh clients (0 disables)")
	fs.Func("metrics-allow", "comma-separated CIDRs allowed to read /metrics and /debug/varz besides loopback", func(s string) error {
		p, err := parsePrefixes(s)
		if err != nil {
			return err
		}
		c.MetricsAllow = p
		return nil
	})
	fs.IntVar(&c.STUNSockets, "stun-sockets", 0, "SO_REUSEPORT STUN sockets per address (0: one per CPU)")
	fs.StringVar(&c.XDP, "xdp", XDPAuto, "XDP fast path: auto (attach when privileges and kernel allow), driver, generic, off")
	fs.StringVar(&c.XDPIface, "xdp-iface", "", "interface to attach XDP to (default: the default route's, or lo when -a is on loopback)")
	fs.StringVar(&c.XDPPinRoot, "xdp-pin-dir", DefaultPinRoot, "bpffs directory for the pinned program, link and maps")
	fs.BoolVar(&c.XDPDropSTUN, "xdp-drop-stun", false, "drop every STUN packet in XDP (maintenance)")
	fs.BoolVar(&c.XDPDetach, "xdp-detach", false, "detach and unpin the XDP program from -xdp-iface, then exit")
	fs.Uint64Var(&c.Shaping.PacketsPerSec, "shape-pps", 0, "inbound TCP packets/s allowed per source to the DERP ports (0: unlimited)")
	fs.Uint64Var(&c.Shaping.PacketBurst, "shape-pps-burst", 0, "burst for -shape-pps (0: a tenth of a second's worth)")
	fs.Uint64Var(&c.Shaping.BytesPerSec, "shape-bps", 0, "inbound TCP bytes/s allowed per source to the DERP ports (0: unlimited)")
	fs.Uint64Var(&c.Shaping.ByteBurst, "shape-bps-burst", 0, "burst for -shape-bps in bytes (0: a tenth of a second's worth)")
	fs.Uint64Var(&c.Shaping.SYNPerSec, "shape-syn-pps", 0, "new TCP connections (SYN) per second allowed per source (0: unlimited)")
	fs.Uint64Var(&c.Shaping.SYNBurst, "shape-syn-burst", 0, "burst for -shape-syn-pps (0: a tenth of a second's worth)")
	fs.Uint64Var(&c.Shaping.STUNPerSec, "shape-stun-pps", 0, "STUN requests/s allowed per source (0, the default: STUN is never shaped)")
	fs.Uint64Var(&c.Shaping.STUNBurst, "shape-stun-burst", 0, "burst for -shape-stun-pps (0: a tenth of a second's worth)")
	fs.Func("shape-exempt", "comma-separated CIDRs never shaped (monitoring, operators; mesh peers are exempt automatically)", func(s string) error {
		p, err := parsePrefixes(s)
		if err != nil {
			return err
		}
		c.Shaping.Exempt = p
		return nil
	})
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&c.File, "config", "", "file of flag settings, one 'name value' per line ('#' comments), applied before the command line and re-read on SIGHUP")
	fs.BoolVar(&c.PrintDERPMap, "print-derpmap", false, "print this node's DERP map entry as JSON and exit")
	return fs
}

// Parse parses args (without the program name) and validates the result.
func Parse(args []string, out io.Writer) (*Config, error) {
	if err := rejectDerperOnly(args); err != nil {
		return nil, err
	}
	c := new(Config)
	fs := NewFlagSet(c, out)
	if path := configFileArg(args); path != "" {
		if err := applyFile(fs, path); err != nil {
			return nil, err
		}
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q (flags start with -)", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if c.Dev {
		if !set["a"] {
			c.Addr = DevAddr
		}
		if !set["http-port"] {
			c.HTTPPort = -1
		}
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// Validate checks every field and returns the first problem, naming its flag.
func (c *Config) Validate() error {
	host, port, err := net.SplitHostPort(c.Addr)
	if err != nil {
		return fieldErr("a", "%q is not host:port: %v", c.Addr, err)
	}
	if host != "" {
		if _, err := netip.ParseAddr(strings.Trim(host, "[]")); err != nil && host != "localhost" {
			return fieldErr("a", "host %q is not an IP address (use an IP, or leave it empty for all addresses)", host)
		}
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fieldErr("a", "bad port %q", port)
	}
	if c.HTTPPort != -1 && (c.HTTPPort < 0 || c.HTTPPort > 65535) {
		return fieldErr("http-port", "%d is not a port (0-65535, or -1 to disable)", c.HTTPPort)
	}
	if c.STUNPort < 0 || c.STUNPort > 65535 {
		return fieldErr("stun-port", "%d is not a port (0-65535)", c.STUNPort)
	}
	if !c.RunDERP && !c.RunSTUN && c.XDP == XDPOff {
		return fieldErr("derp", "nothing to serve: -derp=false, -stun=false and -xdp=off")
	}
	switch c.CertMode {
	case "letsencrypt", "manual":
	case "gcp":
		return fieldErr("certmode", "gcp is not supported: use -certmode=letsencrypt with -acme-directory, -acme-eab-kid and -acme-eab-key")
	default:
		return fieldErr("certmode", "%q is not a certificate mode (letsencrypt or manual)", c.CertMode)
	}
	// -version and -xdp-detach only act and exit: nothing is served, so the
	// serving settings need no checking.
	if c.TLS() && !c.XDPDetach && !c.PrintVersion {
		if c.Hostname == "" {
			return fieldErr("hostname", "required when serving TLS (-a port 443 or -certmode=manual)")
		}
		if c.CertDir == "" {
			return fieldErr("certdir", "required when serving TLS")
		}
		if c.CertMode == "letsencrypt" {
			_, err := netip.ParseAddr(c.Hostname)
			switch isIP := err == nil; {
			case isIP && !c.ACMEIPCerts:
				return fieldErr("hostname", "%q is an IP address; ACME certificates for an IP need -acme-ip-certs (or use -certmode=manual for a self-signed IP certificate)", c.Hostname)
			case !isIP && c.ACMEIPCerts:
				return fieldErr("acme-ip-certs", "needs -hostname to be this node's IP address (a DNS name gets its certificate without the flag)")
			}
		}
	}
	if c.ACMEIPCerts && c.CertMode != "letsencrypt" {
		return fieldErr("acme-ip-certs", "needs -certmode=letsencrypt")
	}
	if c.ACMEDirectory != "" {
		u, err := url.Parse(c.ACMEDirectory)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return fieldErr("acme-directory", "%q is not an http(s) URL", c.ACMEDirectory)
		}
	}
	if (c.EABKeyID == "") != (c.EABKey == "") {
		return fieldErr("acme-eab-kid", "-acme-eab-kid and -acme-eab-key go together")
	}
	switch {
	case c.Home == "", c.Home == "blank":
	case strings.HasPrefix(c.Home, "http://"), strings.HasPrefix(c.Home, "https://"):
		if _, err := url.Parse(c.Home); err != nil {
			return fieldErr("home", "%q is not a URL: %v", c.Home, err)
		}
	default:
		return fieldErr("home", "%q is not empty, 'blank' or an http(s) URL", c.Home)
	}
	for _, n := range c.BootstrapDNSNames {
		if !isHostName(n) {
			return fieldErr("bootstrap-dns-names", "%q is not a host name", n)
		}
	}
	for _, e := range c.UnpublishedBootstrapDNSNames {
		name, txt, hasTXT := strings.Cut(e, "/")
		if !isHostName(name) || hasTXT && !isHostName(txt) {
			return fieldErr("unpublished-bootstrap-dns-names", "%q is not a host name or name/txtname", e)
		}
	}
	if c.VerifyClientURL != "" {
		u, err := url.Parse(c.VerifyClientURL)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return fieldErr("verify-client-url", "%q is not an http(s) URL", c.VerifyClientURL)
		}
	}
	if len(c.MeshWith) > 0 && c.MeshPSKFile == "" {
		return fieldErr("mesh-with", "needs a mesh key (-mesh-psk-file)")
	}
	if c.RateConfigFile != "" {
		rl, err := ReadRateConfig(c.RateConfigFile)
		if err != nil {
			return fieldErr("rate-config", "%v", err)
		}
		c.RateLimit = rl
	}
	if c.MeshPSKFile != "" {
		if _, err := ReadMeshKey(c.MeshPSKFile); err != nil {
			return fieldErr("mesh-psk-file", "%v", err)
		}
	}
	if c.AcceptLimit <= 0 || math.IsNaN(c.AcceptLimit) {
		return fieldErr("accept-connection-limit", "must be positive (+Inf for no limit)")
	}
	if c.AcceptBurst < 1 {
		return fieldErr("accept-connection-burst", "must be at least 1")
	}
	if c.TCPKeepAlive < 0 {
		return fieldErr("tcp-keepalive-time", "must not be negative")
	}
	if c.TCPUserTimeout < 0 {
		return fieldErr("tcp-user-timeout", "must not be negative")
	}
	if c.TCPWriteTimeout < 0 {
		return fieldErr("tcp-write-timeout", "must not be negative (0 disables)")
	}
	if c.STUNSockets < 0 || c.STUNSockets > 256 {
		return fieldErr("stun-sockets", "%d is out of range (0-256)", c.STUNSockets)
	}
	switch c.XDP {
	case XDPAuto, XDPDriver, XDPGeneric, XDPOff:
	default:
		return fieldErr("xdp", "%q is not auto, driver, generic or off", c.XDP)
	}
	if c.XDPIface != "" && (len(c.XDPIface) > 15 || strings.ContainsAny(c.XDPIface, "/ \t")) {
		return fieldErr("xdp-iface", "%q is not an interface name", c.XDPIface)
	}
	if c.XDPPinRoot == "" {
		return fieldErr("xdp-pin-dir", "must not be empty")
	}
	sh := c.Shaping
	for _, b := range []struct {
		burst, rate       uint64
		burstFlag, rateFl string
	}{
		{sh.PacketBurst, sh.PacketsPerSec, "shape-pps-burst", "shape-pps"},
		{sh.ByteBurst, sh.BytesPerSec, "shape-bps-burst", "shape-bps"},
		{sh.SYNBurst, sh.SYNPerSec, "shape-syn-burst", "shape-syn-pps"},
		{sh.STUNBurst, sh.STUNPerSec, "shape-stun-burst", "shape-stun-pps"},
	} {
		if b.burst > 0 && b.rate == 0 {
			return fieldErr(b.burstFlag, "set without -%s", b.rateFl)
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fieldErr("log-level", "%q is not debug, info, warn or error", c.LogLevel)
	}
	return nil
}

// TLS reports whether the main listener serves TLS (derper's rule: port 443,
// or -certmode=manual).
func (c *Config) TLS() bool {
	_, port, _ := net.SplitHostPort(c.Addr)
	return port == "443" || port == "https" || c.CertMode == "manual" && !c.Dev
}

// ListenHost returns the IP part of Addr ("" for all addresses).
func (c *Config) ListenHost() string {
	host, _, _ := net.SplitHostPort(c.Addr)
	return host
}

// STUNAddr returns the UDP address the STUN server binds.
func (c *Config) STUNAddr() string {
	return net.JoinHostPort(c.ListenHost(), strconv.Itoa(c.STUNPort))
}

// HTTPAddr returns the plain-HTTP address served alongside TLS, or "" if none.
func (c *Config) HTTPAddr() string {
	if !c.TLS() || c.HTTPPort < 0 {
		return ""
	}
	return net.JoinHostPort(c.ListenHost(), strconv.Itoa(c.HTTPPort))
}

// ReadMeshKey reads a mesh key file: 64 hex digits, surrounding white space ignored.
func ReadMeshKey(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	k := strings.TrimSpace(string(b))
	if len(k) != 64 {
		return "", fmt.Errorf("%s: mesh key must be 64 hex digits, got %d characters", path, len(k))
	}
	for _, r := range k {
		if !strings.ContainsRune("0123456789abcdefABCDEF", r) {
			return "", fmt.Errorf("%s: mesh key must be 64 hex digits, found %q", path, r)
		}
	}
	return strings.ToLower(k), nil
}

// isHostName reports whether n can be looked up as a DNS name.
func isHostName(n string) bool {
	return !strings.ContainsAny(n, "/: \t") && strings.Trim(n, ".") != ""
}

// RateLimit is the per-client receive limit of -rate-config.
type RateLimit struct {
	BytesPerSec uint64 // 0: no limit
	BurstBytes  uint64 // bucket size; raised to one maximum frame
}

// ReadRateConfig reads derper's rate file. Unlike derper, a field it does
// not know is an error: a misspelt name would otherwise silently mean no
// limit.
func ReadRateConfig(path string) (RateLimit, error) {
	f, err := os.Open(path)
	if err != nil {
		return RateLimit{}, err
	}
	defer f.Close()
	var rc struct {
		PerClientRateLimitBytesPerSec uint64
		PerClientRateBurstBytes       uint64
	}
	dec := json.NewDecoder(io.LimitReader(f, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rc); err != nil {
		return RateLimit{}, fmt.Errorf("%s: %w", path, err)
	}
	if dec.More() {
		return RateLimit{}, fmt.Errorf("%s: more than one JSON object", path)
	}
	return RateLimit{BytesPerSec: rc.PerClientRateLimitBytesPerSec, BurstBytes: rc.PerClientRateBurstBytes}, nil
}

// derperOnly lists derper flags xderp does not implement, with the reason,
// so a derper command line that relies on one fails with a clear message.
var derperOnly = map[string]string{
	"secrets-url":         "use -mesh-psk-file for the mesh key",
	"secrets-path-prefix": "use -mesh-psk-file for the mesh key",
	"secrets-cache-dir":   "use -mesh-psk-file for the mesh key",
	"ace":                 "the CONNECT proxy is not supported",
}

func rejectDerperOnly(args []string) error {
	for _, a := range args {
		if a == "--" {
			break
		}
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if why, ok := derperOnly[name]; ok {
			return fieldErr(name, "derper's flag is not supported by xderp: %s", why)
		}
	}
	return nil
}

// configFileArg finds -config in args without parsing the rest.
func configFileArg(args []string) string {
	for i, a := range args {
		if a == "--" {
			break
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "config" {
			continue
		}
		if hasVal {
			return val
		}
		if i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// applyFile sets flags from a file of "name value" (or "name = value")
// lines. Errors name the file, the line and the flag.
func applyFile(fs *flag.FlagSet, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fieldErr("config", "%v", err)
	}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		var name, val string
		if n, v, ok := strings.Cut(line, "="); ok && len(strings.Fields(n)) == 1 {
			name, val = n, v // name = value
		} else if f := strings.Fields(line); len(f) > 0 {
			name, val = f[0], strings.TrimSpace(strings.TrimPrefix(line, f[0])) // name value
		}
		name = strings.TrimLeft(strings.TrimSpace(name), "-")
		val = strings.Trim(strings.TrimSpace(val), `"`)
		if name == "config" {
			return fieldErr("config", "%s:%d: a configuration file cannot name another", path, i+1)
		}
		f := fs.Lookup(name)
		if f == nil {
			return fieldErr("config", "%s:%d: unknown setting %q", path, i+1, name)
		}
		if val == "" {
			if _, isBool := f.Value.(interface{ IsBoolFlag() bool }); isBool {
				val = "true"
			}
		}
		if err := fs.Set(name, val); err != nil {
			return fieldErr(name, "%s:%d: %v", path, i+1, err)
		}
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func parsePrefixes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range splitList(s) {
		p, err := netip.ParsePrefix(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return nil, errors.New("bad CIDR " + strconv.Quote(f))
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		out = append(out, p.Masked())
	}
	return out, nil
}
