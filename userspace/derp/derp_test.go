package derp

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Keys of the worked example in derp-protocol.md §9.
var (
	exServerPriv = "1011111111111111111111111111111111111111111111111111111111111151"
	exServerPub  = "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13"
	exClientPriv = "2022222222222222222222222222222222222222222222222222222222222262"
	exClientPub  = "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20"
)

func exampleKeys(t testing.TB) (sp PrivateKey, spub PublicKey, cp PrivateKey, cpub PublicKey) {
	t.Helper()
	var err error
	if sp, err = ParsePrivateKey("privkey:" + exServerPriv); err != nil {
		t.Fatal(err)
	}
	if cp, err = ParsePrivateKey("privkey:" + exClientPriv); err != nil {
		t.Fatal(err)
	}
	if spub, err = ParsePublicKey(exServerPub); err != nil {
		t.Fatal(err)
	}
	if cpub, err = ParsePublicKey("nodekey:" + exClientPub); err != nil {
		t.Fatal(err)
	}
	return
}

func TestWorkedExampleKeys(t *testing.T) {
	sp, spub, cp, cpub := exampleKeys(t)
	if got := sp.Public(); got != spub {
		t.Errorf("server public = %s, want %s", got, spub)
	}
	if got := cp.Public(); got != cpub {
		t.Errorf("client public = %s, want %s", got, cpub)
	}
}

func TestWorkedExampleServerKeyFrame(t *testing.T) {
	_, spub, _, _ := exampleKeys(t)
	got := AppendServerKey(nil, spub)
	want := mustHex(t, "01 00000028 4445525 0f09f9491"+exServerPub)
	if !bytes.Equal(got, want) {
		t.Fatalf("ServerKey = %x\nwant       %x", got, want)
	}
	typ, n := ParseFrameHeader(got)
	k, err := ParseServerKey(got[FrameHeaderLen:])
	if typ != FrameServerKey || n != 40 || err != nil || k != spub {
		t.Fatalf("parse: %v %d %v %v", typ, n, k, err)
	}
	bad := bytes.Clone(got[FrameHeaderLen:])
	bad[0] = 'X'
	if _, err := ParseServerKey(bad); !errors.Is(err, ErrBadMagic) {
		t.Fatalf("bad magic: err = %v", err)
	}
}

func TestWorkedExampleClientInfo(t *testing.T) {
	sp, spub, cp, cpub := exampleKeys(t)
	var nonce [NonceLen]byte
	for i := range nonce {
		nonce[i] = byte(i)
	}
	sealed := SealWithNonce(nil, cp, spub, nonce, []byte(`{"version":2,"CanAckPings":true}`))
	frame := AppendFrame(nil, FrameClientInfo, append(cpub[:], sealed...))
	want := mustHex(t, "02 00000068"+exClientPub+
		"000102030405060708090a0b0c0d0e0f1011121314151617"+
		"a858a062bb55fbd0e565bf952225b5e2"+
		"20ae6ff32ce093a7548f0f9efd7331db8b94711fe4546f1ed0d738121d94abe3")
	if !bytes.Equal(frame, want) {
		t.Fatalf("ClientInfo = %x\nwant        %x", frame, want)
	}
	key, info, err := OpenClientInfo(sp, frame[FrameHeaderLen:])
	if err != nil {
		t.Fatal(err)
	}
	if key != cpub || info.Version != 2 || !info.CanAckPings || !info.MeshKey.IsZero() || info.IsProber {
		t.Fatalf("opened %v %+v", key, info)
	}
	// Our own encoder produces what the reference client sends.
	msg, _ := json.Marshal(&ClientInfo{Version: 2, CanAckPings: true})
	if string(msg) != `{"version":2,"CanAckPings":true}` {
		t.Fatalf("ClientInfo JSON = %s", msg)
	}
}

func TestWorkedExampleServerInfo(t *testing.T) {
	sp, spub, cp, cpub := exampleKeys(t)
	var nonce [NonceLen]byte
	for i := range nonce {
		nonce[i] = byte(0x30 + i)
	}
	msg, _ := json.Marshal(&ServerInfo{Version: ProtocolVersion})
	if string(msg) != `{"version":2}` {
		t.Fatalf("ServerInfo JSON = %s", msg)
	}
	frame := AppendFrame(nil, FrameServerInfo, SealWithNonce(nil, sp, cpub, nonce, msg))
	want := mustHex(t, "03 00000035 303132333435363738393a3b3c3d3e3f4041424344454647"+
		"e8445a0c4ac4b2002844c1eaaa643d9c e320c1e9340624bc9f901d8163")
	if !bytes.Equal(frame, want) {
		t.Fatalf("ServerInfo = %x\nwant        %x", frame, want)
	}
	info, err := OpenServerInfo(cp, spub, frame[FrameHeaderLen:])
	if err != nil || info.Version != 2 {
		t.Fatalf("open: %+v %v", info, err)
	}
}

func TestClientInfoRoundTripAndFailures(t *testing.T) {
	server, _ := NewPrivateKey()
	client, _ := NewPrivateKey()
	other, _ := NewPrivateKey()
	mk, err := ParseMeshKey(strings.Repeat("ab", 32))
	if err != nil {
		t.Fatal(err)
	}
	in := &ClientInfo{MeshKey: mk, Version: 2, IsProber: true, AppName: "x"}
	frame, err := AppendClientInfo(nil, client, server.Public(), in)
	if err != nil {
		t.Fatal(err)
	}
	key, out, err := OpenClientInfo(server, frame[FrameHeaderLen:])
	if err != nil || key != client.Public() || *out != *in {
		t.Fatalf("round trip: %v %+v %v", key, out, err)
	}
	// Sealed to the wrong server key.
	frame2, _ := AppendClientInfo(nil, client, other.Public(), in)
	if _, _, err := OpenClientInfo(server, frame2[FrameHeaderLen:]); !errors.Is(err, ErrBoxOpen) {
		t.Fatalf("wrong key: err = %v", err)
	}
	// Claiming someone else's key.
	p := bytes.Clone(frame[FrameHeaderLen:])
	op := other.Public()
	copy(p, op[:])
	if _, _, err := OpenClientInfo(server, p); !errors.Is(err, ErrBoxOpen) {
		t.Fatalf("forged key: err = %v", err)
	}
	// Short payload.
	if _, _, err := OpenClientInfo(server, p[:55]); !errors.Is(err, ErrMalformed) {
		t.Fatalf("short: err = %v", err)
	}
	// Bad JSON and a mesh key of the wrong length both make it invalid.
	for _, js := range []string{`{`, `{"meshKey":"abcd"}`, `{"MESHKEY":"` + strings.Repeat("zz", 32) + `"}`} {
		sealed, _ := Seal(client, server.Public(), []byte(js))
		cp := client.Public()
		if _, _, err := OpenClientInfo(server, append(cp[:], sealed...)); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err = %v", js, err)
		}
	}
	// Case-insensitive field names, unknown fields ignored.
	sealed, _ := Seal(client, server.Public(), []byte(`{"MeshKey":"`+strings.Repeat("ab", 32)+`","VERSION":2,"canackpings":true,"future":1}`))
	cp := client.Public()
	_, info, err := OpenClientInfo(server, append(cp[:], sealed...))
	if err != nil || !info.MeshKey.Equal(mk) || info.Version != 2 || !info.CanAckPings {
		t.Fatalf("case-insensitive: %+v %v", info, err)
	}
}

func TestFrameCodecs(t *testing.T) {
	k1, k2 := PublicKey{1, 2, 3}, PublicKey{9, 8, 7}
	pkt := []byte("hello")

	b := AppendSendPacket(nil, k1, pkt)
	if typ, n := ParseFrameHeader(b); typ != FrameSendPacket || int(n) != len(b)-FrameHeaderLen {
		t.Fatalf("header %v %d", typ, n)
	}
	if d, p, err := ParseSendPacket(b[FrameHeaderLen:]); d != k1 || string(p) != "hello" || err != nil {
		t.Fatalf("SendPacket %v %q %v", d, p, err)
	}
	b = AppendForwardPacket(nil, k1, k2, pkt)
	if s, d, p, err := ParseForwardPacket(b[FrameHeaderLen:]); s != k1 || d != k2 || string(p) != "hello" || err != nil {
		t.Fatalf("ForwardPacket %v %v %q %v", s, d, p, err)
	}
	if _, _, err := ParseSendPacket(make([]byte, 31)); !errors.Is(err, ErrMalformed) {
		t.Fatal("short SendPacket accepted")
	}
	if _, _, err := ParseSendPacket(make([]byte, KeyLen+MaxPacketSize+1)); !errors.Is(err, ErrMalformed) {
		t.Fatal("oversized SendPacket accepted")
	}
	if _, _, _, err := ParseForwardPacket(make([]byte, 63)); !errors.Is(err, ErrMalformed) {
		t.Fatal("short ForwardPacket accepted")
	}

	b = AppendPeerGone(nil, k2, PeerGoneNotHere)
	if k, r, err := ParsePeerGone(b[FrameHeaderLen:]); k != k2 || r != PeerGoneNotHere || err != nil || len(b) != FrameHeaderLen+33 {
		t.Fatalf("PeerGone %v %v %v", k, r, err)
	}
	if _, r, _ := ParsePeerGone(k2[:]); r != PeerGoneDisconnected {
		t.Fatal("PeerGone without reason")
	}

	pp := PeerPresent{Key: k1, Addr: netip.MustParseAddrPort("192.0.2.1:1025"), Flags: PeerPresentIsMeshPeer}
	b = AppendPeerPresent(nil, pp)
	if len(b) != FrameHeaderLen+PeerPresentLen {
		t.Fatalf("PeerPresent length %d", len(b))
	}
	if !bytes.Equal(b[FrameHeaderLen+KeyLen:FrameHeaderLen+KeyLen+16], netip.MustParseAddr("::ffff:192.0.2.1").AsSlice()) {
		t.Fatalf("PeerPresent address %x", b[FrameHeaderLen+KeyLen:])
	}
	if got, err := ParsePeerPresent(b[FrameHeaderLen:]); got != pp || err != nil {
		t.Fatalf("PeerPresent %+v %v", got, err)
	}
	for _, n := range []int{32, 50} {
		got, err := ParsePeerPresent(b[FrameHeaderLen : FrameHeaderLen+n])
		if err != nil || got.Key != k1 || got.Flags != 0 {
			t.Fatalf("PeerPresent/%d %+v %v", n, got, err)
		}
	}

	var ping [8]byte
	copy(ping[:], "12345678")
	b = AppendPing(nil, ping)
	if d, err := ParsePing(b[FrameHeaderLen:]); d != ping || err != nil {
		t.Fatalf("Ping %v %v", d, err)
	}
	if _, err := ParsePing(make([]byte, 7)); err == nil {
		t.Fatal("short Ping accepted")
	}
	if _, err := ParsePing(make([]byte, 1001)); err == nil {
		t.Fatal("long Ping accepted")
	}
	if d, err := ParsePing(append(ping[:], make([]byte, 992)...)); d != ping || err != nil {
		t.Fatal("1000-byte Ping refused")
	}
	if !bytes.Equal(AppendPong(nil, ping), mustHex(t, "13 00000008 3132333435363738")) {
		t.Fatal("Pong bytes")
	}

	if v, err := ParseNotePreferred([]byte{7}); !v || err != nil {
		t.Fatal("NotePreferred non-zero")
	}
	if _, err := ParseNotePreferred(nil); err == nil {
		t.Fatal("empty NotePreferred accepted")
	}
	if !bytes.Equal(AppendNotePreferred(nil, true), []byte{7, 0, 0, 0, 1, 1}) {
		t.Fatal("NotePreferred bytes")
	}
	if k, err := ParseClosePeer(AppendClosePeer(nil, k2)[FrameHeaderLen:]); k != k2 || err != nil {
		t.Fatal("ClosePeer")
	}
	if !bytes.Equal(AppendKeepAlive(nil), []byte{6, 0, 0, 0, 0}) || !bytes.Equal(AppendWatchConns(nil), []byte{0x10, 0, 0, 0, 0}) {
		t.Fatal("empty frames")
	}
	if !bytes.Equal(AppendHealth(nil, "dup"), []byte{0x14, 0, 0, 0, 3, 'd', 'u', 'p'}) {
		t.Fatal("Health bytes")
	}
	b = AppendRestarting(nil, 1500*time.Millisecond, 10*time.Second)
	if !bytes.Equal(b, mustHex(t, "15 00000008 000005dc 00002710")) {
		t.Fatalf("Restarting bytes %x", b)
	}
	if r, tf, err := ParseRestarting(b[FrameHeaderLen:]); r != 1500*time.Millisecond || tf != 10*time.Second || err != nil {
		t.Fatal("Restarting parse")
	}
	if FrameType(0x42).String() != "0x42" || FramePing.String() != "Ping" {
		t.Fatal("FrameType.String")
	}
}

func TestLooksLikeDisco(t *testing.T) {
	p := append([]byte(DiscoMagic), make([]byte, 56)...)
	if !LooksLikeDisco(p) {
		t.Fatal("62-byte disco not detected")
	}
	if LooksLikeDisco(p[:61]) {
		t.Fatal("61 bytes detected as disco")
	}
	p[0] = 'X'
	if LooksLikeDisco(p) {
		t.Fatal("wrong magic detected as disco")
	}
}

func TestFrameReader(t *testing.T) {
	var stream []byte
	stream = AppendPing(stream, [8]byte{1})
	stream = AppendFrame(stream, 0x42, []byte("unknown"))
	stream = AppendFrameHeader(stream, FrameSendPacket, 2000)
	fr := NewFrameReader(bytes.NewReader(stream), 1000)
	typ, p, err := fr.ReadFrame()
	if typ != FramePing || len(p) != 8 || err != nil {
		t.Fatalf("first frame %v %x %v", typ, p, err)
	}
	typ, n, err := fr.ReadHeader()
	if typ != 0x42 || n != 7 || err != nil {
		t.Fatalf("second header %v %d %v", typ, n, err)
	}
	if err := fr.Skip(n, 6); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("skip over cap: %v", err)
	}
	if err := fr.Skip(n, 1000); err != nil {
		t.Fatal(err)
	}
	if _, _, err := fr.ReadHeader(); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("oversized: %v", err)
	}
	// Truncated payload.
	fr = NewFrameReader(bytes.NewReader(AppendFrameHeader(nil, FramePing, 8)), 0)
	if _, _, err := fr.ReadFrame(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated: %v", err)
	}
	if err := SkipPayload(bytes.NewReader([]byte{1}), 5, 10); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated skip: %v", err)
	}
}

func TestKeys(t *testing.T) {
	k, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	if k[0]&7 != 0 || k[31]&128 != 0 || k[31]&64 == 0 {
		t.Fatalf("not clamped: %x", k[:])
	}
	txt, _ := k.MarshalText()
	var k2 PrivateKey
	if err := k2.UnmarshalText(txt); err != nil || !k2.Equal(k) {
		t.Fatalf("private text round trip: %v", err)
	}
	if strings.Contains(k.String(), hex.EncodeToString(k[:])) {
		t.Fatal("String leaks the private key")
	}
	pub := k.Public()
	txt, _ = pub.MarshalText()
	if !strings.HasPrefix(string(txt), "nodekey:") {
		t.Fatalf("public text %s", txt)
	}
	var p2 PublicKey
	if err := p2.UnmarshalText(txt); err != nil || p2 != pub {
		t.Fatal("public text round trip")
	}
	for _, bad := range []string{"", "privkey:12", "privkey:" + strings.Repeat("zz", 32), strings.Repeat("00", 32)} {
		if _, err := ParsePrivateKey(bad); err == nil {
			t.Errorf("ParsePrivateKey(%q) accepted", bad)
		}
	}
	if _, err := ParsePublicKey("abc"); err == nil {
		t.Error("short public key accepted")
	}
}

func TestKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "derper.key")
	k, err := LoadOrCreateKeyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", st.Mode().Perm())
	}
	b, _ := os.ReadFile(path)
	var raw map[string]string
	if err := json.Unmarshal(b, &raw); err != nil || !strings.HasPrefix(raw["PrivateKey"], "privkey:") || len(raw) != 1 {
		t.Fatalf("file content %s (%v)", b, err)
	}
	k2, err := LoadOrCreateKeyFile(path)
	if err != nil || !k2.Equal(k) {
		t.Fatalf("reload: %v", err)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}

	// A file written by derper (tab-indented, exactly this form) loads.
	derperFile := filepath.Join(dir, "derper.key")
	os.WriteFile(derperFile, []byte("{\n\t\"PrivateKey\": \"privkey:"+exServerPriv+"\"\n}"), 0o600)
	k3, err := LoadOrCreateKeyFile(derperFile)
	if err != nil || k3.Public().String() != exServerPub {
		t.Fatalf("derper file: %v", err)
	}

	for name, content := range map[string]string{
		"garbage":  "not json",
		"missing":  `{"Other":1}`,
		"badhex":   `{"PrivateKey":"privkey:xyz"}`,
		"noprefix": `{"PrivateKey":"` + exServerPriv + `"}`,
		"zero":     `{"PrivateKey":"privkey:` + strings.Repeat("00", 32) + `"}`,
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o600)
		_, err := LoadOrCreateKeyFile(p)
		if err == nil || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: err = %v (should name the file)", name, err)
		}
	}
}
