package bwsfake

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// AccessTokenKey derives the 64-byte key (32 enc + 32 mac) the SDK uses to decrypt the
// login's encrypted_payload from the 16 bytes after ':' in an access token:
// HKDF-Expand(HMAC-SHA256("bitwarden-accesstoken", secret16), "sm-access-token", 64).
func AccessTokenKey(secret16 []byte) []byte {
	m := hmac.New(sha256.New, []byte("bitwarden-accesstoken"))
	m.Write(secret16)
	prk := m.Sum(nil)
	okm, err := hkdf.Expand(sha256.New, prk, "sm-access-token", 64)
	if err != nil {
		panic(err) // 64 bytes of SHA-256 output is always in range
	}
	return okm
}

// ParseToken splits "0.<id>.<client_secret>:<b64 16 bytes>" the way the SDK does.
func ParseToken(token string) (id, clientSecret string, secret16 []byte, err error) {
	left, key, ok := strings.Cut(token, ":")
	if !ok {
		return "", "", nil, errors.New("no decryption key")
	}
	parts := strings.Split(left, ".")
	if len(parts) != 3 || parts[0] != "0" {
		return "", "", nil, errors.New("wrong shape")
	}
	k, err := base64.StdEncoding.WithPadding(base64.NoPadding).DecodeString(strings.TrimRight(key, "="))
	if err != nil || len(k) != 16 {
		return "", "", nil, errors.New("bad key")
	}
	return parts[1], parts[2], k, nil
}

// EncType2 encrypts plaintext as a type-2 EncString ("2.iv|ct|mac", AES-256-CBC + HMAC-SHA256)
// under a 64-byte key.
func EncType2(key64, plaintext []byte) string {
	if len(key64) != 64 {
		panic("bwsfake: type-2 keys are 64 bytes")
	}
	iv := make([]byte, aes.BlockSize)
	rand.Read(iv)
	pad := aes.BlockSize - len(plaintext)%aes.BlockSize
	pt := append(append([]byte(nil), plaintext...), bytes.Repeat([]byte{byte(pad)}, pad)...)
	block, _ := aes.NewCipher(key64[:32])
	ct := make([]byte, len(pt))
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, pt)
	m := hmac.New(sha256.New, key64[32:])
	m.Write(iv)
	m.Write(ct)
	b64 := base64.StdEncoding.EncodeToString
	return "2." + b64(iv) + "|" + b64(ct) + "|" + b64(m.Sum(nil))
}

// DecType2 reverses EncType2, checking the MAC first.
func DecType2(key64 []byte, s string) ([]byte, error) {
	rest, ok := strings.CutPrefix(s, "2.")
	if !ok {
		return nil, errors.New("not a type-2 EncString")
	}
	parts := strings.Split(rest, "|")
	if len(parts) != 3 {
		return nil, errors.New("type-2 EncString needs iv|ct|mac")
	}
	var raw [3][]byte
	for i, p := range parts {
		b, err := base64.StdEncoding.DecodeString(p)
		if err != nil {
			return nil, err
		}
		raw[i] = b
	}
	iv, ct, mac := raw[0], raw[1], raw[2]
	m := hmac.New(sha256.New, key64[32:])
	m.Write(iv)
	m.Write(ct)
	if !hmac.Equal(m.Sum(nil), mac) {
		return nil, errors.New("MAC mismatch")
	}
	if len(iv) != aes.BlockSize || len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
		return nil, errors.New("bad block layout")
	}
	block, _ := aes.NewCipher(key64[:32])
	pt := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(pt, ct)
	pad := int(pt[len(pt)-1])
	if pad == 0 || pad > aes.BlockSize {
		return nil, errors.New("bad padding")
	}
	return pt[:len(pt)-pad], nil
}

// jwt builds an unsigned-in-spirit JWT: the SDK decodes the middle part (base64url without
// padding) and never checks the signature.
func jwt(claims map[string]any) string {
	enc := base64.RawURLEncoding.EncodeToString
	h, _ := json.Marshal(map[string]string{"alg": "RS256", "typ": "JWT"})
	c, _ := json.Marshal(claims)
	sig := make([]byte, 32)
	rand.Read(sig)
	return enc(h) + "." + enc(c) + "." + enc(sig)
}

func newUUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func randB64(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}
