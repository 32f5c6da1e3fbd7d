package derpserver

import (
	"time"

	"golang.org/x/sys/unix"
)

// socketRTT returns the kernel's smoothed round-trip time of a TCP socket.
func socketRTT(fd uintptr) (time.Duration, error) {
	ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, err
	}
	return time.Duration(ti.Rtt) * time.Microsecond, nil
}
