// Package loader owns every kernel object of xderp's fast path: it loads the
// XDP program from package bpf, writes its configuration, attaches it with a
// bpf_link (driver mode where possible), pins the link and maps under a bpffs
// directory per interface, adopts and atomically replaces a pinned program on
// start, reads the per-CPU counters and detaches everything on request.
//
// Only Linux is supported; elsewhere every entry point returns ErrUnsupported.
package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// ErrUnsupported is returned on platforms without XDP.
var ErrUnsupported = errors.New("loader: XDP is only supported on linux")

// Mode selects how the program is attached.
type Mode int

const (
	// ModeAuto tries driver (native) mode and falls back to generic mode.
	ModeAuto Mode = iota
	// ModeDriver attaches in the driver's receive path or fails.
	ModeDriver
	// ModeGeneric attaches after the skb is built (works on every device).
	ModeGeneric
)

func (m Mode) String() string {
	switch m {
	case ModeAuto:
		return "auto"
	case ModeDriver:
		return "driver"
	case ModeGeneric:
		return "generic"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// ParseMode parses "auto", "driver" or "generic".
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(s) {
	case "auto":
		return ModeAuto, nil
	case "driver", "native", "drv":
		return ModeDriver, nil
	case "generic", "skb":
		return ModeGeneric, nil
	}
	return 0, fmt.Errorf("loader: unknown xdp mode %q (want auto, driver or generic)", s)
}

// MaxPorts is the number of STUN and of DERP ports the program matches.
const MaxPorts = 4

// DefaultSTUNPort is the port the program answers when Config.STUNPorts is empty.
const DefaultSTUNPort = 3478

// Config is the runtime configuration of the program.
type Config struct {
	// STUNPorts are the UDP ports answered in XDP. Default [3478]; at most 4.
	STUNPorts []uint16
	// DERPPorts are the TCP ports whose inbound traffic is shaped. Default
	// none (nothing shaped); at most 4.
	DERPPorts []uint16
	// DropSTUN drops every datagram to a STUN port (maintenance). Default false.
	DropSTUN bool
	// Shaping holds the per-source limits. The zero value turns shaping off.
	Shaping Shaping
	// Exempt lists source prefixes never shaped (nor STUN-limited). At most
	// 1024 per address family.
	Exempt []netip.Prefix
}

// Shaping is the per-source inbound budget for TCP to the DERP ports (IPv4
// per address, IPv6 per /64). A zero rate means no limit of that kind; a zero
// burst means a tenth of a second's worth of the rate (at least one packet, or
// 1500 bytes). Shaping is on when any of PPS, BytesPerSec or SYNPPS is set.
type Shaping struct {
	// PPS is the packets per second a source may send. 0 = no packet limit.
	PPS uint64
	// Burst is the packets a source may send at once. Default PPS/10.
	Burst uint64
	// BytesPerSec is the frame bytes per second a source may send. 0 = no
	// byte limit.
	BytesPerSec uint64
	// ByteBurst is the frame bytes a source may send at once. Default
	// BytesPerSec/10.
	ByteBurst uint64
	// SYNPPS is the SYN (without ACK) packets per second, the rate of new
	// connections a source may open. 0 = no SYN limit. SYNs are charged to
	// this bucket only.
	SYNPPS uint64
	// SYNBurst is the SYNs a source may send at once. Default SYNPPS/10.
	SYNBurst uint64
	// STUNPPS is the STUN requests per second a source gets answered; over it
	// requests are dropped. 0 (default) = STUN never limited, as Tailscale
	// advises.
	STUNPPS uint64
	// STUNBurst is the STUN requests a source may send at once. Default STUNPPS/10.
	STUNBurst uint64
}

// Enabled reports whether any TCP limit is set.
func (s Shaping) Enabled() bool { return s.PPS != 0 || s.BytesPerSec != 0 || s.SYNPPS != 0 }

// Counter is one (address family, verdict, reason) counter summed over CPUs.
type Counter struct {
	AF, Verdict, Reason string
	Packets, Bytes      uint64
}

// Label tables, in the order of the enums in bpf/xderp.h (a test checks it).
var (
	afLabels      = []string{"unknown", "ipv4", "ipv6"}
	verdictLabels = []string{"pass", "tx", "drop", "aborted"}
	reasonLabels  = []string{
		"not_ip", "truncated", "bad_ip", "fragment", "ip_options", "ipv6_ext", "other_proto",
		"udp_other_port", "tcp_other_port", "stun_dropped", "ip_csum", "udp_len",
		"stun_not_stun", "stun_not_binding", "stun_malformed", "udp_csum", "stun_unknown_attr",
		"stun_not_tailscale", "stun_fingerprint", "stun_rate", "stun_resize", "stun_answered",
		"shaping_off", "tcp_rst", "exempt", "shape_ok", "shape_over", "syn_over", "shape_error",
		"internal",
	}
)

// Labels returns the label values of the counters' af, verdict and reason, in
// enum order (for pre-registering metric series).
func Labels() (afs, verdicts, reasons []string) {
	return append([]string(nil), afLabels...), append([]string(nil), verdictLabels...), append([]string(nil), reasonLabels...)
}

// validate checks cfg and fills in defaults.
func (cfg Config) validate() (Config, error) {
	if len(cfg.STUNPorts) == 0 {
		cfg.STUNPorts = []uint16{DefaultSTUNPort}
	}
	if len(cfg.STUNPorts) > MaxPorts {
		return cfg, fmt.Errorf("loader: STUNPorts: at most %d ports, got %d", MaxPorts, len(cfg.STUNPorts))
	}
	if len(cfg.DERPPorts) > MaxPorts {
		return cfg, fmt.Errorf("loader: DERPPorts: at most %d ports, got %d", MaxPorts, len(cfg.DERPPorts))
	}
	for _, p := range cfg.STUNPorts {
		if p == 0 {
			return cfg, errors.New("loader: STUNPorts: port 0")
		}
	}
	for _, p := range cfg.DERPPorts {
		if p == 0 {
			return cfg, errors.New("loader: DERPPorts: port 0")
		}
	}
	s := cfg.Shaping
	for _, c := range []struct {
		name        string
		rate, burst uint64
	}{{"PPS", s.PPS, s.Burst}, {"BytesPerSec", s.BytesPerSec, s.ByteBurst}, {"SYNPPS", s.SYNPPS, s.SYNBurst}, {"STUNPPS", s.STUNPPS, s.STUNBurst}} {
		if c.rate == 0 && c.burst != 0 {
			return cfg, fmt.Errorf("loader: Shaping: a burst is set for %s but the rate is 0", c.name)
		}
		if c.rate > 1e12 {
			return cfg, fmt.Errorf("loader: Shaping.%s: %d is too large", c.name, c.rate)
		}
	}
	if s.Enabled() && len(cfg.DERPPorts) == 0 {
		return cfg, errors.New("loader: Shaping: limits set but DERPPorts is empty")
	}
	for _, p := range cfg.Exempt {
		if !p.IsValid() {
			return cfg, fmt.Errorf("loader: Exempt: invalid prefix %v", p)
		}
	}
	return cfg, nil
}

// gcra converts a rate per second and a burst into GCRA cost and tolerance
// in nanoseconds; cost 0 means no limit.
func gcra(rate, burst, minBurst uint64) (cost, tau uint64) {
	if rate == 0 {
		return 0, 0
	}
	if burst == 0 {
		burst = max(rate/10, minBurst)
	}
	cost = max(uint64(1e9)/rate, 1)
	return cost, (burst - 1) * cost
}
