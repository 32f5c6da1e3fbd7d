package daemon

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"

	"github.com/xderp/xderp/loader"
	"github.com/xderp/xderp/userspace/config"
	"github.com/xderp/xderp/userspace/metrics"
)

// startXDP attaches (or adopts) the XDP fast path. Under -xdp=auto a failure
// is one log line and STUN stays with the userspace server; an explicit mode
// that cannot be had is an error.
func (d *Daemon) startXDP() error {
	cfg := d.cfg
	if cfg.XDP == config.XDPOff {
		d.log.Info("XDP fast path off (-xdp=off): STUN is answered by the userspace server")
		return nil
	}
	iface, err := xdpIface(cfg)
	if err != nil {
		return d.xdpUnavailable(fmt.Errorf("-xdp-iface: %w", err))
	}
	if mounted, err := ensureBPFFS(cfg.XDPPinRoot); err != nil {
		return d.xdpUnavailable(err)
	} else if mounted {
		d.log.Info("mounted a bpf filesystem on /sys/fs/bpf for the pinned XDP program")
	}
	mode, err := loader.ParseMode(cfg.XDP)
	if err != nil {
		return fmt.Errorf("-xdp: %w", err)
	}
	x, err := loader.Attach(iface, mode, d.loaderConfig(), pinDir(cfg, iface))
	if err != nil {
		return d.xdpUnavailable(fmt.Errorf("attach to %s: %w", iface, err))
	}
	d.xdpIface = iface
	d.xdpp.Store(x)
	d.log.Info("XDP fast path attached: STUN answered in the kernel", "iface", iface, "mode", x.Mode().String(),
		"shaping", cfg.Shaping.Enabled(), "drop_stun", cfg.XDPDropSTUN)
	return nil
}

func (d *Daemon) xdpUnavailable(err error) error {
	if d.cfg.XDP != config.XDPAuto {
		return fmt.Errorf("-xdp=%s: %w", d.cfg.XDP, err)
	}
	d.log.Warn("XDP fast path unavailable, STUN is answered by the userspace server (needs CAP_BPF, CAP_NET_ADMIN and a kernel with XDP; -xdp=off silences this)", "reason", err.Error())
	return nil
}

func pinDir(cfg *config.Config, iface string) string { return filepath.Join(cfg.XDPPinRoot, iface) }

// xdpIface picks the interface: -xdp-iface, else lo when the relay listens on
// loopback only, else the interface of the default route.
func xdpIface(cfg *config.Config) (string, error) {
	if cfg.XDPIface != "" {
		return cfg.XDPIface, nil
	}
	if a, err := netip.ParseAddr(cfg.ListenHost()); err == nil && a.IsLoopback() {
		return loopbackName()
	}
	return defaultRouteIface()
}

func loopbackName() (string, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return "", err
	}
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback != 0 {
			return i.Name, nil
		}
	}
	return "", fmt.Errorf("no loopback interface")
}

// loaderConfig turns the daemon configuration into the program's.
func (d *Daemon) loaderConfig() loader.Config {
	cfg := d.cfg
	lc := loader.Config{
		STUNPorts: []uint16{uint16(cfg.STUNPort)},
		DropSTUN:  cfg.XDPDropSTUN,
		Shaping: loader.Shaping{
			PPS: cfg.Shaping.PacketsPerSec, Burst: cfg.Shaping.PacketBurst,
			BytesPerSec: cfg.Shaping.BytesPerSec, ByteBurst: cfg.Shaping.ByteBurst,
			SYNPPS: cfg.Shaping.SYNPerSec, SYNBurst: cfg.Shaping.SYNBurst,
			STUNPPS: cfg.Shaping.STUNPerSec, STUNBurst: cfg.Shaping.STUNBurst,
		},
		Exempt: append([]netip.Prefix(nil), cfg.Shaping.Exempt...),
	}
	if cfg.STUNPort == 0 {
		lc.STUNPorts = nil // the program's default
	}
	if _, port, err := net.SplitHostPort(cfg.Addr); err == nil {
		if p, err := net.LookupPort("tcp", port); err == nil && p > 0 {
			lc.DERPPorts = append(lc.DERPPorts, uint16(p))
		}
	}
	if cfg.HTTPAddr() != "" && cfg.HTTPPort > 0 {
		lc.DERPPorts = append(lc.DERPPorts, uint16(cfg.HTTPPort))
	}
	for _, a := range d.meshPeerAddrs() {
		lc.Exempt = append(lc.Exempt, netip.PrefixFrom(a, a.BitLen()))
	}
	return lc
}

// registerXDPMetrics exposes the program's per-CPU counters, read at scrape
// time from the (pinned) maps, so they survive daemon restarts.
func (d *Daemon) registerXDPMetrics() {
	r := d.reg
	read := func(bytes bool) func() []metrics.Sample {
		return func() []metrics.Sample {
			if d.xdpNow() == nil {
				return nil
			}
			cs, err := d.xdpNow().Counters()
			if err != nil {
				return nil
			}
			out := make([]metrics.Sample, 0, len(cs))
			for _, c := range cs {
				v := c.Packets
				if bytes {
					v = c.Bytes
				}
				out = append(out, metrics.Sample{Labels: []string{c.AF, c.Verdict, c.Reason}, Value: float64(v)})
			}
			return out
		}
	}
	r.Register("xderp_xdp_packets_total", "Packets seen by the XDP program, by address family, verdict and reason.", metrics.KindCounter, []string{"af", "verdict", "reason"}, read(false))
	r.Register("xderp_xdp_bytes_total", "Bytes seen by the XDP program (frame length after processing), by address family, verdict and reason.", metrics.KindCounter, []string{"af", "verdict", "reason"}, read(true))
	r.Register("xderp_xdp_attached", "1 when the XDP program is attached, labelled with the interface and the mode actually used.", metrics.KindGauge, []string{"iface", "mode"}, func() []metrics.Sample {
		if d.xdpNow() == nil {
			return []metrics.Sample{{Labels: []string{"", "off"}, Value: 0}}
		}
		return []metrics.Sample{{Labels: []string{d.xdpIface, d.xdpNow().Mode().String()}, Value: 1}}
	})
	r.Register("xderp_xdp_shaping_sources", "Sources currently tracked in the XDP shaping tables, by address family.", metrics.KindGauge, []string{"af"}, func() []metrics.Sample {
		if d.xdpNow() == nil {
			return nil
		}
		v4, v6, err := d.xdpNow().ShapingOccupancy()
		if err != nil {
			return nil
		}
		return []metrics.Sample{{Labels: []string{"ipv4"}, Value: float64(v4)}, {Labels: []string{"ipv6"}, Value: float64(v6)}}
	})
}

// DetachXDP removes the pinned program from the configured interface (-xdp-detach).
func DetachXDP(cfg *config.Config) (string, error) {
	iface, err := xdpIface(cfg)
	if err != nil {
		return "", err
	}
	if err := loader.Detach(iface, pinDir(cfg, iface)); err != nil {
		return iface, err
	}
	return iface, nil
}
