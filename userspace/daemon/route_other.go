//go:build !linux

package daemon

import "errors"

func defaultRouteIface() (string, error) {
	return "", errors.New("default route lookup is only supported on linux")
}

func ensureBPFFS(pinRoot string) (bool, error) { return false, nil }
