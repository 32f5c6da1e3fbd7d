//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * A closed-loop STUN load generator for benchmarks, attached to the client
 * end of a veth pair. Every binding success response to one of its flows is
 * turned back into that flow's binding request (a complete frame prepared in
 * Go, checksums included, kept in the templates map) and sent again with
 * XDP_TX. A fixed number of requests, seeded once from userspace, circulates
 * between this program and whichever server answers. Per request the
 * generator does two inlined map lookups, a few compares, one helper call
 * (to grow the frame) and an 82-byte copy, so the server is the bottleneck.
 *
 * Flow i is the client UDP port cfg.base_port + i. A response is recognised
 * by the server's source port, a destination port that is a flow, the STUN
 * type, the cookie, the flow's transaction ID and its exact length (a 32-byte
 * IPv4 binding success response, as both xderp and userspace/stunserver
 * build it). IPv4 without options only.
 *
 * Loops end three ways: the stop flag (written from Go at the end of a
 * measuring window), a per-CPU budget of requests sent, or the program being
 * detached. A response the loop no longer answers is dropped (not passed),
 * so the client's stack never answers it with an ICMP error.
 *
 * Unlike xderp's program this one is written for benchmarks run as root:
 * without CAP_PERFMON the verifier refuses its packet pointer equality test
 * and the counter updates the compiler merges into one computed offset.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MAX_FLOWS 1024
#define STUN_BINDING_SUCCESS 0x0101
#define STUN_COOKIE 0x2112A442
/* Ethernet, IPv4 without options, UDP. */
#define L4_PAYLOAD (14 + 20 + 8)
/* A response: a 32-byte binding success response (XOR-MAPPED-ADDRESS, IPv4). */
#define RESP_LEN (L4_PAYLOAD + 32)
/* A request: a 40-byte Tailscale-style binding request (SOFTWARE, FINGERPRINT). */
#define REQ_LEN (L4_PAYLOAD + 40)

/* Runtime configuration (.data), written by Go before the program is attached. */
struct config {
	__u16 server_port; /* host order: the source port of responses */
	__u16 base_port;   /* host order: flow i is client port base_port + i */
	__u32 flows;       /* templates in use, at most MAX_FLOWS */
	__u64 budget;      /* requests each CPU may send; 0 = unlimited */
};

struct config bounce_cfg = {
	.server_port = 3478,
};

/* Non-zero: answer no more responses (drop them). Written from Go. */
volatile __u32 bounce_stop;

/*
 * Per-CPU counters. Every frame counts once in exactly one of seen (a
 * response of ours) and stale, bad, other; every seen frame once more in
 * exactly one of sent, stopped, over_budget, resize.
 */
struct stats {
	__u64 seen;        /* a response to one of our flows with the flow's transaction ID */
	__u64 sent;        /* turned into the flow's request: XDP_TX */
	__u64 stopped;     /* seen with the stop flag set: XDP_DROP */
	__u64 over_budget; /* seen after this CPU sent its budget: XDP_DROP */
	__u64 resize;      /* the frame could not be resized or written: XDP_DROP */
	__u64 stale;       /* from the server port to a port that is not a flow: XDP_DROP */
	__u64 bad;         /* to a flow, but not its binding success response: XDP_DROP */
	__u64 other;       /* anything else (ARP, ICMP, other traffic): XDP_PASS */
};

/* A flow's request: the whole frame, REQ_LEN bytes (then padding). */
struct tmpl {
	__u8 frame[(REQ_LEN + 7) & ~7] __attribute__((aligned(8)));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_FLOWS);
	__type(key, __u32);
	__type(value, struct tmpl);
} bounce_templates SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stats);
} bounce_stats SEC(".maps");

SEC("xdp")
int bounce_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct stats *s = bpf_map_lookup_elem(&bounce_stats, &zero);
	if (!s)
		return XDP_PASS;

	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	__u8 *m = (void *)(udp + 1);
	if ((void *)(m + 20) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP || udp->source != bpf_htons(bounce_cfg.server_port)) {
		s->other++;
		return XDP_PASS;
	}
	__u32 flow = (__u32)bpf_ntohs(udp->dest) - bounce_cfg.base_port;
	if (flow >= bounce_cfg.flows) {
		s->stale++;
		return XDP_DROP;
	}
	struct tmpl *t = bpf_map_lookup_elem(&bounce_templates, &flow);
	if (!t) {
		s->stale++;
		return XDP_DROP;
	}
	/*
	 * The transaction ID sits at the same offset in request and response;
	 * the frame must be exactly a response long.
	 */
	__u32 *want = (__u32 *)(t->frame + L4_PAYLOAD + 8);
	if (*(__u16 *)m != bpf_htons(STUN_BINDING_SUCCESS) || *(__u32 *)(m + 4) != bpf_htonl(STUN_COOKIE) ||
	    *(__u32 *)(m + 8) != want[0] || *(__u32 *)(m + 12) != want[1] || *(__u32 *)(m + 16) != want[2] ||
	    data + RESP_LEN > end || data + RESP_LEN < end) {
		s->bad++;
		return XDP_DROP;
	}
	s->seen++;
	if (bounce_stop) {
		s->stopped++;
		return XDP_DROP;
	}
	if (bounce_cfg.budget && s->sent >= bounce_cfg.budget) {
		s->over_budget++;
		return XDP_DROP;
	}
	/*
	 * The request is 8 bytes longer than the response. Grow at the back:
	 * xderp shrinks a request at the back, so the frame keeps its place in
	 * the buffer however often it goes round (growing at the front would
	 * use up the headroom in a few dozen round trips).
	 */
	if (bpf_xdp_adjust_tail(ctx, REQ_LEN - RESP_LEN)) {
		s->resize++;
		return XDP_DROP;
	}
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + REQ_LEN > end) {
		s->resize++;
		return XDP_DROP;
	}
	/* Whole words, no checksum maths: the template is complete. */
	__u64 *dst = data, *src = (__u64 *)t->frame;
#pragma unroll
	for (int i = 0; i < REQ_LEN / 8; i++)
		dst[i] = src[i];
	((__u16 *)data)[REQ_LEN / 2 - 1] = ((__u16 *)t->frame)[REQ_LEN / 2 - 1];
	s->sent++;
	return XDP_TX;
}

char _license[] SEC("license") = "Dual BSD/GPL";
