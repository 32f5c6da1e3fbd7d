// Package bpf holds xderp's XDP program: the C source (xderp.c), the ABI
// header shared with Go (xderp.h), and the bpf2go output committed next to
// them (xderp_bpfel.go/.o, xderp_bpfeb.go/.o), so building needs no clang.
// Only the loader package imports it.
package bpf

import _ "embed"

// Header is the ABI header (xderp.h), so that tests can check the Go label
// tables against its enums wherever the test binary runs.
//
//go:embed xderp.h
var Header string

//go:generate go tool bpf2go -tags linux -cc clang-14 -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type xderp_bucket -type xderp_counter -type xderp_lpm_v4 -type xderp_lpm_v6 -type xderp_af -type xderp_verdict -type xderp_reason Xderp xderp.c
