package bws

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// TestLoginTokenNotLeftInJSONPool: WriteFrame wipes its own copies of the encoded login request, but json.Marshal
// encodes into a pooled buffer (encoding/json's encodeStatePool) and only copies out of it;
// the pooled buffer, with the access token's base64, goes back to the pool unwiped, and each
// later WriteFrame (every Get and Sync) reuses it, keeping it alive and overwriting only the
// first ~60 bytes. The package promises "never keeps the token longer than a login".
func TestLoginTokenNotLeftInJSONPool(t *testing.T) {
	key := make([]byte, 16)
	rand.Read(key)
	secret := make([]byte, 30)
	rand.Read(secret)
	tok := []byte("0.ec2c1d46-6a4b-4751-a310-af9601317f2d." + base64.RawURLEncoding.EncodeToString(secret) + ":" + base64.StdEncoding.EncodeToString(key))
	// The needle is base64(tok) as the JSON []byte field encodes it, kept XOR-masked so the
	// test's own copy is never in memory in the clear.
	enc := make([]byte, base64.StdEncoding.EncodedLen(len(tok)))
	base64.StdEncoding.Encode(enc, tok)
	mask := byte(0x5a)
	needle := make([]byte, 48) // a 48-byte run of it is unambiguous
	for i := range needle {
		needle[i] = enc[20+i] ^ mask
	}
	wipe(enc)
	if n := countInOwnMemory(t, needle, mask); n != 0 {
		t.Fatalf("control: needle found %d time(s) before any WriteFrame; the scan is wrong", n)
	}

	if err := WriteFrame(io.Discard, &Request{Op: OpLogin, APIURL: "https://api.bitwarden.com", IdentityURL: "https://identity.bitwarden.com", Token: tok}); err != nil {
		t.Fatal(err)
	}
	wipe(tok)
	// What avpd does afterwards: Gets and Syncs through the same helper connection.
	for range 50 {
		WriteFrame(io.Discard, &Request{Op: OpGet, SecretID: "1b3c5d7e-0000-4000-8000-000000000000"})
	}
	runtime.GC()

	if n := countInOwnMemory(t, needle, mask); n > 0 {
		t.Fatalf("the access token's base64 is still in avpd's memory %d time(s) after the login request was written and wiped", n)
	}
}

// countInOwnMemory scans this process's writable mappings for the unmasked needle.
func countInOwnMemory(t *testing.T, masked []byte, mask byte) int {
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Skip(err)
	}
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		t.Skip(err)
	}
	defer mem.Close()
	first := masked[0] ^ mask
	found := 0
	const chunk = uint64(1 << 20)
	buf := make([]byte, chunk)
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || !strings.HasPrefix(f[1], "rw") {
			continue
		}
		if len(f) >= 6 && strings.HasPrefix(f[5], "[v") { // [vvar], [vsyscall]
			continue
		}
		lo, hi, _ := strings.Cut(f[0], "-")
		a, _ := strconv.ParseUint(lo, 16, 64)
		b, _ := strconv.ParseUint(hi, 16, 64)
		for off := a; off < b; off += chunk - uint64(len(masked)) {
			n, _ := mem.ReadAt(buf[:min(chunk, b-off)], int64(off))
			for i := 0; i+len(masked) <= n; i++ {
				if buf[i] != first {
					continue
				}
				j := 1
				for j < len(masked) && buf[i+j] == masked[j]^mask {
					j++
				}
				if j == len(masked) && i < int(chunk)-len(masked) || j == len(masked) && off+chunk >= b {
					found++
				}
			}
			clear(buf) // never let the scan's own copy be found again
			if off+chunk >= b {
				break
			}
		}
	}
	return found
}

// marshal's login frame decodes to the same request as json.Marshal's.
func TestMarshalLoginMatchesJSON(t *testing.T) {
	r := &Request{ID: 7, Op: OpLogin, APIURL: "https://api.example", IdentityURL: "https://id.example", Token: []byte("0.abc+/=\"\\x"), StateFile: "/var/lib/s"}
	a, err := marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var got Request
	if err := json.Unmarshal(a, &got); err != nil {
		t.Fatalf("%s: %v", a, err)
	}
	if got.ID != r.ID || got.Op != r.Op || got.APIURL != r.APIURL || got.IdentityURL != r.IdentityURL || string(got.Token) != string(r.Token) || got.StateFile != r.StateFile {
		t.Fatalf("got %+v from %s", got, a)
	}
}
