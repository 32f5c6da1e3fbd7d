package daemon

import (
	"fmt"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// defaultRouteIface returns the interface of the IPv4 (else IPv6) default route.
func defaultRouteIface() (string, error) {
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return "", fmt.Errorf("list routes: %w", err)
		}
		for _, r := range routes {
			if r.Dst == nil || r.Dst.IP.IsUnspecified() {
				if r.LinkIndex == 0 {
					continue
				}
				l, err := netlink.LinkByIndex(r.LinkIndex)
				if err != nil {
					return "", fmt.Errorf("default route link %d: %w", r.LinkIndex, err)
				}
				return l.Attrs().Name, nil
			}
		}
	}
	return "", fmt.Errorf("no default route; name the interface with -xdp-iface")
}

// ensureBPFFS mounts a bpf filesystem on /sys/fs/bpf when the pin root lies
// under it and nothing is mounted there yet (systemd mounts it on most
// systems; minimal ones and containers may not). It needs CAP_SYS_ADMIN;
// without it the attach that follows reports the problem.
func ensureBPFFS(pinRoot string) (mounted bool, err error) {
	const base = "/sys/fs/bpf"
	if pinRoot != base && !strings.HasPrefix(pinRoot, base+"/") {
		return false, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(base, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", base, err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return false, nil
	}
	if err := unix.Mount("bpffs", base, "bpf", 0, "mode=0700"); err != nil {
		return false, fmt.Errorf("mount bpffs on %s: %w", base, err)
	}
	return true, nil
}
