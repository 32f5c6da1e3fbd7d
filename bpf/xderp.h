/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ABI shared by the XDP program (xderp.c) and Go (bpf2go -type exports
 * every struct and enum below). Enums end in a _MAX sentinel; the loader has
 * a label table per enum and a test checks that they match.
 */
#ifndef XDERP_H
#define XDERP_H

#include <linux/types.h>

#define XDERP_MAX_PORTS 4

/* Flags in xderp_config.flags. */
#define XDERP_F_DROP_STUN 1 /* operator switch: drop every datagram to a STUN port */
#define XDERP_F_SHAPING 2   /* shape TCP to the DERP ports */

enum xderp_af {
	XDERP_AF_UNKNOWN,
	XDERP_AF_IPV4,
	XDERP_AF_IPV6,
	XDERP_AF_MAX,
};

enum xderp_verdict {
	XDERP_VERDICT_PASS,
	XDERP_VERDICT_TX,
	XDERP_VERDICT_DROP,
	XDERP_VERDICT_ABORTED,
	XDERP_VERDICT_MAX,
};

enum xderp_reason {
	XDERP_REASON_NOT_IP,           /* pass: EtherType neither IPv4 nor IPv6 (after at most one 802.1Q tag) */
	XDERP_REASON_TRUNCATED,        /* pass: a header runs past the end of the frame */
	XDERP_REASON_BAD_IP,           /* pass: IP version, IHL or length inconsistent with the frame */
	XDERP_REASON_FRAGMENT,         /* pass: IP fragment (IPv4 MF/offset, IPv6 fragment header) */
	XDERP_REASON_IP_OPTIONS,       /* pass: STUN-port datagram with IPv4 options */
	XDERP_REASON_IPV6_EXT,         /* pass: UDP behind IPv6 extension headers, or too many/unknown ones */
	XDERP_REASON_OTHER_PROTO,      /* pass: neither UDP nor TCP */
	XDERP_REASON_UDP_OTHER_PORT,   /* pass: UDP not to a STUN port */
	XDERP_REASON_TCP_OTHER_PORT,   /* pass: TCP not to a DERP port */
	XDERP_REASON_STUN_DROPPED,     /* drop: operator switch drop-STUN */
	XDERP_REASON_IP_CSUM,          /* pass: bad IPv4 header checksum */
	XDERP_REASON_UDP_LEN,          /* pass: UDP length differs from the IP payload length */
	XDERP_REASON_STUN_NOT_STUN,    /* pass: not a STUN message (stun.ErrNotSTUN) */
	XDERP_REASON_STUN_NOT_BINDING, /* pass: stun.ErrNotBindingRequest */
	XDERP_REASON_STUN_MALFORMED,   /* pass: stun.ErrMalformed */
	XDERP_REASON_UDP_CSUM,         /* pass: bad UDP checksum (or zero on IPv6) */
	XDERP_REASON_STUN_UNKNOWN_ATTR,/* pass: stun.ErrUnknownAttribute */
	XDERP_REASON_STUN_NOT_TAILSCALE,/* pass: stun.ErrNotTailscale */
	XDERP_REASON_STUN_FINGERPRINT, /* pass: stun.ErrFingerprint */
	XDERP_REASON_STUN_RATE,        /* drop: over the per-source STUN limit */
	XDERP_REASON_STUN_RESIZE,      /* pass: the frame could not be resized for the response */
	XDERP_REASON_STUN_ANSWERED,    /* tx: binding response sent */
	XDERP_REASON_SHAPING_OFF,      /* pass: TCP to a DERP port, shaping off */
	XDERP_REASON_TCP_RST,          /* pass: RST is never shaped */
	XDERP_REASON_EXEMPT,           /* pass: source in an exempt prefix */
	XDERP_REASON_SHAPE_OK,         /* pass: within the source's budget */
	XDERP_REASON_SHAPE_OVER,       /* drop: over the packets/s or bytes/s budget */
	XDERP_REASON_SYN_OVER,         /* drop: over the SYN (new connection) budget */
	XDERP_REASON_SHAPE_ERROR,      /* pass: the shaping table could not be updated */
	XDERP_REASON_INTERNAL,         /* aborted: unreachable bounds failure after a resize */
	XDERP_REASON_MAX,
};

/*
 * Runtime configuration, a global in .data (so the object answers STUN on
 * 3478 with shaping off when nobody writes it). Ports in host byte order,
 * 0 = unused slot. Rates as GCRA parameters (the loader converts from
 * packets/s, bytes/s and bursts): cost = nanoseconds one unit uses up,
 * tau = how far ahead of now a source may run (the burst). cost 0 = no limit.
 */
struct xderp_config {
	__u16 stun_ports[XDERP_MAX_PORTS];
	__u16 derp_ports[XDERP_MAX_PORTS];
	__u32 flags;
	__u32 _pad;
	__u64 pkt_cost_ns;   /* per packet */
	__u64 pkt_tau_ns;
	__u64 byte_cost_fp;  /* per byte, nanoseconds << 16 */
	__u64 byte_tau_ns;
	__u64 syn_cost_ns;   /* per SYN without ACK */
	__u64 syn_tau_ns;
	__u64 stun_cost_ns;  /* per STUN request, 0 = STUN never limited */
	__u64 stun_tau_ns;
};

/* Per-source shaping state: GCRA theoretical arrival times (ktime ns). */
struct xderp_bucket {
	__u64 tat_pkt;
	__u64 tat_byte;
	__u64 tat_syn;
	__u64 tat_stun;
};

struct xderp_counter {
	__u64 packets;
	__u64 bytes; /* frame length as received */
};

struct xderp_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct xderp_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

#endif
