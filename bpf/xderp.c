//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xderp's XDP program: answers STUN binding requests in place (XDP_TX) and
 * shapes inbound TCP to the DERP ports per source (XDP_DROP over budget).
 * Everything not fully validated is XDP_PASS. Every return goes through
 * done(), which counts exactly one (af, verdict, reason).
 *
 * Constraints: loads on kernel 6.1 and on kernels without BTF and without a
 * JIT. So: no CO-RE, no kernel BTF, no bpf-to-bpf calls (everything is
 * __always_inline), only bounded loops with constant bounds.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "xderp.h"

#define STUN_HDR 20
#define STUN_MAX 256      /* stun.MaxRequestLen */
#define STUN_MAX_ATTRS 16 /* stun.MaxAttributes */
#define STUN_COOKIE 0x2112A442
#define STUN_FP_XOR 0x5354554E
#define ATTR_XOR_MAPPED 0x0020
#define ATTR_SOFTWARE 0x8022
#define ATTR_FINGERPRINT 0x8028
#define IPV6_MAX_EXT 4

/* Defaults: STUN on UDP 3478, shaping off. The loader overwrites all of it. */
struct xderp_config xderp_cfg = {
	.stun_ports = {3478, 0, 0, 0},
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDERP_AF_MAX * XDERP_VERDICT_MAX * XDERP_REASON_MAX);
	__type(key, __u32);
	__type(value, struct xderp_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} xderp_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32); /* IPv4 source address */
	__type(value, struct xderp_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} xderp_shape_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* IPv6 source /64 */
	__type(value, struct xderp_bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} xderp_shape_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__type(key, struct xderp_lpm_v4);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} xderp_exempt_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__type(key, struct xderp_lpm_v6);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} xderp_exempt_v6 SEC(".maps");

/* Force the enums and structs into BTF so bpf2go -type can export them. */
const enum xderp_af *unused_af __attribute__((unused));
const enum xderp_verdict *unused_verdict __attribute__((unused));
const enum xderp_reason *unused_reason __attribute__((unused));

static const __u32 crc_table[256] = {
	0x00000000, 0x77073096, 0xee0e612c, 0x990951ba, 0x076dc419, 0x706af48f,
	0xe963a535, 0x9e6495a3, 0x0edb8832, 0x79dcb8a4, 0xe0d5e91e, 0x97d2d988,
	0x09b64c2b, 0x7eb17cbd, 0xe7b82d07, 0x90bf1d91, 0x1db71064, 0x6ab020f2,
	0xf3b97148, 0x84be41de, 0x1adad47d, 0x6ddde4eb, 0xf4d4b551, 0x83d385c7,
	0x136c9856, 0x646ba8c0, 0xfd62f97a, 0x8a65c9ec, 0x14015c4f, 0x63066cd9,
	0xfa0f3d63, 0x8d080df5, 0x3b6e20c8, 0x4c69105e, 0xd56041e4, 0xa2677172,
	0x3c03e4d1, 0x4b04d447, 0xd20d85fd, 0xa50ab56b, 0x35b5a8fa, 0x42b2986c,
	0xdbbbc9d6, 0xacbcf940, 0x32d86ce3, 0x45df5c75, 0xdcd60dcf, 0xabd13d59,
	0x26d930ac, 0x51de003a, 0xc8d75180, 0xbfd06116, 0x21b4f4b5, 0x56b3c423,
	0xcfba9599, 0xb8bda50f, 0x2802b89e, 0x5f058808, 0xc60cd9b2, 0xb10be924,
	0x2f6f7c87, 0x58684c11, 0xc1611dab, 0xb6662d3d, 0x76dc4190, 0x01db7106,
	0x98d220bc, 0xefd5102a, 0x71b18589, 0x06b6b51f, 0x9fbfe4a5, 0xe8b8d433,
	0x7807c9a2, 0x0f00f934, 0x9609a88e, 0xe10e9818, 0x7f6a0dbb, 0x086d3d2d,
	0x91646c97, 0xe6635c01, 0x6b6b51f4, 0x1c6c6162, 0x856530d8, 0xf262004e,
	0x6c0695ed, 0x1b01a57b, 0x8208f4c1, 0xf50fc457, 0x65b0d9c6, 0x12b7e950,
	0x8bbeb8ea, 0xfcb9887c, 0x62dd1ddf, 0x15da2d49, 0x8cd37cf3, 0xfbd44c65,
	0x4db26158, 0x3ab551ce, 0xa3bc0074, 0xd4bb30e2, 0x4adfa541, 0x3dd895d7,
	0xa4d1c46d, 0xd3d6f4fb, 0x4369e96a, 0x346ed9fc, 0xad678846, 0xda60b8d0,
	0x44042d73, 0x33031de5, 0xaa0a4c5f, 0xdd0d7cc9, 0x5005713c, 0x270241aa,
	0xbe0b1010, 0xc90c2086, 0x5768b525, 0x206f85b3, 0xb966d409, 0xce61e49f,
	0x5edef90e, 0x29d9c998, 0xb0d09822, 0xc7d7a8b4, 0x59b33d17, 0x2eb40d81,
	0xb7bd5c3b, 0xc0ba6cad, 0xedb88320, 0x9abfb3b6, 0x03b6e20c, 0x74b1d29a,
	0xead54739, 0x9dd277af, 0x04db2615, 0x73dc1683, 0xe3630b12, 0x94643b84,
	0x0d6d6a3e, 0x7a6a5aa8, 0xe40ecf0b, 0x9309ff9d, 0x0a00ae27, 0x7d079eb1,
	0xf00f9344, 0x8708a3d2, 0x1e01f268, 0x6906c2fe, 0xf762575d, 0x806567cb,
	0x196c3671, 0x6e6b06e7, 0xfed41b76, 0x89d32be0, 0x10da7a5a, 0x67dd4acc,
	0xf9b9df6f, 0x8ebeeff9, 0x17b7be43, 0x60b08ed5, 0xd6d6a3e8, 0xa1d1937e,
	0x38d8c2c4, 0x4fdff252, 0xd1bb67f1, 0xa6bc5767, 0x3fb506dd, 0x48b2364b,
	0xd80d2bda, 0xaf0a1b4c, 0x36034af6, 0x41047a60, 0xdf60efc3, 0xa867df55,
	0x316e8eef, 0x4669be79, 0xcb61b38c, 0xbc66831a, 0x256fd2a0, 0x5268e236,
	0xcc0c7795, 0xbb0b4703, 0x220216b9, 0x5505262f, 0xc5ba3bbe, 0xb2bd0b28,
	0x2bb45a92, 0x5cb36a04, 0xc2d7ffa7, 0xb5d0cf31, 0x2cd99e8b, 0x5bdeae1d,
	0x9b64c2b0, 0xec63f226, 0x756aa39c, 0x026d930a, 0x9c0906a9, 0xeb0e363f,
	0x72076785, 0x05005713, 0x95bf4a82, 0xe2b87a14, 0x7bb12bae, 0x0cb61b38,
	0x92d28e9b, 0xe5d5be0d, 0x7cdcefb7, 0x0bdbdf21, 0x86d3d2d4, 0xf1d4e242,
	0x68ddb3f8, 0x1fda836e, 0x81be16cd, 0xf6b9265b, 0x6fb077e1, 0x18b74777,
	0x88085ae6, 0xff0f6a70, 0x66063bca, 0x11010b5c, 0x8f659eff, 0xf862ae69,
	0x616bffd3, 0x166ccf45, 0xa00ae278, 0xd70dd2ee, 0x4e048354, 0x3903b3c2,
	0xa7672661, 0xd06016f7, 0x4969474d, 0x3e6e77db, 0xaed16a4a, 0xd9d65adc,
	0x40df0b66, 0x37d83bf0, 0xa9bcae53, 0xdebb9ec5, 0x47b2cf7f, 0x30b5ffe9,
	0xbdbdf21c, 0xcabac28a, 0x53b39330, 0x24b4a3a6, 0xbad03605, 0xcdd70693,
	0x54de5729, 0x23d967bf, 0xb3667a2e, 0xc4614ab8, 0x5d681b02, 0x2a6f2b94,
	0xb40bbe37, 0xc30c8ea1, 0x5a05df1b, 0x2d02ef8d,
};

#ifndef barrier_var
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

static __always_inline int done(__u32 af, __u32 verdict, __u32 reason, __u64 bytes)
{
	__u32 key = (af * XDERP_VERDICT_MAX + verdict) * XDERP_REASON_MAX + reason;
	struct xderp_counter *c = bpf_map_lookup_elem(&xderp_counters, &key);
	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
	switch (verdict) {
	case XDERP_VERDICT_TX:
		return XDP_TX;
	case XDERP_VERDICT_DROP:
		return XDP_DROP;
	case XDERP_VERDICT_ABORTED:
		return XDP_ABORTED;
	default:
		return XDP_PASS;
	}
}

#define PASS(reason) done(af, XDERP_VERDICT_PASS, XDERP_REASON_##reason, len)

static __always_inline int port_in(const __u16 *ports, __u16 port)
{
	int hit = 0;
#pragma unroll
	for (int i = 0; i < XDERP_MAX_PORTS; i++)
		hit |= ports[i] != 0 && ports[i] == port;
	return hit;
}

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* GCRA: admit one unit of cost if the source is at most tau ahead of now. */
static __always_inline int gcra_ok(__u64 tat, __u64 now, __u64 tau)
{
	return tat <= now || tat - now <= tau;
}

static __always_inline __u64 gcra_next(__u64 tat, __u64 now, __u64 cost)
{
	return (tat > now ? tat : now) + cost;
}

/* Returns NULL when the bucket could not be created. */
static __always_inline struct xderp_bucket *bucket(void *map, void *key, __u64 now)
{
	struct xderp_bucket *b = bpf_map_lookup_elem(map, key);
	if (b)
		return b;
	struct xderp_bucket fresh = {now, now, now, now};
	bpf_map_update_elem(map, key, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

/*
 * Shaping of TCP to a DERP port. tcp has been bounds-checked. Order: RST is
 * never shaped, exempt prefixes pass, SYN without ACK uses only the SYN
 * bucket, every other segment the packets/s and bytes/s buckets (both must
 * admit it; only then are both charged).
 */
static __always_inline int shape_tcp(__u32 af, __u64 len, struct tcphdr *tcp, void *map,
				     void *key, void *exempt_map, void *exempt_key)
{
	volatile struct xderp_config *cfg = &xderp_cfg;
	if (!(cfg->flags & XDERP_F_SHAPING))
		return PASS(SHAPING_OFF);
	if (tcp->rst)
		return PASS(TCP_RST);
	if (bpf_map_lookup_elem(exempt_map, exempt_key))
		return PASS(EXEMPT);
	__u64 now = bpf_ktime_get_ns();
	struct xderp_bucket *b = bucket(map, key, now);
	if (!b)
		return PASS(SHAPE_ERROR);
	if (tcp->syn && !tcp->ack) {
		__u64 cost = cfg->syn_cost_ns;
		if (cost) {
			if (!gcra_ok(b->tat_syn, now, cfg->syn_tau_ns))
				return done(af, XDERP_VERDICT_DROP, XDERP_REASON_SYN_OVER, len);
			b->tat_syn = gcra_next(b->tat_syn, now, cost);
		}
		return PASS(SHAPE_OK);
	}
	__u64 pcost = cfg->pkt_cost_ns;
	__u64 bcost = (len * cfg->byte_cost_fp) >> 16;
	if ((pcost && !gcra_ok(b->tat_pkt, now, cfg->pkt_tau_ns)) ||
	    (bcost && !gcra_ok(b->tat_byte, now, cfg->byte_tau_ns)))
		return done(af, XDERP_VERDICT_DROP, XDERP_REASON_SHAPE_OVER, len);
	if (pcost)
		b->tat_pkt = gcra_next(b->tat_pkt, now, pcost);
	if (bcost)
		b->tat_byte = gcra_next(b->tat_byte, now, bcost);
	return PASS(SHAPE_OK);
}

/*
 * The STUN path after the IP and UDP headers were validated: udp_off is the
 * offset of the UDP header, n the UDP payload length (= udp.len - 8, within
 * the frame), pseudo the checksum sum of the pseudo header. Returns the
 * verdict via done().
 */
static __always_inline int stun(struct xdp_md *ctx, __u32 af, __u64 len, __u64 udp_off, __u64 n,
				 __u64 pseudo, void *shape_map, void *shape_key, void *exempt_map,
				 void *exempt_key)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	volatile struct xderp_config *cfg = &xderp_cfg;

	if (udp_off > 64)
		return PASS(TRUNCATED); /* unreachable: keeps the offset bounded */
	struct udphdr *udp = data + udp_off;
	__u8 *m = (void *)(udp + 1);
	if ((void *)(m + STUN_HDR) > end) {
		if (n < STUN_HDR)
			return PASS(STUN_NOT_STUN);
		return PASS(TRUNCATED);
	}
	/* Steps 1-3 of the acceptance rule (stun.ParseBindingRequest). */
	if (n < STUN_HDR || (m[0] & 0xc0) || *(__u32 *)(m + 4) != bpf_htonl(STUN_COOKIE))
		return PASS(STUN_NOT_STUN);
	if (*(__u16 *)m != bpf_htons(0x0001))
		return PASS(STUN_NOT_BINDING);
	if (n > STUN_MAX || bpf_ntohs(*(__u16 *)(m + 2)) != n - STUN_HDR || (n & 3))
		return PASS(STUN_MALFORMED);

	/* UDP checksum over header and payload (n <= 256, multiple of 4). */
	if (udp->check || af == XDERP_AF_IPV6) {
		if (!udp->check)
			return PASS(UDP_CSUM);
		__u64 sum = pseudo;
		__u64 words = (n + 8) / 4;
		for (__u64 i = 0; i < (STUN_MAX + 8) / 4; i++) {
			if (i >= words)
				break;
			__u32 *w = (void *)udp + i * 4;
			/* Keeps clang from rewriting the bounds check into pointer
			 * arithmetic the verifier rejects. */
			barrier_var(w);
			if ((void *)(w + 1) > end)
				return PASS(TRUNCATED);
			sum += *w;
		}
		if (csum_fold(sum) != 0xffff)
			return PASS(UDP_CSUM);
	}

	/* Steps 4-6: walk the attributes. */
	/* 64-bit offsets: a 32-bit one loses its bounds when added to a pointer. */
	__u64 off = STUN_HDR, last_off = 0;
	__u32 last_type = 0;
	int software = 0;
	for (int i = 0; i < STUN_MAX_ATTRS; i++) {
		if (off >= n)
			break;
		if (n - off < 4 || off > STUN_MAX - 4)
			return PASS(STUN_MALFORMED);
		__u8 *a = m + off;
		barrier_var(a);
		if ((void *)(a + 4) > end)
			return PASS(TRUNCATED);
		__u32 hdr = bpf_ntohl(*(__u32 *)a);
		__u32 type = hdr >> 16;
		__u32 alen = hdr & 0xffff;
		__u64 padded = (alen + 3) & ~3U;
		if (padded > n - off - 4)
			return PASS(STUN_MALFORMED);
		if (type < 0x8000)
			return PASS(STUN_UNKNOWN_ATTR);
		if (type == ATTR_SOFTWARE && alen == 8) {
			if ((void *)(a + 12) > end)
				return PASS(TRUNCATED);
			/* "tailnode" */
			if (*(__u32 *)(a + 4) == bpf_htonl(0x7461696c) &&
			    *(__u32 *)(a + 8) == bpf_htonl(0x6e6f6465))
				software = 1;
		}
		last_type = type;
		last_off = off;
		off += 4 + padded;
	}
	if (off < n)
		return PASS(STUN_MALFORMED); /* more than STUN_MAX_ATTRS attributes */
	if (!software)
		return PASS(STUN_NOT_TAILSCALE);

	/* Step 7: FINGERPRINT last, CRC-32 of everything before it. */
	if (last_type != ATTR_FINGERPRINT || last_off > STUN_MAX - 8)
		return PASS(STUN_FINGERPRINT);
	__u8 *fp = m + last_off;
	if ((void *)(fp + 8) > end)
		return PASS(TRUNCATED);
	if (*(__u16 *)(fp + 2) != bpf_htons(4))
		return PASS(STUN_FINGERPRINT);
	__u32 want = bpf_ntohl(*(__u32 *)(fp + 4));
	__u32 crc = 0xffffffff;
	/* last_off is a multiple of 4: four bytes per step, one bounds check. */
	for (__u64 i = 0; i < (STUN_MAX - 8) / 4; i++) {
		if (i * 4 >= last_off)
			break;
		__u8 *p = m + i * 4;
		barrier_var(p);
		if ((void *)(p + 4) > end)
			return PASS(TRUNCATED);
		crc = crc_table[(crc ^ p[0]) & 0xff] ^ (crc >> 8);
		crc = crc_table[(crc ^ p[1]) & 0xff] ^ (crc >> 8);
		crc = crc_table[(crc ^ p[2]) & 0xff] ^ (crc >> 8);
		crc = crc_table[(crc ^ p[3]) & 0xff] ^ (crc >> 8);
	}
	if ((crc ^ 0xffffffff ^ STUN_FP_XOR) != want)
		return PASS(STUN_FINGERPRINT);

	/* Optional per-source STUN limit (off unless configured). */
	if (cfg->stun_cost_ns && !bpf_map_lookup_elem(exempt_map, exempt_key)) {
		__u64 now = bpf_ktime_get_ns();
		struct xderp_bucket *b = bucket(shape_map, shape_key, now);
		if (b) {
			if (!gcra_ok(b->tat_stun, now, cfg->stun_tau_ns))
				return done(af, XDERP_VERDICT_DROP, XDERP_REASON_STUN_RATE, len);
			b->tat_stun = gcra_next(b->tat_stun, now, cfg->stun_cost_ns);
		}
	}

	/* Resize first: on failure nothing has been changed yet. */
	__u32 resp = af == XDERP_AF_IPV4 ? 32 : 44;
	__u32 new_len = udp_off + 8 + resp;
	if (bpf_xdp_adjust_tail(ctx, (int)new_len - (int)len))
		return PASS(STUN_RESIZE);
	return -1; /* the caller rewrites the headers */
}

/* Rewrites the STUN payload into the response; m bounds-checked for resp bytes. */
static __always_inline void stun_write(__u8 *m, __u32 af, __u8 *src_addr, __be16 sport)
{
	/* Type and length; cookie and transaction ID stay in place. */
	*(__u16 *)m = bpf_htons(0x0101);
	*(__u16 *)(m + 2) = bpf_htons(af == XDERP_AF_IPV4 ? 12 : 24);
	*(__u16 *)(m + 20) = bpf_htons(ATTR_XOR_MAPPED);
	*(__u16 *)(m + 22) = bpf_htons(af == XDERP_AF_IPV4 ? 8 : 20);
	m[24] = 0;
	m[25] = af == XDERP_AF_IPV4 ? 1 : 2;
	*(__u16 *)(m + 26) = sport ^ bpf_htons(STUN_COOKIE >> 16);
	/* The XOR key is bytes 4..19 of the message: cookie then txid. */
	if (af == XDERP_AF_IPV4) {
		*(__u32 *)(m + 28) = *(__u32 *)src_addr ^ *(__u32 *)(m + 4);
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++)
			*(__u32 *)(m + 28 + 4 * i) = *(__u32 *)(src_addr + 4 * i) ^ *(__u32 *)(m + 4 + 4 * i);
	}
}

static __always_inline void swap_mac(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

static __always_inline __u16 udp_csum(__u64 pseudo, void *udp, void *end, __u32 words, int *ok)
{
	__u64 sum = pseudo;
	__u32 *w = udp;
	*ok = 1;
#pragma unroll
	for (__u32 i = 0; i < 13; i++) { /* 8 + 44 bytes at most */
		if (i < words) {
			if ((void *)(w + i + 1) > end) {
				*ok = 0;
				return 0;
			}
			sum += w[i];
		}
	}
	__u16 c = ~csum_fold(sum);
	return c ? c : 0xffff;
}

static __always_inline int handle_v4(struct xdp_md *ctx, __u32 l3, __u64 len)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	volatile struct xderp_config *cfg = &xderp_cfg;
	__u32 af = XDERP_AF_IPV4;

	struct iphdr *ip = data + l3;
	if ((void *)(ip + 1) > end)
		return PASS(TRUNCATED);
	__u32 ihl = ip->ihl * 4;
	__u32 tot = bpf_ntohs(ip->tot_len);
	if (ip->version != 4 || ihl < 20 || tot < ihl || l3 + tot > len)
		return PASS(BAD_IP);
	if (ip->frag_off & bpf_htons(0x3fff))
		return PASS(FRAGMENT);
	__u32 l4 = l3 + ihl;

	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = data + l4;
		if ((void *)(tcp + 1) > end || l4 + sizeof(*tcp) > l3 + tot)
			return PASS(TRUNCATED);
		if (!port_in((const __u16 *)cfg->derp_ports, bpf_ntohs(tcp->dest)))
			return PASS(TCP_OTHER_PORT);
		__u32 key = ip->saddr;
		struct xderp_lpm_v4 ek = {.prefixlen = 32};
		__builtin_memcpy(ek.addr, &key, 4);
		return shape_tcp(af, len, tcp, &xderp_shape_v4, &key, &xderp_exempt_v4, &ek);
	}
	if (ip->protocol != IPPROTO_UDP)
		return PASS(OTHER_PROTO);

	struct udphdr *udp = data + l4;
	if ((void *)(udp + 1) > end || l4 + sizeof(*udp) > l3 + tot)
		return PASS(TRUNCATED);
	if (!port_in((const __u16 *)cfg->stun_ports, bpf_ntohs(udp->dest)))
		return PASS(UDP_OTHER_PORT);
	if (ihl != 20)
		return PASS(IP_OPTIONS);
	if (cfg->flags & XDERP_F_DROP_STUN)
		return done(af, XDERP_VERDICT_DROP, XDERP_REASON_STUN_DROPPED, len);

	/* IPv4 header checksum (no options here: 20 bytes). */
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < 5; i++)
		sum += ((__u32 *)ip)[i];
	if (csum_fold(sum) != 0xffff)
		return PASS(IP_CSUM);
	__u32 ulen = bpf_ntohs(udp->len);
	if (ulen != tot - 20 || ulen < 8)
		return PASS(UDP_LEN);

	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__be16 sport = udp->source, dport = udp->dest;
	__u64 pseudo = (__u64)saddr + daddr + bpf_htons(IPPROTO_UDP) + udp->len;
	struct xderp_lpm_v4 ek = {.prefixlen = 32};
	__builtin_memcpy(ek.addr, &saddr, 4);
	int r = stun(ctx, af, len, l4, ulen - 8, pseudo, &xderp_shape_v4, &saddr, &xderp_exempt_v4, &ek);
	if (r >= 0)
		return r;

	/* Build the response in the resized frame. */
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (l3 > 18 || data + l3 + 20 + 8 + 32 > end)
		return done(af, XDERP_VERDICT_ABORTED, XDERP_REASON_INTERNAL, len);
	swap_mac(data);
	ip = data + l3;
	ip->tot_len = bpf_htons(20 + 8 + 32);
	ip->ttl = 64;
	ip->saddr = daddr;
	ip->daddr = saddr;
	ip->check = 0;
	sum = 0;
#pragma unroll
	for (int i = 0; i < 5; i++)
		sum += ((__u32 *)ip)[i];
	ip->check = ~csum_fold(sum);
	udp = (void *)(ip + 1);
	udp->source = dport;
	udp->dest = sport;
	udp->len = bpf_htons(8 + 32);
	udp->check = 0;
	stun_write((__u8 *)(udp + 1), af, (__u8 *)&saddr, sport);
	int ok;
	__u16 c = udp_csum((__u64)saddr + daddr + bpf_htons(IPPROTO_UDP) + bpf_htons(8 + 32), udp, end,
			   10, &ok);
	if (!ok)
		return done(af, XDERP_VERDICT_ABORTED, XDERP_REASON_INTERNAL, len);
	udp->check = c;
	return done(af, XDERP_VERDICT_TX, XDERP_REASON_STUN_ANSWERED, len);
}

static __always_inline int handle_v6(struct xdp_md *ctx, __u32 l3, __u64 len)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	volatile struct xderp_config *cfg = &xderp_cfg;
	__u32 af = XDERP_AF_IPV6;

	struct ipv6hdr *ip6 = data + l3;
	if ((void *)(ip6 + 1) > end)
		return PASS(TRUNCATED);
	__u32 plen = bpf_ntohs(ip6->payload_len);
	if (ip6->version != 6 || l3 + 40 + plen > len)
		return PASS(BAD_IP);
	__u32 l4 = l3 + 40;
	__u32 nexthdr = ip6->nexthdr;

	/* The shaping key: the source /64. */
	__u64 key;
	__builtin_memcpy(&key, &ip6->saddr, 8);
	struct xderp_lpm_v6 ek = {.prefixlen = 128};
	__builtin_memcpy(ek.addr, &ip6->saddr, 16);

	if (nexthdr == IPPROTO_UDP) {
		struct udphdr *udp = data + l4;
		if ((void *)(udp + 1) > end || plen < sizeof(*udp))
			return PASS(TRUNCATED);
		if (!port_in((const __u16 *)cfg->stun_ports, bpf_ntohs(udp->dest)))
			return PASS(UDP_OTHER_PORT);
		if (cfg->flags & XDERP_F_DROP_STUN)
			return done(af, XDERP_VERDICT_DROP, XDERP_REASON_STUN_DROPPED, len);
		__u32 ulen = bpf_ntohs(udp->len);
		if (ulen != plen || ulen < 8)
			return PASS(UDP_LEN);

		__u8 saddr[16], daddr[16];
		__builtin_memcpy(saddr, &ip6->saddr, 16);
		__builtin_memcpy(daddr, &ip6->daddr, 16);
		__be16 sport = udp->source, dport = udp->dest;
		__u64 pseudo = bpf_htonl(IPPROTO_UDP) + (__u64)udp->len;
#pragma unroll
		for (int i = 0; i < 4; i++)
			pseudo += (__u64)((__u32 *)saddr)[i] + ((__u32 *)daddr)[i];
		int r = stun(ctx, af, len, l4, ulen - 8, pseudo, &xderp_shape_v6, &key, &xderp_exempt_v6,
			     &ek);
		if (r >= 0)
			return r;

		data = (void *)(long)ctx->data;
		end = (void *)(long)ctx->data_end;
		if (l3 > 18 || data + l3 + 40 + 8 + 44 > end)
			return done(af, XDERP_VERDICT_ABORTED, XDERP_REASON_INTERNAL, len);
		swap_mac(data);
		ip6 = data + l3;
		ip6->payload_len = bpf_htons(8 + 44);
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, daddr, 16);
		__builtin_memcpy(&ip6->daddr, saddr, 16);
		udp = (void *)(ip6 + 1);
		udp->source = dport;
		udp->dest = sport;
		udp->len = bpf_htons(8 + 44);
		udp->check = 0;
		stun_write((__u8 *)(udp + 1), af, saddr, sport);
		pseudo = bpf_htonl(IPPROTO_UDP) + (__u64)bpf_htons(8 + 44);
#pragma unroll
		for (int i = 0; i < 4; i++)
			pseudo += (__u64)((__u32 *)saddr)[i] + ((__u32 *)daddr)[i];
		int ok;
		__u16 c = udp_csum(pseudo, udp, end, 13, &ok);
		if (!ok)
			return done(af, XDERP_VERDICT_ABORTED, XDERP_REASON_INTERNAL, len);
		udp->check = c;
		return done(af, XDERP_VERDICT_TX, XDERP_REASON_STUN_ANSWERED, len);
	}

	/*
	 * Extension headers: only so that shaping cannot be bypassed by adding
	 * them. Hop-by-hop, routing and destination options are skipped (at most
	 * IPV6_MAX_EXT); a fragment header passes; UDP behind them is not STUN.
	 */
#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT; i++) {
		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING && nexthdr != IPPROTO_DSTOPTS)
			break;
		if (l4 > l3 + 40 + 8 * 256 * IPV6_MAX_EXT)
			return PASS(TRUNCATED);
		__u8 *h = data + l4;
		if ((void *)(h + 2) > end)
			return PASS(TRUNCATED);
		nexthdr = h[0];
		l4 += ((__u32)h[1] + 1) * 8;
	}
	if (nexthdr == IPPROTO_FRAGMENT)
		return PASS(FRAGMENT);
	if (nexthdr == IPPROTO_TCP) {
		if (l4 > 18 + 40 + 8 * 256 * IPV6_MAX_EXT)
			return PASS(TRUNCATED);
		struct tcphdr *tcp = data + l4;
		if ((void *)(tcp + 1) > end || l4 + sizeof(*tcp) > l3 + 40 + plen)
			return PASS(TRUNCATED);
		if (!port_in((const __u16 *)cfg->derp_ports, bpf_ntohs(tcp->dest)))
			return PASS(TCP_OTHER_PORT);
		return shape_tcp(af, len, tcp, &xderp_shape_v6, &key, &xderp_exempt_v6, &ek);
	}
	if (nexthdr == IPPROTO_UDP || nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	    nexthdr == IPPROTO_DSTOPTS)
		return PASS(IPV6_EXT);
	return PASS(OTHER_PROTO);
}

SEC("xdp")
int xderp_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u64 len = end - data;
	__u32 af = XDERP_AF_UNKNOWN;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return PASS(TRUNCATED);
	__u16 proto = eth->h_proto;
	__u32 l3 = sizeof(*eth);
	if (proto == bpf_htons(ETH_P_8021Q)) {
		struct vlan_hdr *vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > end)
			return PASS(TRUNCATED);
		proto = vlan->proto;
		l3 += sizeof(*vlan);
	}
	if (proto == bpf_htons(ETH_P_IP))
		return handle_v4(ctx, l3, len);
	if (proto == bpf_htons(ETH_P_IPV6))
		return handle_v6(ctx, l3, len);
	return PASS(NOT_IP);
}

char _license[] SEC("license") = "Dual BSD/GPL";
