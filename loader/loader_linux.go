//go:build linux

package loader

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xderp/xderp/bpf"
)

// DefaultPinRoot is the bpffs directory under which each interface gets its
// pin directory (DefaultPinRoot/<iface>).
const DefaultPinRoot = "/sys/fs/bpf/xderp"

const linkPin = "link"

// XDP is the program attached to one interface.
type XDP struct {
	iface  string
	pinDir string
	mode   Mode
	objs   bpf.XderpObjects
	link   link.Link
}

// pinnedMaps are the maps pinned by name (LIBBPF_PIN_BY_NAME in xderp.c).
var pinnedMaps = []string{"xderp_counters", "xderp_shape_v4", "xderp_shape_v6", "xderp_exempt_v4", "xderp_exempt_v6"}

// Attach loads the program with cfg and attaches it to iface. pinDir defaults
// to DefaultPinRoot/<iface>. If a link is pinned there, its program is
// atomically replaced (link update: no packet sees no program); otherwise a
// new bpf_link is created (ModeAuto: driver mode first, generic as fallback)
// and pinned. Maps are pinned by name in pinDir and reused, so counters and
// shaping state survive restarts.
func Attach(iface string, mode Mode, cfg Config, pinDir string) (*XDP, error) {
	cfg, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	ifc, err := net.InterfaceByName(iface)
	if err != nil {
		return nil, fmt.Errorf("loader: interface %q: %w", iface, err)
	}
	if pinDir == "" {
		pinDir = filepath.Join(DefaultPinRoot, iface)
	}
	if err := ensureBPFFS(pinDir); err != nil {
		return nil, err
	}
	// A no-op on kernels that account BPF memory to the cgroup (5.11+).
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("loader: raise memlock limit: %w", err)
	}
	x := &XDP{iface: iface, pinDir: pinDir}
	if err := x.load(cfg); err != nil {
		return nil, err
	}
	if err := x.attach(ifc.Index, mode); err != nil {
		x.objs.Close()
		return nil, err
	}
	if err := x.writeExempt(cfg.Exempt); err != nil {
		x.Close()
		return nil, err
	}
	return x, nil
}

// ensureBPFFS creates dir, which must be on a bpf filesystem.
func ensureBPFFS(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("loader: pin directory: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("loader: pin directory: %w", err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("loader: pin directory %s is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)", dir)
	}
	return nil
}

func (x *XDP) load(cfg Config) error {
	spec, err := bpf.LoadXderp()
	if err != nil {
		return fmt.Errorf("loader: parse object: %w", err)
	}
	if err := spec.Variables["xderp_cfg"].Set(kernelConfig(cfg)); err != nil {
		return fmt.Errorf("loader: write config: %w", err)
	}
	// A pin left by an older, incompatible object is replaced, not reused.
	for _, name := range pinnedMaps {
		if x.pinDir == "" {
			break
		}
		p := filepath.Join(x.pinDir, name)
		m, err := ebpf.LoadPinnedMap(p, nil)
		if err != nil {
			continue
		}
		if spec.Maps[name].Compatible(m) != nil {
			os.Remove(p)
		}
		m.Close()
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: x.pinDir}}
	if x.pinDir == "" { // tests: nothing pinned
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	}
	if err := spec.LoadAndAssign(&x.objs, opts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("loader: load program: %+v", ve)
		}
		return fmt.Errorf("loader: load program: %w", err)
	}
	return nil
}

func (x *XDP) attach(ifindex int, mode Mode) error {
	lp := filepath.Join(x.pinDir, linkPin)
	if l, err := link.LoadPinnedLink(lp, nil); err == nil {
		info, ierr := l.Info()
		if ierr == nil && info.XDP() != nil && int(info.XDP().Ifindex) == ifindex {
			if err := l.Update(x.objs.XderpXdp); err == nil {
				x.link = l
				x.mode = attachedMode(ifindex)
				return nil
			}
		}
		// A defunct link (interface gone) or one for another device: start over.
		l.Unpin()
		l.Close()
	}
	var flags []link.XDPAttachFlags
	switch mode {
	case ModeAuto:
		flags = []link.XDPAttachFlags{link.XDPDriverMode, link.XDPGenericMode}
	case ModeDriver:
		flags = []link.XDPAttachFlags{link.XDPDriverMode}
	case ModeGeneric:
		flags = []link.XDPAttachFlags{link.XDPGenericMode}
	default:
		return fmt.Errorf("loader: unknown mode %v", mode)
	}
	var err error
	for _, f := range flags {
		var l link.Link
		l, err = link.AttachXDP(link.XDPOptions{Program: x.objs.XderpXdp, Interface: ifindex, Flags: f})
		if err != nil {
			continue
		}
		if err := l.Pin(lp); err != nil {
			l.Close()
			return fmt.Errorf("loader: pin link: %w", err)
		}
		x.link = l
		x.mode = ModeDriver
		if f == link.XDPGenericMode {
			x.mode = ModeGeneric
		}
		return nil
	}
	return fmt.Errorf("loader: attach to %s (%v): %w", x.iface, mode, err)
}

// attachedMode asks the kernel which mode the XDP program of ifindex uses.
func attachedMode(ifindex int) Mode {
	l, err := netlink.LinkByIndex(ifindex)
	if err == nil && l.Attrs().Xdp != nil && l.Attrs().Xdp.AttachMode == 2 /* XDP_ATTACHED_SKB */ {
		return ModeGeneric
	}
	return ModeDriver
}

// Mode returns the mode the program is attached in (driver or generic).
func (x *XDP) Mode() Mode { return x.mode }

// Counters returns the non-zero counters, each summed over the possible CPUs.
func (x *XDP) Counters() ([]Counter, error) {
	var out []Counter
	var per []bpf.XderpXderpCounter
	n := len(afLabels) * len(verdictLabels) * len(reasonLabels)
	for k := uint32(0); k < uint32(n); k++ {
		if err := x.objs.XderpCounters.Lookup(k, &per); err != nil {
			return nil, fmt.Errorf("loader: read counter %d: %w", k, err)
		}
		var c Counter
		for _, v := range per {
			c.Packets += v.Packets
			c.Bytes += v.Bytes
		}
		if c.Packets == 0 && c.Bytes == 0 {
			continue
		}
		r := int(k) % len(reasonLabels)
		v := int(k) / len(reasonLabels) % len(verdictLabels)
		a := int(k) / len(reasonLabels) / len(verdictLabels)
		c.AF, c.Verdict, c.Reason = afLabels[a], verdictLabels[v], reasonLabels[r]
		out = append(out, c)
	}
	return out, nil
}

// Update replaces the runtime configuration and the exemptions. The config
// is written while the program runs; a packet racing the write may see a mix
// of old and new rates.
func (x *XDP) Update(cfg Config) error {
	cfg, err := cfg.validate()
	if err != nil {
		return err
	}
	if err := x.objs.XderpCfg.Set(kernelConfig(cfg)); err != nil {
		return fmt.Errorf("loader: write config: %w", err)
	}
	return x.writeExempt(cfg.Exempt)
}

// writeExempt makes the exemption tries hold exactly prefixes.
func (x *XDP) writeExempt(prefixes []netip.Prefix) error {
	want4 := map[bpf.XderpXderpLpmV4]bool{}
	want6 := map[bpf.XderpXderpLpmV6]bool{}
	for _, p := range prefixes {
		p = p.Masked()
		if a := p.Addr(); a.Is4() || a.Is4In6() && p.Bits() >= 96 {
			bits := p.Bits()
			if a.Is4In6() {
				bits -= 96
			}
			want4[bpf.XderpXderpLpmV4{Prefixlen: uint32(bits), Addr: a.Unmap().As4()}] = true
		} else {
			want6[bpf.XderpXderpLpmV6{Prefixlen: uint32(p.Bits()), Addr: a.As16()}] = true
		}
	}
	if err := syncTrie(x.objs.XderpExemptV4, want4); err != nil {
		return fmt.Errorf("loader: exemptions v4: %w", err)
	}
	if err := syncTrie(x.objs.XderpExemptV6, want6); err != nil {
		return fmt.Errorf("loader: exemptions v6: %w", err)
	}
	return nil
}

func syncTrie[K comparable](m *ebpf.Map, want map[K]bool) error {
	var stale []K
	var k K
	it := m.Iterate()
	var v uint8
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return err
		}
	}
	for k := range want {
		if err := m.Put(k, uint8(1)); err != nil {
			return err
		}
	}
	return nil
}

// ShapingOccupancy returns the number of sources in the shaping tables.
func (x *XDP) ShapingOccupancy() (v4, v6 int, err error) {
	if v4, err = countKeys[uint32](x.objs.XderpShapeV4); err != nil {
		return 0, 0, fmt.Errorf("loader: shaping table v4: %w", err)
	}
	if v6, err = countKeys[uint64](x.objs.XderpShapeV6); err != nil {
		return 0, 0, fmt.Errorf("loader: shaping table v6: %w", err)
	}
	return v4, v6, nil
}

func countKeys[K any](m *ebpf.Map) (int, error) {
	var k, next K
	n := 0
	var cur any // nil: start from the first key
	for {
		if err := m.NextKey(cur, &next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, err
		}
		n++
		if n > int(m.MaxEntries()) {
			return n, nil
		}
		k = next
		cur = &k
	}
}

// Close releases the file descriptors. The pinned link keeps the program
// attached and the pinned maps keep counting.
func (x *XDP) Close() error {
	var err error
	if x.link != nil {
		err = x.link.Close()
	}
	return errors.Join(err, x.objs.Close())
}

// Detach removes the program from iface, and the link, maps and pins in
// pinDir (default DefaultPinRoot/<iface>). Missing pins are not an error.
func Detach(iface, pinDir string) error {
	if pinDir == "" {
		pinDir = filepath.Join(DefaultPinRoot, iface)
	}
	var errs []error
	lp := filepath.Join(pinDir, linkPin)
	if l, err := link.LoadPinnedLink(lp, nil); err == nil {
		errs = append(errs, l.Unpin(), l.Close())
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("loader: pinned link: %w", err))
	}
	for _, name := range pinnedMaps {
		if err := os.Remove(filepath.Join(pinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("loader: unpin %s: %w", name, err))
		}
	}
	if err := os.Remove(pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("loader: remove pin directory: %w", err))
	}
	return errors.Join(errs...)
}

// kernelConfig converts cfg (validated) into the program's config struct.
func kernelConfig(cfg Config) bpf.XderpXderpConfig {
	var k bpf.XderpXderpConfig
	copy(k.StunPorts[:], cfg.STUNPorts)
	copy(k.DerpPorts[:], cfg.DERPPorts)
	if cfg.DropSTUN {
		k.Flags |= 1
	}
	s := cfg.Shaping
	if s.Enabled() {
		k.Flags |= 2
	}
	k.PktCostNs, k.PktTauNs = gcra(s.PPS, s.Burst, 1)
	k.SynCostNs, k.SynTauNs = gcra(s.SYNPPS, s.SYNBurst, 1)
	k.StunCostNs, k.StunTauNs = gcra(s.STUNPPS, s.STUNBurst, 1)
	if s.BytesPerSec != 0 {
		burst := s.ByteBurst
		if burst == 0 {
			burst = max(s.BytesPerSec/10, 1500)
		}
		k.ByteCostFp = uint64(float64(1e9) * 65536 / float64(s.BytesPerSec))
		k.ByteTauNs = uint64(float64(burst) * 1e9 / float64(s.BytesPerSec))
	}
	return k
}

// Check reports whether this program is still the one the interface runs:
// nil, or what changed (the interface is gone, or another program, such as
// a second daemon's, replaced ours on the pinned link).
func (x *XDP) Check() error {
	if x.link == nil {
		return errors.New("loader: not attached")
	}
	info, err := x.link.Info()
	if err != nil {
		return fmt.Errorf("loader: link info: %w", err)
	}
	pi, err := x.objs.XderpXdp.Info()
	if err != nil {
		return fmt.Errorf("loader: program info: %w", err)
	}
	if id, ok := pi.ID(); ok && info.Program != id {
		return fmt.Errorf("loader: another program (id %d) replaced this daemon's (id %d) on %s", info.Program, id, x.iface)
	}
	if xi := info.XDP(); xi == nil || xi.Ifindex == 0 {
		return fmt.Errorf("loader: the program is no longer attached to %s (interface removed?)", x.iface)
	}
	return nil
}
