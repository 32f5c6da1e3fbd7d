//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xderp's XDP program: answers STUN binding requests in place (XDP_TX) and
 * shapes inbound TCP to the DERP ports per source (XDP_DROP over budget).
 * Everything not fully validated is XDP_PASS. Every return goes through
 * done(), which counts exactly one (af, verdict, reason).
 *
 * Constraints, and how they shape the code:
 * - Loads on kernel 6.1 and on kernels without BTF and without a JIT: no
 *   CO-RE, no kernel BTF, no bpf-to-bpf calls (everything __always_inline),
 *   only loops with constant bounds.
 * - Loads with CAP_BPF + CAP_NET_ADMIN, without CAP_PERFMON. Without
 *   CAP_PERFMON the verifier refuses packet pointer arithmetic with a
 *   variable offset and pointer subtraction. So every direct packet access
 *   uses a constant offset (the L3 header offset is a compile-time constant
 *   in each of the two copies of the L3 handlers, with and without VLAN), and
 *   whatever lives at a variable offset (TCP behind IPv4 options or IPv6
 *   extension headers, STUN attributes) is read with bpf_xdp_load_bytes into
 *   the stack or a per-CPU scratch buffer.
 * - The common STUN request (the 40-byte Tailscale layout) is checked with
 *   constant offsets only (fast path); every other layout goes through the
 *   general attribute walk on the scratch copy. Both apply the same rule.
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
#define STUN_MAX 128      /* stun.MaxRequestLen */
#define STUN_MAX_ATTRS 16 /* stun.MaxAttributes */
#define STUN_COOKIE 0x2112A442
#define STUN_FP_XOR 0x5354554E
#define ATTR_XOR_MAPPED 0x0020U
#define ATTR_SOFTWARE 0x8022U
#define ATTR_FINGERPRINT 0x8028U
#define IPV6_MAX_EXT 4

#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#ifndef barrier_var
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

/*
 * A conditional jump to the next instruction: does nothing, but gives the
 * verifier a place to prune (it only compares states where jumps land).
 */
#define PRUNE_POINT(var) asm volatile("if %0 == 0 goto +0" ::"r"(var))

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

/*
 * The general STUN path is emitted once, in the program's entry function,
 * not in each of the four L3 handler copies (it needs no constant offsets,
 * and four copies of it overflow the 16-bit jump offsets). A handler hands
 * it over with RET_GENERAL and this. The entry function passes it through the
 * per-CPU scratch buffer, which makes the values opaque to the verifier: it
 * then checks the general path once instead of once per handler copy.
 */
struct general_req {
	__u64 udp_off;
	__u64 n;
	__u64 pseudo;
	__u32 af;
	__u32 check_csum;
};

#define STUN_NEED_GENERAL (XDERP_REASON_MAX + 1)
#define RET_GENERAL (-1)

/*
 * Scratch copy of a UDP datagram for the general STUN path. Not pinned. 512
 * bytes although at most 8 + STUN_MAX are used: sizes are masked right before
 * each helper call (SIZE_BOUNDED), because older verifiers (6.1) lose the
 * bounds of a checked value that the compiler spilled to the stack.
 */
struct scratch {
	struct general_req g;
	__u8 b[512];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} xderp_scratch SEC(".maps");

/* Force the enums into BTF so bpf2go -type can export them. */
const enum xderp_af *unused_af __attribute__((unused));
const enum xderp_verdict *unused_verdict __attribute__((unused));
const enum xderp_reason *unused_reason __attribute__((unused));

/* CRC-32 (IEEE, reflected) slice-by-4 tables. */
static const __u32 crc_table[4][256] = {
	{
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
	},
	{
		0x00000000, 0x191b3141, 0x32366282, 0x2b2d53c3, 0x646cc504, 0x7d77f445,
		0x565aa786, 0x4f4196c7, 0xc8d98a08, 0xd1c2bb49, 0xfaefe88a, 0xe3f4d9cb,
		0xacb54f0c, 0xb5ae7e4d, 0x9e832d8e, 0x87981ccf, 0x4ac21251, 0x53d92310,
		0x78f470d3, 0x61ef4192, 0x2eaed755, 0x37b5e614, 0x1c98b5d7, 0x05838496,
		0x821b9859, 0x9b00a918, 0xb02dfadb, 0xa936cb9a, 0xe6775d5d, 0xff6c6c1c,
		0xd4413fdf, 0xcd5a0e9e, 0x958424a2, 0x8c9f15e3, 0xa7b24620, 0xbea97761,
		0xf1e8e1a6, 0xe8f3d0e7, 0xc3de8324, 0xdac5b265, 0x5d5daeaa, 0x44469feb,
		0x6f6bcc28, 0x7670fd69, 0x39316bae, 0x202a5aef, 0x0b07092c, 0x121c386d,
		0xdf4636f3, 0xc65d07b2, 0xed705471, 0xf46b6530, 0xbb2af3f7, 0xa231c2b6,
		0x891c9175, 0x9007a034, 0x179fbcfb, 0x0e848dba, 0x25a9de79, 0x3cb2ef38,
		0x73f379ff, 0x6ae848be, 0x41c51b7d, 0x58de2a3c, 0xf0794f05, 0xe9627e44,
		0xc24f2d87, 0xdb541cc6, 0x94158a01, 0x8d0ebb40, 0xa623e883, 0xbf38d9c2,
		0x38a0c50d, 0x21bbf44c, 0x0a96a78f, 0x138d96ce, 0x5ccc0009, 0x45d73148,
		0x6efa628b, 0x77e153ca, 0xbabb5d54, 0xa3a06c15, 0x888d3fd6, 0x91960e97,
		0xded79850, 0xc7cca911, 0xece1fad2, 0xf5facb93, 0x7262d75c, 0x6b79e61d,
		0x4054b5de, 0x594f849f, 0x160e1258, 0x0f152319, 0x243870da, 0x3d23419b,
		0x65fd6ba7, 0x7ce65ae6, 0x57cb0925, 0x4ed03864, 0x0191aea3, 0x188a9fe2,
		0x33a7cc21, 0x2abcfd60, 0xad24e1af, 0xb43fd0ee, 0x9f12832d, 0x8609b26c,
		0xc94824ab, 0xd05315ea, 0xfb7e4629, 0xe2657768, 0x2f3f79f6, 0x362448b7,
		0x1d091b74, 0x04122a35, 0x4b53bcf2, 0x52488db3, 0x7965de70, 0x607eef31,
		0xe7e6f3fe, 0xfefdc2bf, 0xd5d0917c, 0xcccba03d, 0x838a36fa, 0x9a9107bb,
		0xb1bc5478, 0xa8a76539, 0x3b83984b, 0x2298a90a, 0x09b5fac9, 0x10aecb88,
		0x5fef5d4f, 0x46f46c0e, 0x6dd93fcd, 0x74c20e8c, 0xf35a1243, 0xea412302,
		0xc16c70c1, 0xd8774180, 0x9736d747, 0x8e2de606, 0xa500b5c5, 0xbc1b8484,
		0x71418a1a, 0x685abb5b, 0x4377e898, 0x5a6cd9d9, 0x152d4f1e, 0x0c367e5f,
		0x271b2d9c, 0x3e001cdd, 0xb9980012, 0xa0833153, 0x8bae6290, 0x92b553d1,
		0xddf4c516, 0xc4eff457, 0xefc2a794, 0xf6d996d5, 0xae07bce9, 0xb71c8da8,
		0x9c31de6b, 0x852aef2a, 0xca6b79ed, 0xd37048ac, 0xf85d1b6f, 0xe1462a2e,
		0x66de36e1, 0x7fc507a0, 0x54e85463, 0x4df36522, 0x02b2f3e5, 0x1ba9c2a4,
		0x30849167, 0x299fa026, 0xe4c5aeb8, 0xfdde9ff9, 0xd6f3cc3a, 0xcfe8fd7b,
		0x80a96bbc, 0x99b25afd, 0xb29f093e, 0xab84387f, 0x2c1c24b0, 0x350715f1,
		0x1e2a4632, 0x07317773, 0x4870e1b4, 0x516bd0f5, 0x7a468336, 0x635db277,
		0xcbfad74e, 0xd2e1e60f, 0xf9ccb5cc, 0xe0d7848d, 0xaf96124a, 0xb68d230b,
		0x9da070c8, 0x84bb4189, 0x03235d46, 0x1a386c07, 0x31153fc4, 0x280e0e85,
		0x674f9842, 0x7e54a903, 0x5579fac0, 0x4c62cb81, 0x8138c51f, 0x9823f45e,
		0xb30ea79d, 0xaa1596dc, 0xe554001b, 0xfc4f315a, 0xd7626299, 0xce7953d8,
		0x49e14f17, 0x50fa7e56, 0x7bd72d95, 0x62cc1cd4, 0x2d8d8a13, 0x3496bb52,
		0x1fbbe891, 0x06a0d9d0, 0x5e7ef3ec, 0x4765c2ad, 0x6c48916e, 0x7553a02f,
		0x3a1236e8, 0x230907a9, 0x0824546a, 0x113f652b, 0x96a779e4, 0x8fbc48a5,
		0xa4911b66, 0xbd8a2a27, 0xf2cbbce0, 0xebd08da1, 0xc0fdde62, 0xd9e6ef23,
		0x14bce1bd, 0x0da7d0fc, 0x268a833f, 0x3f91b27e, 0x70d024b9, 0x69cb15f8,
		0x42e6463b, 0x5bfd777a, 0xdc656bb5, 0xc57e5af4, 0xee530937, 0xf7483876,
		0xb809aeb1, 0xa1129ff0, 0x8a3fcc33, 0x9324fd72,
	},
	{
		0x00000000, 0x01c26a37, 0x0384d46e, 0x0246be59, 0x0709a8dc, 0x06cbc2eb,
		0x048d7cb2, 0x054f1685, 0x0e1351b8, 0x0fd13b8f, 0x0d9785d6, 0x0c55efe1,
		0x091af964, 0x08d89353, 0x0a9e2d0a, 0x0b5c473d, 0x1c26a370, 0x1de4c947,
		0x1fa2771e, 0x1e601d29, 0x1b2f0bac, 0x1aed619b, 0x18abdfc2, 0x1969b5f5,
		0x1235f2c8, 0x13f798ff, 0x11b126a6, 0x10734c91, 0x153c5a14, 0x14fe3023,
		0x16b88e7a, 0x177ae44d, 0x384d46e0, 0x398f2cd7, 0x3bc9928e, 0x3a0bf8b9,
		0x3f44ee3c, 0x3e86840b, 0x3cc03a52, 0x3d025065, 0x365e1758, 0x379c7d6f,
		0x35dac336, 0x3418a901, 0x3157bf84, 0x3095d5b3, 0x32d36bea, 0x331101dd,
		0x246be590, 0x25a98fa7, 0x27ef31fe, 0x262d5bc9, 0x23624d4c, 0x22a0277b,
		0x20e69922, 0x2124f315, 0x2a78b428, 0x2bbade1f, 0x29fc6046, 0x283e0a71,
		0x2d711cf4, 0x2cb376c3, 0x2ef5c89a, 0x2f37a2ad, 0x709a8dc0, 0x7158e7f7,
		0x731e59ae, 0x72dc3399, 0x7793251c, 0x76514f2b, 0x7417f172, 0x75d59b45,
		0x7e89dc78, 0x7f4bb64f, 0x7d0d0816, 0x7ccf6221, 0x798074a4, 0x78421e93,
		0x7a04a0ca, 0x7bc6cafd, 0x6cbc2eb0, 0x6d7e4487, 0x6f38fade, 0x6efa90e9,
		0x6bb5866c, 0x6a77ec5b, 0x68315202, 0x69f33835, 0x62af7f08, 0x636d153f,
		0x612bab66, 0x60e9c151, 0x65a6d7d4, 0x6464bde3, 0x662203ba, 0x67e0698d,
		0x48d7cb20, 0x4915a117, 0x4b531f4e, 0x4a917579, 0x4fde63fc, 0x4e1c09cb,
		0x4c5ab792, 0x4d98dda5, 0x46c49a98, 0x4706f0af, 0x45404ef6, 0x448224c1,
		0x41cd3244, 0x400f5873, 0x4249e62a, 0x438b8c1d, 0x54f16850, 0x55330267,
		0x5775bc3e, 0x56b7d609, 0x53f8c08c, 0x523aaabb, 0x507c14e2, 0x51be7ed5,
		0x5ae239e8, 0x5b2053df, 0x5966ed86, 0x58a487b1, 0x5deb9134, 0x5c29fb03,
		0x5e6f455a, 0x5fad2f6d, 0xe1351b80, 0xe0f771b7, 0xe2b1cfee, 0xe373a5d9,
		0xe63cb35c, 0xe7fed96b, 0xe5b86732, 0xe47a0d05, 0xef264a38, 0xeee4200f,
		0xeca29e56, 0xed60f461, 0xe82fe2e4, 0xe9ed88d3, 0xebab368a, 0xea695cbd,
		0xfd13b8f0, 0xfcd1d2c7, 0xfe976c9e, 0xff5506a9, 0xfa1a102c, 0xfbd87a1b,
		0xf99ec442, 0xf85cae75, 0xf300e948, 0xf2c2837f, 0xf0843d26, 0xf1465711,
		0xf4094194, 0xf5cb2ba3, 0xf78d95fa, 0xf64fffcd, 0xd9785d60, 0xd8ba3757,
		0xdafc890e, 0xdb3ee339, 0xde71f5bc, 0xdfb39f8b, 0xddf521d2, 0xdc374be5,
		0xd76b0cd8, 0xd6a966ef, 0xd4efd8b6, 0xd52db281, 0xd062a404, 0xd1a0ce33,
		0xd3e6706a, 0xd2241a5d, 0xc55efe10, 0xc49c9427, 0xc6da2a7e, 0xc7184049,
		0xc25756cc, 0xc3953cfb, 0xc1d382a2, 0xc011e895, 0xcb4dafa8, 0xca8fc59f,
		0xc8c97bc6, 0xc90b11f1, 0xcc440774, 0xcd866d43, 0xcfc0d31a, 0xce02b92d,
		0x91af9640, 0x906dfc77, 0x922b422e, 0x93e92819, 0x96a63e9c, 0x976454ab,
		0x9522eaf2, 0x94e080c5, 0x9fbcc7f8, 0x9e7eadcf, 0x9c381396, 0x9dfa79a1,
		0x98b56f24, 0x99770513, 0x9b31bb4a, 0x9af3d17d, 0x8d893530, 0x8c4b5f07,
		0x8e0de15e, 0x8fcf8b69, 0x8a809dec, 0x8b42f7db, 0x89044982, 0x88c623b5,
		0x839a6488, 0x82580ebf, 0x801eb0e6, 0x81dcdad1, 0x8493cc54, 0x8551a663,
		0x8717183a, 0x86d5720d, 0xa9e2d0a0, 0xa820ba97, 0xaa6604ce, 0xaba46ef9,
		0xaeeb787c, 0xaf29124b, 0xad6fac12, 0xacadc625, 0xa7f18118, 0xa633eb2f,
		0xa4755576, 0xa5b73f41, 0xa0f829c4, 0xa13a43f3, 0xa37cfdaa, 0xa2be979d,
		0xb5c473d0, 0xb40619e7, 0xb640a7be, 0xb782cd89, 0xb2cddb0c, 0xb30fb13b,
		0xb1490f62, 0xb08b6555, 0xbbd72268, 0xba15485f, 0xb853f606, 0xb9919c31,
		0xbcde8ab4, 0xbd1ce083, 0xbf5a5eda, 0xbe9834ed,
	},
	{
		0x00000000, 0xb8bc6765, 0xaa09c88b, 0x12b5afee, 0x8f629757, 0x37def032,
		0x256b5fdc, 0x9dd738b9, 0xc5b428ef, 0x7d084f8a, 0x6fbde064, 0xd7018701,
		0x4ad6bfb8, 0xf26ad8dd, 0xe0df7733, 0x58631056, 0x5019579f, 0xe8a530fa,
		0xfa109f14, 0x42acf871, 0xdf7bc0c8, 0x67c7a7ad, 0x75720843, 0xcdce6f26,
		0x95ad7f70, 0x2d111815, 0x3fa4b7fb, 0x8718d09e, 0x1acfe827, 0xa2738f42,
		0xb0c620ac, 0x087a47c9, 0xa032af3e, 0x188ec85b, 0x0a3b67b5, 0xb28700d0,
		0x2f503869, 0x97ec5f0c, 0x8559f0e2, 0x3de59787, 0x658687d1, 0xdd3ae0b4,
		0xcf8f4f5a, 0x7733283f, 0xeae41086, 0x525877e3, 0x40edd80d, 0xf851bf68,
		0xf02bf8a1, 0x48979fc4, 0x5a22302a, 0xe29e574f, 0x7f496ff6, 0xc7f50893,
		0xd540a77d, 0x6dfcc018, 0x359fd04e, 0x8d23b72b, 0x9f9618c5, 0x272a7fa0,
		0xbafd4719, 0x0241207c, 0x10f48f92, 0xa848e8f7, 0x9b14583d, 0x23a83f58,
		0x311d90b6, 0x89a1f7d3, 0x1476cf6a, 0xaccaa80f, 0xbe7f07e1, 0x06c36084,
		0x5ea070d2, 0xe61c17b7, 0xf4a9b859, 0x4c15df3c, 0xd1c2e785, 0x697e80e0,
		0x7bcb2f0e, 0xc377486b, 0xcb0d0fa2, 0x73b168c7, 0x6104c729, 0xd9b8a04c,
		0x446f98f5, 0xfcd3ff90, 0xee66507e, 0x56da371b, 0x0eb9274d, 0xb6054028,
		0xa4b0efc6, 0x1c0c88a3, 0x81dbb01a, 0x3967d77f, 0x2bd27891, 0x936e1ff4,
		0x3b26f703, 0x839a9066, 0x912f3f88, 0x299358ed, 0xb4446054, 0x0cf80731,
		0x1e4da8df, 0xa6f1cfba, 0xfe92dfec, 0x462eb889, 0x549b1767, 0xec277002,
		0x71f048bb, 0xc94c2fde, 0xdbf98030, 0x6345e755, 0x6b3fa09c, 0xd383c7f9,
		0xc1366817, 0x798a0f72, 0xe45d37cb, 0x5ce150ae, 0x4e54ff40, 0xf6e89825,
		0xae8b8873, 0x1637ef16, 0x048240f8, 0xbc3e279d, 0x21e91f24, 0x99557841,
		0x8be0d7af, 0x335cb0ca, 0xed59b63b, 0x55e5d15e, 0x47507eb0, 0xffec19d5,
		0x623b216c, 0xda874609, 0xc832e9e7, 0x708e8e82, 0x28ed9ed4, 0x9051f9b1,
		0x82e4565f, 0x3a58313a, 0xa78f0983, 0x1f336ee6, 0x0d86c108, 0xb53aa66d,
		0xbd40e1a4, 0x05fc86c1, 0x1749292f, 0xaff54e4a, 0x322276f3, 0x8a9e1196,
		0x982bbe78, 0x2097d91d, 0x78f4c94b, 0xc048ae2e, 0xd2fd01c0, 0x6a4166a5,
		0xf7965e1c, 0x4f2a3979, 0x5d9f9697, 0xe523f1f2, 0x4d6b1905, 0xf5d77e60,
		0xe762d18e, 0x5fdeb6eb, 0xc2098e52, 0x7ab5e937, 0x680046d9, 0xd0bc21bc,
		0x88df31ea, 0x3063568f, 0x22d6f961, 0x9a6a9e04, 0x07bda6bd, 0xbf01c1d8,
		0xadb46e36, 0x15080953, 0x1d724e9a, 0xa5ce29ff, 0xb77b8611, 0x0fc7e174,
		0x9210d9cd, 0x2aacbea8, 0x38191146, 0x80a57623, 0xd8c66675, 0x607a0110,
		0x72cfaefe, 0xca73c99b, 0x57a4f122, 0xef189647, 0xfdad39a9, 0x45115ecc,
		0x764dee06, 0xcef18963, 0xdc44268d, 0x64f841e8, 0xf92f7951, 0x41931e34,
		0x5326b1da, 0xeb9ad6bf, 0xb3f9c6e9, 0x0b45a18c, 0x19f00e62, 0xa14c6907,
		0x3c9b51be, 0x842736db, 0x96929935, 0x2e2efe50, 0x2654b999, 0x9ee8defc,
		0x8c5d7112, 0x34e11677, 0xa9362ece, 0x118a49ab, 0x033fe645, 0xbb838120,
		0xe3e09176, 0x5b5cf613, 0x49e959fd, 0xf1553e98, 0x6c820621, 0xd43e6144,
		0xc68bceaa, 0x7e37a9cf, 0xd67f4138, 0x6ec3265d, 0x7c7689b3, 0xc4caeed6,
		0x591dd66f, 0xe1a1b10a, 0xf3141ee4, 0x4ba87981, 0x13cb69d7, 0xab770eb2,
		0xb9c2a15c, 0x017ec639, 0x9ca9fe80, 0x241599e5, 0x36a0360b, 0x8e1c516e,
		0x866616a7, 0x3eda71c2, 0x2c6fde2c, 0x94d3b949, 0x090481f0, 0xb1b8e695,
		0xa30d497b, 0x1bb12e1e, 0x43d23e48, 0xfb6e592d, 0xe9dbf6c3, 0x516791a6,
		0xccb0a91f, 0x740cce7a, 0x66b96194, 0xde0506f1,
	},
};

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

static __always_inline int port_in(const volatile __u16 *ports, __u16 port)
{
	int hit = 0;
#pragma unroll
	for (int i = 0; i < XDERP_MAX_PORTS; i++) {
		__u16 p = ports[i];
		hit |= p != 0 && p == port;
	}
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

/* One CRC-32 step over four message bytes loaded as a little-endian word. */
static __always_inline __u32 crc_word(__u32 crc, __u32 w)
{
	crc ^= w;
	return crc_table[3][crc & 0xff] ^ crc_table[2][(crc >> 8) & 0xff] ^
	       crc_table[1][(crc >> 16) & 0xff] ^ crc_table[0][crc >> 24];
}

/*
 * LPM keys live 8-byte aligned on the stack and are written as 4-byte words
 * through a volatile pointer, the words in the second half of an 8-byte slot
 * first: the 6.1 verifier refuses (without CAP_PERFMON) any narrower store
 * into a slot that already holds a spilled value, which is what clang makes
 * of "struct key k = {.prefixlen = 32}; memcpy(k.addr, ...)".
 */
#define LPM_KEY __attribute__((aligned(8)))

static __always_inline void lpm4_key(struct xderp_lpm_v4 *k, __u32 addr)
{
	volatile __u32 *w = (volatile __u32 *)k;
	w[1] = addr;
	w[0] = 32;
}

static __always_inline void lpm6_key(struct xderp_lpm_v6 *k, const __u32 *addr)
{
	volatile __u32 *w = (volatile __u32 *)k;
	w[1] = addr[0];
	w[3] = addr[2];
	w[0] = 128;
	w[2] = addr[1];
	w[4] = addr[3];
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
 * Shaping of TCP to a DERP port, given the segment's flags. Order: shaping
 * off passes, RST is never shaped, exempt prefixes pass, SYN without ACK uses
 * only the SYN bucket, every other segment the packets/s and bytes/s buckets
 * (both must admit it; only then are both charged).
 */
static __always_inline int shape_tcp(__u32 af, __u64 len, __u8 flags, void *map, void *key,
				     void *exempt_map, void *exempt_key)
{
	volatile struct xderp_config *cfg = &xderp_cfg;
	if (!(cfg->flags & XDERP_F_SHAPING))
		return PASS(SHAPING_OFF);
	if (flags & TCP_RST)
		return PASS(TCP_RST);
	if (bpf_map_lookup_elem(exempt_map, exempt_key))
		return PASS(EXEMPT);
	__u64 now = bpf_ktime_get_ns();
	struct xderp_bucket *b = bucket(map, key, now);
	if (!b)
		return PASS(SHAPE_ERROR);
	if ((flags & (TCP_SYN | TCP_ACK)) == TCP_SYN) {
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

/* 1 if a == b, else 0, without a branch (branches multiply verifier states). */
static __always_inline __u64 eq64(__u64 a, __u64 b)
{
	__u64 d = a ^ b;
	barrier_var(d);
	return ((d | (0 - d)) >> 63) ^ 1;
}

/*
 * Steps 4-7 of the acceptance rule plus the UDP checksum, on the general
 * path (any layout but the 40-byte Tailscale one).
 *
 * Verifier economy (this must load without CAP_PERFMON, where the verifier
 * also walks speculative paths and prunes less): no pointer arithmetic with
 * a variable offset (attribute headers and values are read with
 * bpf_xdp_load_bytes at scalar offsets), no loops (the walk and the CRC are
 * unrolled by macro, every packet offset an immediate), the checksum by
 * bpf_csum_diff over a per-CPU scratch copy, and the SOFTWARE match
 * computed without branches.
 *
 * n <= STUN_MAX and n % 4 == 0 (checked by the caller). Returns
 * XDERP_REASON_MAX when the request is to be answered, else the pass reason.
 */
static __always_inline __u32 stun_general(struct xdp_md *ctx, struct scratch *s, __u64 udp_off,
					  __u64 n, __u64 pseudo, __u32 check_csum)
{
	/* Established by the caller; repeated for the verifier (n is opaque here). */
	if (n < STUN_HDR || n > STUN_MAX || (n & 3))
		return XDERP_REASON_STUN_MALFORMED;
	/*
	 * n <= STUN_MAX and n % 4 == 0 (checked by the caller), so the mask
	 * changes nothing; it tells the verifier size is in [4, 512].
	 */
#define SIZE_BOUNDED(n) ((((n) + 8 - 4) & 0x1fc) + 4)
	if (bpf_xdp_load_bytes(ctx, udp_off, s->b, SIZE_BOUNDED(n)))
		return XDERP_REASON_TRUNCATED;

	if (check_csum) {
		__s64 c = bpf_csum_diff(0, 0, (void *)s->b, SIZE_BOUNDED(n), 0);
		if (c < 0 || csum_fold(pseudo + (__u32)c) != 0xffff)
			return XDERP_REASON_UDP_CSUM;
	}

	/*
	 * The CRC for step 7, over the n - 8 bytes a FINGERPRINT would cover,
	 * computed before the walk so that the verifier runs it once rather
	 * than once per way out of the walk. Bit by bit: slow, but this path is
	 * rare, and table lookups (a pointer moved by data) make the verifier
	 * fork a speculative path each without CAP_PERFMON.
	 */
	__u64 words = (n - 8) / 4;
	__u32 crc = 0xffffffff;
	/*
	 * Unrolled by macro, not a loop: 6.1 without CAP_PERFMON follows a
	 * loop past its bound on speculative paths until a pointer leaves its
	 * object, and refuses the program.
	 */
#define CRC_WORD(k)                                                              \
	do {                                                                     \
		if ((k) >= words)                                                \
			goto crc_done;                                           \
		crc ^= *(__u32 *)(s->b + 8 + 4 * (k));                           \
		_Pragma("unroll") for (int bit = 0; bit < 32; bit++)             \
		{                                                                \
			/* A multiply, not "-low & poly": clang may turn the   \
			 * latter into a branch, and recent verifiers fork     \
			 * their state on an AND with a [-1, 0] value. */      \
			__u32 low = crc & 1;                                     \
			barrier_var(low);                                        \
			crc = (crc >> 1) ^ (0xEDB88320 * low);                   \
		}                                                                \
	} while (0)
#define CRC_8(k)                                                                     \
	CRC_WORD(k); CRC_WORD(k + 1); CRC_WORD(k + 2); CRC_WORD(k + 3);              \
	CRC_WORD(k + 4); CRC_WORD(k + 5); CRC_WORD(k + 6); CRC_WORD(k + 7)
	/* (STUN_MAX - 8) / 4 = 30 words at most. */
	_Static_assert((STUN_MAX - 8) / 4 == 30, "CRC unrolling must match STUN_MAX");
	CRC_8(0); CRC_8(8); CRC_8(16);
	CRC_WORD(24); CRC_WORD(25); CRC_WORD(26); CRC_WORD(27); CRC_WORD(28); CRC_WORD(29);
#undef CRC_8
#undef CRC_WORD
crc_done:;

	/* Steps 4-6: walk the attributes (at most STUN_MAX_ATTRS). */
	__u64 m_off = udp_off + 8;
	__u64 off = STUN_HDR, last_off = 0, software = 0;
#define WALK_ONE()                                                                      \
	do {                                                                            \
		if (off >= n)                                                           \
			goto walked;                                                    \
		if (n - off < 4 || off > STUN_MAX - 4)                                  \
			return XDERP_REASON_STUN_MALFORMED;                             \
		__be32 raw = 0;                                                         \
		if (bpf_xdp_load_bytes(ctx, m_off + off, &raw, 4))                      \
			return XDERP_REASON_TRUNCATED;                                  \
		__u32 hdr = bpf_ntohl(raw);                                             \
		__u64 padded = ((hdr & 0xffff) + 3) & ~3U;                              \
		if (padded > n - off - 4)                                               \
			return XDERP_REASON_STUN_MALFORMED;                             \
		if (hdr < 0x80000000)                                                   \
			return XDERP_REASON_STUN_UNKNOWN_ATTR;                          \
		__u64 v = 0; /* stays 0 if fewer than 8 bytes follow */                 \
		bpf_xdp_load_bytes(ctx, m_off + off + 4, &v, 8);                        \
		software |= eq64(hdr, (ATTR_SOFTWARE << 16) | 8) &                      \
			    eq64(v, bpf_cpu_to_be64(0x7461696c6e6f6465ULL));                      \
		last_off = off;                                                         \
		off += 4 + padded;                                                      \
	} while (0)
	WALK_ONE(); WALK_ONE(); WALK_ONE(); WALK_ONE();
	WALK_ONE(); WALK_ONE(); WALK_ONE(); WALK_ONE();
	WALK_ONE(); WALK_ONE(); WALK_ONE(); WALK_ONE();
	WALK_ONE(); WALK_ONE(); WALK_ONE(); WALK_ONE();
#undef WALK_ONE
	if (off < n)
		return XDERP_REASON_STUN_MALFORMED; /* more than STUN_MAX_ATTRS attributes */
walked:
	if (!software)
		return XDERP_REASON_STUN_NOT_TAILSCALE;

	/*
	 * Step 7. The last attribute is FINGERPRINT with length 4 exactly when
	 * it starts at n - 8 with that header; the CRC covers the n - 8 bytes
	 * before it.
	 */
	if (last_off + 8 != n || n < STUN_HDR + 8)
		return XDERP_REASON_STUN_FINGERPRINT;
	__be32 fp[2];
	if (bpf_xdp_load_bytes(ctx, m_off + last_off, fp, 8))
		return XDERP_REASON_TRUNCATED;
	if (fp[0] != bpf_htonl((ATTR_FINGERPRINT << 16) | 4))
		return XDERP_REASON_STUN_FINGERPRINT;
	if ((crc ^ 0xffffffff ^ STUN_FP_XOR) != bpf_ntohl(fp[1]))
		return XDERP_REASON_STUN_FINGERPRINT;
	return XDERP_REASON_MAX;
}

/*
 * The STUN checks after the IP and UDP headers were validated. udp points at
 * the UDP header (a constant offset from data), udp_off is that offset, n the
 * message length (udp.len - 8, within the frame), pseudo the checksum sum of
 * the pseudo header. Returns XDERP_REASON_MAX to answer, STUN_NEED_GENERAL
 * (with g filled in) for the general path, else a pass reason.
 */
static __always_inline __u32 stun_check(struct xdp_md *ctx, __u32 af, struct udphdr *udp, void *end,
					__u64 udp_off, __u64 n, __u64 pseudo, struct general_req *g)
{
	__u8 *m = (void *)(udp + 1);
	/* Steps 1-3 of the acceptance rule (stun.ParseBindingRequest). */
	if (n < STUN_HDR)
		return XDERP_REASON_STUN_NOT_STUN;
	if ((void *)(m + STUN_HDR) > end)
		return XDERP_REASON_TRUNCATED; /* unreachable: n bytes are in the frame */
	if ((m[0] & 0xc0) || *(__u32 *)(m + 4) != bpf_htonl(STUN_COOKIE))
		return XDERP_REASON_STUN_NOT_STUN;
	if (*(__u16 *)m != bpf_htons(0x0001))
		return XDERP_REASON_STUN_NOT_BINDING;
	if (n > STUN_MAX || bpf_ntohs(*(__u16 *)(m + 2)) != n - STUN_HDR || (n & 3))
		return XDERP_REASON_STUN_MALFORMED;

	int check_csum = udp->check || af == XDERP_AF_IPV6;
	if (check_csum && !udp->check)
		return XDERP_REASON_UDP_CSUM; /* IPv6 requires a checksum */

	/* Fast path: the 40-byte Tailscale layout, constant offsets only. */
	if (n == 40 && (void *)(m + 40) <= end &&
	    *(__u32 *)(m + 20) == bpf_htonl((ATTR_SOFTWARE << 16) | 8) &&
	    *(__u32 *)(m + 24) == bpf_htonl(0x7461696c) && *(__u32 *)(m + 28) == bpf_htonl(0x6e6f6465) &&
	    *(__u32 *)(m + 32) == bpf_htonl((ATTR_FINGERPRINT << 16) | 4)) {
		if (check_csum) {
			__u64 sum = pseudo;
			__u32 *w = (void *)udp;
#pragma unroll
			for (int i = 0; i < 12; i++)
				sum += w[i];
			if (csum_fold(sum) != 0xffff)
				return XDERP_REASON_UDP_CSUM;
		}
		/*
		 * Unrolled, with a prune point after each word. Without
		 * CAP_PERFMON the verifier forks a speculative path at every
		 * table lookup and can only prune them where a jump lands; a
		 * loop would do, but 6.1 then also runs the loop body past its
		 * bound on a speculative path and refuses the packet read.
		 */
		__u32 *w = (void *)m;
		__u32 crc = 0xffffffff;
#pragma unroll
		for (int i = 0; i < 8; i++) {
			crc = crc_word(crc, w[i]);
			PRUNE_POINT(crc);
		}
		if ((crc ^ 0xffffffff ^ STUN_FP_XOR) != bpf_ntohl(w[9]))
			return XDERP_REASON_STUN_FINGERPRINT;
		return XDERP_REASON_MAX;
	}
	/* Any other layout: the caller hands it to stun_general (one copy). */
	g->af = af;
	g->check_csum = check_csum;
	g->udp_off = udp_off;
	g->n = n;
	g->pseudo = pseudo;
	return STUN_NEED_GENERAL;
}

/* The per-source STUN limit (off unless configured). Returns 1 to drop. */
static __always_inline int stun_limited(void *shape_map, void *shape_key, void *exempt_map,
					void *exempt_key)
{
	volatile struct xderp_config *cfg = &xderp_cfg;
	__u64 cost = cfg->stun_cost_ns;
	if (!cost || bpf_map_lookup_elem(exempt_map, exempt_key))
		return 0;
	__u64 now = bpf_ktime_get_ns();
	struct xderp_bucket *b = bucket(shape_map, shape_key, now);
	if (!b)
		return 0;
	if (!gcra_ok(b->tat_stun, now, cfg->stun_tau_ns))
		return 1;
	b->tat_stun = gcra_next(b->tat_stun, now, cost);
	return 0;
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

/* The response's UDP checksum over header and words*4 bytes (constant). */
static __always_inline __u16 udp_csum(__u64 sum, __u32 *w, int words)
{
#pragma unroll
	for (int i = 0; i < 13; i++) /* 8 + 44 bytes at most */
		if (i < words)
			sum += w[i];
	__u16 c = ~csum_fold(sum);
	return c ? c : 0xffff;
}

/*
 * Answers a validated IPv4 request (headers at the constant offset l3, not
 * yet modified): optional per-source limit, resize, rewrite, XDP_TX.
 */
static __always_inline int answer_v4(struct xdp_md *ctx, const __u32 l3, __u64 len)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 af = XDERP_AF_IPV4;
	struct iphdr *ip = data + l3;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return done(af, XDERP_VERDICT_ABORTED, XDERP_REASON_INTERNAL, len);
	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__be16 sport = udp->source, dport = udp->dest;
	struct xderp_lpm_v4 ek LPM_KEY;
	lpm4_key(&ek, saddr);
	if (stun_limited(&xderp_shape_v4, &saddr, &xderp_exempt_v4, &ek))
		return done(af, XDERP_VERDICT_DROP, XDERP_REASON_STUN_RATE, len);

	/* Resize first: on failure nothing has been changed yet. */
	if (bpf_xdp_adjust_tail(ctx, (int)(l3 + 20 + 8 + 32) - (int)len))
		return PASS(STUN_RESIZE);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + l3 + 20 + 8 + 32 > end)
		return done(af, XDERP_VERDICT_ABORTED, XDERP_REASON_INTERNAL, len);
	swap_mac(data);
	ip = data + l3;
	ip->tot_len = bpf_htons(20 + 8 + 32);
	ip->ttl = 64;
	ip->saddr = daddr;
	ip->daddr = saddr;
	ip->check = 0;
	__u64 sum = 0;
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
	udp->check = udp_csum((__u64)saddr + daddr + bpf_htons(IPPROTO_UDP) + bpf_htons(8 + 32),
			      (__u32 *)udp, 10);
	return done(af, XDERP_VERDICT_TX, XDERP_REASON_STUN_ANSWERED, len);
}

/*
 * Answers a validated IPv6 request, as answer_v4.
 */
static __always_inline int answer_v6(struct xdp_md *ctx, const __u32 l3, __u64 len)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 af = XDERP_AF_IPV6;
	struct ipv6hdr *ip6 = data + l3;
	struct udphdr *udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > end)
		return done(af, XDERP_VERDICT_ABORTED, XDERP_REASON_INTERNAL, len);
	__u8 saddr[16], daddr[16];
	__builtin_memcpy(saddr, &ip6->saddr, 16);
	__builtin_memcpy(daddr, &ip6->daddr, 16);
	__be16 sport = udp->source, dport = udp->dest;
	__u64 key; /* the source /64 */
	__builtin_memcpy(&key, saddr, 8);
	struct xderp_lpm_v6 ek LPM_KEY;
	lpm6_key(&ek, (const __u32 *)saddr);
	if (stun_limited(&xderp_shape_v6, &key, &xderp_exempt_v6, &ek))
		return done(af, XDERP_VERDICT_DROP, XDERP_REASON_STUN_RATE, len);

	if (bpf_xdp_adjust_tail(ctx, (int)(l3 + 40 + 8 + 44) - (int)len))
		return PASS(STUN_RESIZE);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + l3 + 40 + 8 + 44 > end)
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
	__u64 pseudo = bpf_htonl(IPPROTO_UDP) + (__u64)bpf_htons(8 + 44);
#pragma unroll
	for (int i = 0; i < 4; i++)
		pseudo += (__u64)((__u32 *)saddr)[i] + ((__u32 *)daddr)[i];
	udp->check = udp_csum(pseudo, (__u32 *)udp, 13);
	return done(af, XDERP_VERDICT_TX, XDERP_REASON_STUN_ANSWERED, len);
}

/* IPv4; l3 is the constant offset of the IP header (14, or 18 after a VLAN tag). */
static __always_inline int handle_v4(struct xdp_md *ctx, const __u32 l3, __u64 len,
				     struct general_req *g)
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

	if (ip->protocol == IPPROTO_TCP) {
		__be16 dport;
		__u8 flags;
		if (l3 + ihl + 20 > len || ihl + 20 > tot)
			return PASS(TRUNCATED);
		if (ihl == 20) {
			struct tcphdr *tcp = (void *)(ip + 1);
			if ((void *)(tcp + 1) > end)
				return PASS(TRUNCATED);
			dport = tcp->dest;
			flags = ((__u8 *)tcp)[13];
		} else {
			/* Behind IP options: a variable offset, so copy. */
			__u8 th[14];
			if (bpf_xdp_load_bytes(ctx, l3 + ihl, th, sizeof(th)))
				return PASS(TRUNCATED);
			dport = *(__be16 *)(th + 2);
			flags = th[13];
		}
		if (!port_in(cfg->derp_ports, bpf_ntohs(dport)))
			return PASS(TCP_OTHER_PORT);
		__u32 key = ip->saddr;
		struct xderp_lpm_v4 ek LPM_KEY;
		lpm4_key(&ek, key);
		return shape_tcp(af, len, flags, &xderp_shape_v4, &key, &xderp_exempt_v4, &ek);
	}
	if (ip->protocol != IPPROTO_UDP)
		return PASS(OTHER_PROTO);
	if (l3 + ihl + 8 > len || ihl + 8 > tot)
		return PASS(TRUNCATED);
	if (ihl != 20) {
		__be16 ports[2];
		if (bpf_xdp_load_bytes(ctx, l3 + ihl, ports, sizeof(ports)))
			return PASS(TRUNCATED);
		if (!port_in(cfg->stun_ports, bpf_ntohs(ports[1])))
			return PASS(UDP_OTHER_PORT);
		return PASS(IP_OPTIONS);
	}
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return PASS(TRUNCATED);
	if (!port_in(cfg->stun_ports, bpf_ntohs(udp->dest)))
		return PASS(UDP_OTHER_PORT);
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

	__u64 pseudo = (__u64)ip->saddr + ip->daddr + bpf_htons(IPPROTO_UDP) + udp->len;
	__u32 r = stun_check(ctx, af, udp, end, l3 + 20, ulen - 8, pseudo, g);
	if (r == STUN_NEED_GENERAL)
		return RET_GENERAL;
	if (r != XDERP_REASON_MAX)
		return done(af, XDERP_VERDICT_PASS, r, len);
	return answer_v4(ctx, l3, len);
}

/* IPv6; l3 is the constant offset of the IPv6 header. */
static __always_inline int handle_v6(struct xdp_md *ctx, const __u32 l3, __u64 len,
				     struct general_req *g)
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
	__u32 nexthdr = ip6->nexthdr;

	/* The shaping key: the source /64. */
	__u64 key;
	__builtin_memcpy(&key, &ip6->saddr, 8);
	struct xderp_lpm_v6 ek LPM_KEY;
	lpm6_key(&ek, (const __u32 *)&ip6->saddr);

	if (nexthdr == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > end || plen < sizeof(*udp))
			return PASS(TRUNCATED);
		if (!port_in(cfg->stun_ports, bpf_ntohs(udp->dest)))
			return PASS(UDP_OTHER_PORT);
		if (cfg->flags & XDERP_F_DROP_STUN)
			return done(af, XDERP_VERDICT_DROP, XDERP_REASON_STUN_DROPPED, len);
		__u32 ulen = bpf_ntohs(udp->len);
		if (ulen != plen || ulen < 8)
			return PASS(UDP_LEN);

		__u64 pseudo = bpf_htonl(IPPROTO_UDP) + (__u64)udp->len;
#pragma unroll
		for (int i = 0; i < 4; i++)
			pseudo += (__u64)((__u32 *)&ip6->saddr)[i] + ((__u32 *)&ip6->daddr)[i];
		__u32 r = stun_check(ctx, af, udp, end, l3 + 40, ulen - 8, pseudo, g);
		if (r == STUN_NEED_GENERAL)
			return RET_GENERAL;
		if (r != XDERP_REASON_MAX)
			return done(af, XDERP_VERDICT_PASS, r, len);
		return answer_v6(ctx, l3, len);
	}

	__be16 dport;
	__u8 flags;
	if (nexthdr == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > end || plen < sizeof(*tcp))
			return PASS(TRUNCATED);
		dport = tcp->dest;
		flags = ((__u8 *)tcp)[13];
	} else {
		/*
		 * Extension headers: walked only so that shaping cannot be
		 * bypassed by adding them. Hop-by-hop, routing and destination
		 * options are skipped (at most IPV6_MAX_EXT); a fragment header
		 * passes; UDP behind them is not STUN.
		 */
		__u32 off = l3 + 40;
#pragma unroll
		for (int i = 0; i < IPV6_MAX_EXT; i++) {
			if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
			    nexthdr != IPPROTO_DSTOPTS)
				break;
			__u8 h[2];
			if (bpf_xdp_load_bytes(ctx, off, h, sizeof(h)))
				return PASS(TRUNCATED);
			nexthdr = h[0];
			off += ((__u32)h[1] + 1) * 8;
		}
		if (nexthdr == IPPROTO_FRAGMENT)
			return PASS(FRAGMENT);
		if (nexthdr != IPPROTO_TCP) {
			if (nexthdr == IPPROTO_UDP || nexthdr == IPPROTO_HOPOPTS ||
			    nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS)
				return PASS(IPV6_EXT);
			return PASS(OTHER_PROTO);
		}
		__u8 th[14];
		if (off + 20 > len || off + 20 > l3 + 40 + plen ||
		    bpf_xdp_load_bytes(ctx, off, th, sizeof(th)))
			return PASS(TRUNCATED);
		dport = *(__be16 *)(th + 2);
		flags = th[13];
	}
	if (!port_in(cfg->derp_ports, bpf_ntohs(dport)))
		return PASS(TCP_OTHER_PORT);
	return shape_tcp(af, len, flags, &xderp_shape_v6, &key, &xderp_exempt_v6, &ek);
}

SEC("xdp")
int xderp_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	/* Not end - data: pointer subtraction needs CAP_PERFMON. */
	__u64 len = bpf_xdp_get_buff_len(ctx);
	__u32 af = XDERP_AF_UNKNOWN;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return PASS(TRUNCATED);
	struct general_req g = {};
	int ret;
	if (eth->h_proto == bpf_htons(ETH_P_8021Q)) {
		struct vlan_hdr *vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > end)
			return PASS(TRUNCATED);
		if (vlan->proto == bpf_htons(ETH_P_IP))
			ret = handle_v4(ctx, 18, len, &g);
		else if (vlan->proto == bpf_htons(ETH_P_IPV6))
			ret = handle_v6(ctx, 18, len, &g);
		else
			return PASS(NOT_IP);
	} else if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		ret = handle_v4(ctx, 14, len, &g);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		ret = handle_v6(ctx, 14, len, &g);
	} else {
		return PASS(NOT_IP);
	}
	if (ret != RET_GENERAL)
		return ret;

	/* A STUN request in some other layout than Tailscale's. */
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&xderp_scratch, &zero);
	if (!s)
		return done(g.af, XDERP_VERDICT_PASS, XDERP_REASON_INTERNAL, len);
	volatile struct general_req *vg = &s->g;
	vg->udp_off = g.udp_off;
	vg->n = g.n;
	vg->pseudo = g.pseudo;
	vg->af = g.af;
	vg->check_csum = g.check_csum;
	__u64 udp_off = vg->udp_off;
	af = 1 + ((vg->af >> 1) & 1); /* IPv4 (1) or IPv6 (2), opaque */
	__u32 r = stun_general(ctx, s, udp_off, vg->n, vg->pseudo, vg->check_csum);
	if (r != XDERP_REASON_MAX)
		return done(af, XDERP_VERDICT_PASS, r, len);
	/* Back to constant offsets for the rewrite. */
	switch (udp_off) {
	case 14 + 20:
		return answer_v4(ctx, 14, len);
	case 18 + 20:
		return answer_v4(ctx, 18, len);
	case 14 + 40:
		return answer_v6(ctx, 14, len);
	case 18 + 40:
		return answer_v6(ctx, 18, len);
	}
	return done(af, XDERP_VERDICT_ABORTED, XDERP_REASON_INTERNAL, len);
}

char _license[] SEC("license") = "Dual BSD/GPL";
