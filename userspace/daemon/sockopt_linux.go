package daemon

import (
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type syscallRawConn = syscall.RawConn

func setUserTimeout(c syscall.RawConn, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	})
	if err != nil {
		return err
	}
	return serr
}

// openFDs counts the process's open file descriptors.
func openFDs() float64 {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	return float64(len(ents))
}

// residentBytes reads the process's resident set size.
func residentBytes() float64 {
	_, rss := statm()
	return float64(rss * int64(os.Getpagesize()))
}

// virtualBytes reads the process's virtual memory size.
func virtualBytes() float64 {
	size, _ := statm()
	return float64(size * int64(os.Getpagesize()))
}

// cpuSeconds returns the user and system CPU time the process has used.
func cpuSeconds() float64 {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// maxFDs returns the soft limit on open file descriptors.
func maxFDs() float64 {
	var l unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &l) != nil {
		return 0
	}
	return float64(l.Cur)
}

// statm returns the first two fields of /proc/self/statm: the virtual and
// resident sizes in pages.
func statm() (size, rss int64) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, 0
	}
	for i, f := 0, 0; i < len(b) && f < 2; i++ {
		c := b[i]
		if c == ' ' {
			f++
			continue
		}
		if c < '0' || c > '9' {
			break
		}
		if f == 0 {
			size = size*10 + int64(c-'0')
		} else {
			rss = rss*10 + int64(c-'0')
		}
	}
	return size, rss
}
