package template

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"hash"
)

func hmacNew(k string) hash.Hash { return hmac.New(sha256.New, []byte(k)) }
func hexString(b []byte) string  { return hex.EncodeToString(b) }
