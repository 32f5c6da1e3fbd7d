//go:build !linux

package derpserver

import (
	"errors"
	"net"
	"syscall"
)

// rawConnOf is Linux-only; elsewhere every connection uses plain reads.
func rawConnOf(net.Conn) syscall.RawConn { return nil }

func (cr *connReader) rawFill() error { return errors.ErrUnsupported }

func rawReadInto(syscall.RawConn, []byte) (int, error) { return 0, errors.ErrUnsupported }

func rawWriteNow(syscall.RawConn, []byte) (int, error) { return 0, errors.ErrUnsupported }

func rawWriteAll(syscall.RawConn, []byte) (int, error) { return 0, errors.ErrUnsupported }

func (c *probeConn) fill(func()) error { return errors.ErrUnsupported }
