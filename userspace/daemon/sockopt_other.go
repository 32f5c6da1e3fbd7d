//go:build !linux

package daemon

import (
	"syscall"
	"time"
)

type syscallRawConn = syscall.RawConn

func setUserTimeout(c syscall.RawConn, d time.Duration) error { return nil }

func openFDs() float64 { return 0 }

func residentBytes() float64 { return 0 }

func virtualBytes() float64 { return 0 }

func cpuSeconds() float64 { return 0 }

func maxFDs() float64 { return 0 }
