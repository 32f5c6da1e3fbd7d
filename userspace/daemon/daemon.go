// Package daemon owns xderpd's wiring and lifecycle: it loads the server key,
// opens the listeners, builds the HTTP mux around the relay core, starts the
// userspace STUN server, exposes /metrics, and shuts everything down in order
// on a signal. It is the only package in userspace/ that logs on its own
// behalf and the only one that talks to the XDP loader.
package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xderp/xderp/loader"
	"github.com/xderp/xderp/userspace/certs"
	"github.com/xderp/xderp/userspace/config"
	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/derpserver"
	"github.com/xderp/xderp/userspace/mesh"
	"github.com/xderp/xderp/userspace/metrics"
	"github.com/xderp/xderp/userspace/stunserver"
)

// Version is the daemon's version, set at build time with
// -ldflags "-X github.com/xderp/xderp/userspace/daemon.Version=...".
var Version = "dev"

// Daemon is a running xderpd.
type Daemon struct {
	cfg     *config.Config
	log     *slog.Logger
	reg     *metrics.Registry
	key     derp.PrivateKey
	derp    *derpserver.Server
	stun    *stunserver.Server
	tlsConf *tls.Config
	certs   *certs.Provider
	mesh    *mesh.Mesh
	// bootstrap serves /bootstrap-dns (-bootstrap-dns-names).
	bootstrap *bootstrapDNS
	// tailscaled is the -verify-clients check (nil without it).
	tailscaled *tailscaledCheck

	// ctx lives as long as the daemon; Shutdown cancels it.
	ctx    context.Context
	cancel context.CancelFunc

	metricsAllow atomic.Pointer[[]netip.Prefix]
	reloadMu     sync.Mutex // serialises XDP configuration updates

	// xdpp is the attached program (nil without one). It is published
	// once, during Start, while requests may already be served.
	xdpp     atomic.Pointer[loader.XDP]
	xdpIface string // set before xdpp

	ln                 net.Listener
	accepted, rejected *metrics.Counter
	srv                *http.Server
	ln80               net.Listener
	srv80              *http.Server
	serveWG            sync.WaitGroup
	errc               chan error

	started time.Time
}

// Options carries what a caller may inject besides the configuration.
type Options struct {
	// Logger receives the daemon's logs (nil: slog.Default()).
	Logger *slog.Logger
	// TLSConfig, when set, is used for the main listener instead of the
	// certificates the configuration selects.
	TLSConfig *tls.Config
}

// New validates cfg, loads (or creates) the server key and builds the
// components. Nothing listens until Start.
func New(cfg *config.Config, opts Options) (*Daemon, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: opts.Logger, reg: metrics.NewRegistry(), tlsConf: opts.TLSConfig, errc: make(chan error, 4), started: time.Now()}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	if d.log == nil {
		d.log = slog.Default()
	}
	key, err := loadKey(cfg)
	if err != nil {
		return nil, err
	}
	d.key = key
	d.metricsAllow.Store(&cfg.MetricsAllow)
	d.bootstrap = newBootstrapDNS(cfg.BootstrapDNSNames, cfg.UnpublishedBootstrapDNSNames, d.log.With("component", "bootstrap-dns"), d.reg)
	if cfg.TLS() && d.tlsConf == nil {
		if d.certs, err = newCertProvider(cfg, key, d.log, d.reg); err != nil {
			return nil, err
		}
	}
	d.registerProcessMetrics()
	d.accepted = d.reg.Counter("tls_listener_accepted_connections", "Connections accepted by the main listener (within -accept-connection-limit).")
	d.rejected = d.reg.Counter("tls_listener_rejected_connections", "Connections closed at once for exceeding -accept-connection-limit.")
	d.registerXDPMetrics()
	if cfg.RunDERP {
		var meshKey string
		if cfg.MeshPSKFile != "" {
			if meshKey, err = config.ReadMeshKey(cfg.MeshPSKFile); err != nil {
				return nil, fmt.Errorf("-mesh-psk-file: %w", err)
			}
		}
		writeTimeout := cfg.TCPWriteTimeout
		if writeTimeout == 0 {
			writeTimeout = -1 // -tcp-write-timeout=0 disables the deadline
		}
		var checks []derpserver.AdmitFunc
		if cfg.VerifyClients || cfg.VerifyClientURL != "" {
			results := newAdmissionMetric(d.reg)
			alog := d.log.With("component", "admission")
			if cfg.VerifyClients {
				d.tailscaled = newTailscaledCheck(cfg.TailscaledSocket, alog, results)
				checks = append(checks, d.tailscaled.admit)
			}
			if cfg.VerifyClientURL != "" {
				checks = append(checks, newAdmission(cfg.VerifyClientURL, cfg.VerifyClientURLFailOpen, alog, results).admit)
			}
		}
		admit := chainAdmit(checks...)
		var rateLimit *derpserver.RateLimit
		if cfg.RateConfigFile != "" {
			rl := relayRateLimit(cfg)
			rateLimit = &rl
		}
		d.derp, err = derpserver.New(derpserver.Options{
			PrivateKey:   key,
			Logger:       d.log.With("component", "derp"),
			Metrics:      d.reg,
			WriteTimeout: writeTimeout,
			MeshKey:      meshKey,
			Admit:        admit,
			RateLimit:    rateLimit,
		})
		if err != nil {
			return nil, fmt.Errorf("derp server: %w", err)
		}
		if len(cfg.MeshWith) > 0 {
			d.mesh, err = mesh.New(mesh.Options{
				Server:     d.derp,
				PrivateKey: key,
				MeshKey:    meshKey,
				Peers:      cfg.MeshWith,
				Logger:     d.log.With("component", "mesh"),
				Metrics:    d.reg,
			})
			if err != nil {
				return nil, fmt.Errorf("-mesh-with: %w", err)
			}
		}
	}
	if cfg.RunSTUN {
		d.stun = stunserver.New(stunserver.Options{Metrics: d.reg})
	}
	return d, nil
}

func loadKey(cfg *config.Config) (derp.PrivateKey, error) {
	path := cfg.KeyFile
	if path == "" {
		if cfg.Dev {
			return derp.NewPrivateKey()
		}
		path = config.DefaultKeyPath
	}
	k, err := derp.LoadOrCreateKeyFile(path)
	if err != nil {
		return derp.PrivateKey{}, fmt.Errorf("-c: %w", err)
	}
	return k, nil
}

// PublicKey returns the server's public key.
func (d *Daemon) PublicKey() derp.PublicKey { return d.key.Public() }

// Metrics returns the daemon's metrics registry.
func (d *Daemon) Metrics() *metrics.Registry { return d.reg }

// Addr returns the main listener's address (after Start).
func (d *Daemon) Addr() net.Addr { return d.ln.Addr() }

// STUNAddr returns the STUN server's address (after Start), or "" if off.
func (d *Daemon) STUNAddr() string {
	if d.stun == nil {
		return ""
	}
	return d.stun.LocalAddr().String()
}

// Start opens every listener and starts serving. On error, everything
// already opened is closed again.
func (d *Daemon) Start(ctx context.Context) (err error) {
	defer func() {
		if err != nil {
			d.Shutdown(context.Background())
		}
	}()
	cfg := d.cfg
	ln, err := listenTCP(ctx, cfg.Addr, cfg.TCPKeepAlive, cfg.TCPUserTimeout)
	if err != nil {
		return fmt.Errorf("-a: listen %s: %w", cfg.Addr, err)
	}
	d.ln = newLimitedListener(ln, cfg.AcceptLimit, cfg.AcceptBurst, d.accepted, d.rejected)
	scheme := "http"
	switch {
	case d.certs != nil:
		d.ln = d.certs.WrapListener(derpserver.TLSListener(d.ln)) // handshakes counted and bounded
		scheme = "https"
	case d.tlsConf != nil:
		d.ln = tls.NewListener(derpserver.TLSListener(d.ln), d.tlsConf)
		scheme = "https"
	}
	var handler http.Handler = d.mux()
	if scheme == "https" {
		var derpConns func(uint16) int64
		if d.derp != nil {
			derpConns = d.derp.TLSConns
		}
		handler = newTLSVersionCounts(d.reg, derpConns).wrap(handler)
	}
	d.srv = &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelDebug),
	}
	d.serve(d.srv, d.ln)
	if addr := cfg.HTTPAddr(); addr != "" && (d.certs != nil || d.tlsConf != nil) {
		if d.ln80, err = listenTCP(ctx, addr, cfg.TCPKeepAlive, cfg.TCPUserTimeout); err != nil {
			return fmt.Errorf("-http-port: listen %s: %w", addr, err)
		}
		h := port80Handler()
		if d.certs != nil {
			h = d.certs.HTTPHandler(h) // ACME HTTP-01 challenges
		}
		d.srv80 = &http.Server{Handler: h, ReadTimeout: 30 * time.Second, WriteTimeout: 5 * time.Minute,
			ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelDebug)}
		d.serve(d.srv80, d.ln80)
	}
	if d.certs != nil {
		go func() {
			if err := d.certs.Prefetch(ctx); err != nil {
				d.log.Error("certificate not obtained yet; handshakes will retry", "err", err)
			}
		}()
	}

	// The userspace STUN server first: it answers at once, while loading
	// and verifying the XDP program can take seconds on a slow box; once the
	// program is attached, it takes over whatever it fully validates.
	if cfg.RunSTUN {
		if err := d.stun.Start(ctx, cfg.STUNAddr(), cfg.STUNSockets); err != nil {
			return fmt.Errorf("-stun-port: %w", err)
		}
	}
	if err := d.startXDP(); err != nil {
		return err
	}
	if d.mesh != nil {
		d.mesh.Start(d.ctx)
		if d.xdpNow() != nil {
			go d.refreshMeshExemptions()
		}
	}
	go d.bootstrap.run(d.ctx)
	if d.tailscaled != nil {
		go d.tailscaled.logStartup(d.ctx, d.log.With("component", "admission"))
	}
	d.log.Info("xderpd serving",
		"version", Version,
		"addr", d.ln.Addr().String(), "scheme", scheme,
		"stun", d.STUNAddr(),
		"derp", cfg.RunDERP,
		"public_key", d.key.Public().String())
	notifySystemd("READY=1")
	return nil
}

func (d *Daemon) serve(srv *http.Server, ln net.Listener) {
	d.serveWG.Add(1)
	go func() {
		defer d.serveWG.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.errc <- err
		}
	}()
}

// relayRateLimit is cfg's -rate-config limit in the relay's terms.
func relayRateLimit(cfg *config.Config) derpserver.RateLimit {
	return derpserver.RateLimit{BytesPerSec: cfg.RateLimit.BytesPerSec, BurstBytes: cfg.RateLimit.BurstBytes}
}

// xdpNow returns the attached XDP program, or nil.
func (d *Daemon) xdpNow() *loader.XDP { return d.xdpp.Load() }

// Err returns a channel that receives a fatal serving error.
func (d *Daemon) Err() <-chan error { return d.errc }

func (d *Daemon) mux() *http.ServeMux {
	mux := http.NewServeMux()
	if d.derp != nil {
		mux.Handle("/derp", d.derp)
	} else {
		mux.HandleFunc("/derp", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "derp server disabled", http.StatusNotFound)
		})
	}
	mux.HandleFunc("/derp/probe", probeHandler)
	mux.HandleFunc("/derp/latency-check", probeHandler)
	mux.HandleFunc("/generate_204", generate204)
	mux.HandleFunc("/robots.txt", robots)
	mux.Handle("/bootstrap-dns", d.bootstrap)
	mux.HandleFunc("/", homeHandler(d.cfg.Home, d.cfg.RunDERP))
	mh := metricsHandler(d.reg, d.metricsAllow.Load)
	mux.Handle("/metrics", mh)
	mux.Handle("/debug/varz", mh)
	debugHandlers(mux, d.metricsAllow.Load)
	mux.HandleFunc("/debug/check", restricted(d.metricsAllow.Load, d.serveCheck))
	return mux
}

// Shutdown stops accepting, closes every client and listener, and waits for
// the serving goroutines (bounded by ctx).
func (d *Daemon) Shutdown(ctx context.Context) error {
	notifySystemd("STOPPING=1")
	d.cancel()
	var errs []error
	for _, s := range []*http.Server{d.srv, d.srv80} {
		if s != nil {
			if err := s.Shutdown(ctx); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if d.certs != nil {
		d.certs.Close()
	}
	if d.mesh != nil {
		d.mesh.Close()
	}
	if d.derp != nil {
		if err := d.derp.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if d.stun != nil {
		d.stun.Close()
	}
	if d.xdpNow() != nil {
		// Close releases our handles only: the program stays attached and
		// pinned, so STUN keeps being answered until the next start adopts it.
		// A -dev relay leaves nothing behind on the developer's machine.
		d.xdpNow().Close()
		if d.cfg.Dev {
			if err := loader.Detach(d.xdpIface, pinDir(d.cfg, d.xdpIface)); err != nil {
				errs = append(errs, err)
			}
		}
	}
	done := make(chan struct{})
	go func() { d.serveWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		errs = append(errs, ctx.Err())
	}
	return errors.Join(errs...)
}

func (d *Daemon) registerProcessMetrics() {
	r := d.reg
	r.Register("xderp_build_info", "Build information; the value is always 1.", metrics.KindGauge, []string{"version", "goversion"}, func() []metrics.Sample {
		return []metrics.Sample{{Labels: []string{Version, runtime.Version()}, Value: 1}}
	})
	start := float64(d.started.UnixNano()) / 1e9
	r.GaugeFunc("process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.", func() float64 { return start })
	r.GaugeFunc("process_resident_memory_bytes", "Resident memory size in bytes.", residentBytes)
	// The standard process collector's names, which most dashboards read.
	r.CounterFunc("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", cpuSeconds)
	r.GaugeFunc("process_virtual_memory_bytes", "Virtual memory size in bytes.", virtualBytes)
	r.GaugeFunc("process_open_fds", "Number of open file descriptors.", openFDs)
	r.GaugeFunc("process_max_fds", "Maximum number of open file descriptors.", maxFDs)
	r.GaugeFunc("derp_current_file_descriptors", "Open file descriptors of the process.", openFDs)
	r.RegisterGo()
	r.GaugeFunc("uptime_sec", "Seconds since the daemon started.", func() float64 { return time.Since(d.started).Seconds() })
}

// notifySystemd sends a state line to systemd's notify socket, if any.
func notifySystemd(state string) {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	if sock[0] == '@' {
		sock = "\x00" + sock[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return
	}
	defer c.Close()
	c.Write([]byte(state))
}

// meshPeerAddrs returns the addresses of the region's mesh peers, which are
// exempt from XDP shaping.
func (d *Daemon) meshPeerAddrs() []netip.Addr {
	if d.mesh == nil {
		return nil
	}
	return d.mesh.PeerAddrs()
}

// refreshMeshExemptions keeps the XDP exemption table in step with mesh peers
// whose DNS names resolve to new addresses.
func (d *Daemon) refreshMeshExemptions() {
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	last := fmt.Sprint(d.meshPeerAddrs())
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		now := fmt.Sprint(d.meshPeerAddrs())
		if now == last {
			continue
		}
		d.reloadMu.Lock()
		err := d.xdpNow().Update(d.loaderConfig())
		d.reloadMu.Unlock()
		if err != nil {
			d.log.Error("mesh peers changed but the XDP exemptions could not be updated", "err", err)
			continue
		}
		last = now
		d.log.Info("XDP exemptions follow the mesh peers", "peers", now)
	}
}

// Reload applies what can change without a restart (SIGHUP): the shaping
// limits, exemptions and drop-STUN switch of the XDP program, and who may
// read /metrics. Everything else in next takes effect at the next start.
func (d *Daemon) Reload(next *config.Config) {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	d.cfg.Shaping = next.Shaping
	d.cfg.XDPDropSTUN = next.XDPDropSTUN
	d.metricsAllow.Store(&next.MetricsAllow)
	applied := []string{"metrics-allow"}
	if d.certs != nil && d.cfg.CertMode == "manual" {
		if err := d.certs.Reload(); err != nil {
			d.log.Error("reload: certificate refused, the previous one stays in use", "err", err)
		} else {
			applied = append(applied, "certificate")
		}
	}
	switch {
	case d.derp != nil && d.cfg.RateConfigFile != "":
		// Parse has re-read the file; a file that no longer parses
		// refused the whole reload before this point.
		rl := d.derp.SetRateLimit(relayRateLimit(next))
		applied = append(applied, "rate-config")
		d.log.Info("reload: per-client receive limit", "bytes_per_sec", rl.BytesPerSec, "burst_bytes", rl.BurstBytes)
	case next.RateConfigFile != "":
		d.log.Warn("reload: -rate-config takes effect after a restart (the daemon started without it)")
	}
	if d.xdpNow() != nil {
		if err := d.xdpNow().Update(d.loaderConfig()); err != nil {
			d.log.Error("reload: XDP configuration refused, the previous one stays", "err", err)
		} else {
			applied = append(applied, "shaping", "shape-exempt", "xdp-drop-stun")
		}
	}
	d.log.Info("reloaded", "applied", applied, "note", "other settings take effect after a restart")
}
