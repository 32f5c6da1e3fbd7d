// Package loadgen holds a load generator for benchmarks, not part of the
// daemon: an XDP program (bounce.c) for the client end of a veth pair that
// turns every STUN binding response it receives back into a binding request
// (XDP_TX), so a fixed number of requests circulates between it and the
// server under test at almost no cost to the generator. The bpf2go output is
// committed next to the C source, so building needs no clang. Only the
// loader package's tests import it.
package loadgen

//go:generate go tool bpf2go -tags linux -cc clang-14 -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type stats -type tmpl Bounce bounce.c
