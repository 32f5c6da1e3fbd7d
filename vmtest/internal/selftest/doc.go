// Package selftest holds the vmtest runner's own kernel-facing tests: a tiny
// XDP program (built with cilium/ebpf's asm package, no clang) run through
// BPF_PROG_TEST_RUN and attached to a veth pair between two fresh network
// namespaces, plus checks of the guest environment and of the kernel
// features the matrix declares. Three switches turn it into the runner's
// negative tests: XDERP_SELFTEST_BROKEN=1 loads a program the verifier
// rejects as if it were correct (the run must fail), XDERP_SELFTEST_HANG=1
// makes the binary hang (the guest must not come back in time), and
// XDERP_SELFTEST_BADSKIP=1 skips a test without naming a missing kernel
// feature (the run must fail although the binary exits 0).
package selftest
