#!/usr/bin/env python3
"""stunprobe: send Tailscale-style STUN binding requests (SOFTWARE "tailnode"
+ FINGERPRINT, 40 bytes, as Tailscale's netcheck sends them) to a loopback
address and check the answers.

  stunprobe.py --port P --wait-first DEADLINE_S [--t0 EPOCH]
      poll until the first valid answer; print "first_answer_s=<seconds since t0>"
  stunprobe.py --port P --count N
      send N requests one at a time; print "answered=<n> of=<N> mapped=<ip:port>"
Exit status 0 only if every expected answer arrived and was valid.
Only loopback destinations are accepted.
"""
import argparse, ipaddress, os, socket, struct, sys, time, zlib

MAGIC = 0x2112A442


def request(txid):
    software = b"tailnode"
    attrs = struct.pack("!HH", 0x8022, len(software)) + software
    # header length counts the FINGERPRINT attribute (8 bytes) too
    hdr = struct.pack("!HHI", 0x0001, len(attrs) + 8, MAGIC) + txid
    fp = (zlib.crc32(hdr + attrs) ^ 0x5354554E) & 0xFFFFFFFF
    return hdr + attrs + struct.pack("!HHI", 0x8028, 4, fp)


def parse_response(b, txid):
    """Return (ip, port) from a Binding Success Response for txid, else None."""
    if len(b) < 20:
        return None
    typ, length, cookie = struct.unpack("!HHI", b[:8])
    if typ != 0x0101 or cookie != MAGIC or b[8:20] != txid or 20 + length != len(b):
        return None
    off = 20
    while off + 4 <= len(b):
        at, al = struct.unpack("!HH", b[off:off + 4])
        val = b[off + 4:off + 4 + al]
        if at == 0x0020 and len(val) >= 8:
            fam = val[1]
            port = struct.unpack("!H", val[2:4])[0] ^ (MAGIC >> 16)
            if fam == 1:
                ip = bytes(x ^ y for x, y in zip(val[4:8], struct.pack("!I", MAGIC)))
                return str(ipaddress.IPv4Address(ip)), port
            if fam == 2 and len(val) >= 20:
                key = struct.pack("!I", MAGIC) + txid
                ip = bytes(x ^ y for x, y in zip(val[4:20], key))
                return str(ipaddress.IPv6Address(ip)), port
        off += 4 + al + ((4 - al % 4) % 4)
    return None


def once(sock, addr, timeout):
    txid = os.urandom(12)
    sock.sendto(request(txid), addr)
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(2048)
        except (socket.timeout, ConnectionRefusedError):
            return None
        r = parse_response(data, txid)
        if r:
            return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--wait-first", type=float)
    ap.add_argument("--t0", type=float, default=None)
    ap.add_argument("--count", type=int, default=1)
    a = ap.parse_args()
    if not ipaddress.ip_address(a.host).is_loopback:
        sys.exit("stunprobe: only loopback destinations are allowed")
    addr = (a.host, a.port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if a.wait_first is not None:
        t0 = a.t0 if a.t0 is not None else time.time()
        deadline = time.monotonic() + a.wait_first
        while time.monotonic() < deadline:
            r = once(sock, addr, 0.5)
            if r:
                print("first_answer_s=%.1f mapped=%s:%d" % (time.time() - t0, r[0], r[1]))
                return 0
        print("first_answer_s=none")
        return 1
    ok, last = 0, None
    for _ in range(a.count):
        r = once(sock, addr, 2.0)
        if r:
            ok, last = ok + 1, r
    print("answered=%d of=%d mapped=%s" % (ok, a.count, "%s:%d" % last if last else "none"))
    return 0 if ok == a.count else 1


if __name__ == "__main__":
    sys.exit(main())
