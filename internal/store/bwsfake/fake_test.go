package bwsfake

import (
	"bytes"
	"encoding/base64"
	"testing"
)

// The upstream SDK's own test vector for derive_shareable_key("accesstoken", "sm-access-token").
func TestAccessTokenKeyVector(t *testing.T) {
	_, _, k, err := ParseToken("0.ec2c1d46-6a4b-4751-a310-af9601317f2d.C2IgxjjLF7qSshsbwe8JGcbM075YXw:X8vbvA0bduihIDe/qrzIQQ==")
	if err != nil {
		t.Fatal(err)
	}
	got := base64.StdEncoding.EncodeToString(AccessTokenKey(k))
	if want := "H9/oIRLtL9nGCQOVDjSMoEbJsjWXSOCb3qeyDt6ckzS3FhyboEDWyTP/CQfbIszNmAVg2ExFganG1FVFGXO/Jg=="; got != want {
		t.Fatalf("derived %s, want %s", got, want)
	}
}

func TestEncType2RoundTrip(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 64)
	for _, pt := range []string{"", "V", "sixteen bytes!!!", "a longer secret value with more than one block"} {
		s := EncType2(key, []byte(pt))
		got, err := DecType2(key, s)
		if err != nil || string(got) != pt {
			t.Fatalf("%q: got %q, %v", pt, got, err)
		}
		other := bytes.Repeat([]byte{8}, 64)
		if _, err := DecType2(other, s); err == nil {
			t.Fatal("a wrong key passed the MAC check")
		}
	}
}
