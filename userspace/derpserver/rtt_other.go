//go:build !linux

package derpserver

import (
	"errors"
	"time"
)

// socketRTT needs TCP_INFO, which is read on Linux only; elsewhere every
// sample counts as an error.
func socketRTT(uintptr) (time.Duration, error) { return 0, errors.ErrUnsupported }
