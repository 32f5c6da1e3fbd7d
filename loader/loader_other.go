//go:build !linux

package loader

// XDP is an attached program; unavailable on this platform.
type XDP struct{}

// Attach returns ErrUnsupported.
func Attach(iface string, mode Mode, cfg Config, pinDir string) (*XDP, error) {
	return nil, ErrUnsupported
}

// Detach returns ErrUnsupported.
func Detach(iface, pinDir string) error { return ErrUnsupported }

// Mode returns ModeAuto.
func (x *XDP) Mode() Mode { return ModeAuto }

// Counters returns ErrUnsupported.
func (x *XDP) Counters() ([]Counter, error) { return nil, ErrUnsupported }

// Update returns ErrUnsupported.
func (x *XDP) Update(cfg Config) error { return ErrUnsupported }

// ShapingOccupancy returns ErrUnsupported.
func (x *XDP) ShapingOccupancy() (v4, v6 int, err error) { return 0, 0, ErrUnsupported }

// Close returns nil.
func (x *XDP) Close() error { return nil }

func (x *XDP) Check() error { return ErrUnsupported }
