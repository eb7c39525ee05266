package bws

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// The helper protocol: each message is a 4-byte big-endian length and a JSON object. Requests
// carry an id; the helper answers each one once, in any order, so several calls can be in
// flight on one socket. Secret values travel as base64 ([]byte fields) so that neither side
// has to hold them in a Go string it cannot wipe.

// Operations the helper runs.
const (
	OpLogin = "login"
	OpList  = "list"
	OpGet   = "get"
	OpSync  = "sync"
)

// maxFrame bounds one message; a List of every secret in a large organization fits easily.
const maxFrame = 16 << 20

// Request is one call to the helper.
type Request struct {
	ID uint64 `json:"id"`
	Op string `json:"op"`
	// Login.
	APIURL      string `json:"api_url,omitempty"`
	IdentityURL string `json:"identity_url,omitempty"`
	Token       []byte `json:"token,omitempty"`
	StateFile   string `json:"state_file,omitempty"`
	// List and Sync.
	OrgID      string     `json:"org_id,omitempty"`
	LastSynced *time.Time `json:"last_synced,omitempty"`
	// Get.
	SecretID string `json:"secret_id,omitempty"`
}

// Response is the helper's answer. Err is already scrubbed: it never quotes the token, a
// response body or a secret.
type Response struct {
	ID  uint64 `json:"id"`
	Err string `json:"err,omitempty"`
	// Status is the HTTP status the SDK reported with an API error, 0 when none.
	Status int `json:"status,omitempty"`
	// List and Sync: the secrets' identities, never their values.
	Secrets    []Ident `json:"secrets,omitempty"`
	HasChanges bool    `json:"has_changes,omitempty"`
	// Get.
	Key   string    `json:"key,omitempty"`
	Value []byte    `json:"value,omitempty"`
	Rev   time.Time `json:"rev,omitzero"`
}

// Ident names one secret without its value.
type Ident struct {
	ID  string    `json:"id"`
	Key string    `json:"key"`
	Rev time.Time `json:"rev,omitzero"`
}

// WriteFrame writes v as one message. The encoded buffer is wiped after the write because it
// may hold a token or a value in base64.
func WriteFrame(w io.Writer, v any) error {
	data, err := marshal(v)
	if err != nil {
		return err
	}
	defer wipe(data)
	if len(data) > maxFrame {
		return fmt.Errorf("message of %d bytes exceeds the %d byte limit", len(data), maxFrame)
	}
	buf := make([]byte, 4+len(data))
	defer wipe(buf)
	binary.BigEndian.PutUint32(buf, uint32(len(data)))
	copy(buf[4:], data)
	_, err = w.Write(buf)
	return err
}

// marshal is json.Marshal but for a Request's token, which it writes itself: json.Marshal
// encodes into a pooled buffer of its own and copies out of it, so the token's base64 would
// stay in that buffer, unwiped and reused by every later message.
func marshal(v any) ([]byte, error) {
	r, ok := v.(*Request)
	if !ok || len(r.Token) == 0 {
		return json.Marshal(v)
	}
	rest := *r
	rest.Token = nil
	data, err := json.Marshal(&rest) // an object with at least id and op
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, len(data)+len(`"token":"",`)+base64.StdEncoding.EncodedLen(len(r.Token)))
	out = append(out, `{"token":"`...)
	n := len(out)
	out = out[:n+base64.StdEncoding.EncodedLen(len(r.Token))]
	base64.StdEncoding.Encode(out[n:], r.Token)
	out = append(out, `",`...)
	return append(out, data[1:]...), nil
}

// ReadFrame reads one message into v and wipes the raw bytes.
func ReadFrame(r io.Reader, v any) error {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > maxFrame {
		return fmt.Errorf("message of %d bytes exceeds the %d byte limit", n, maxFrame)
	}
	buf := make([]byte, n)
	defer wipe(buf)
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return json.Unmarshal(buf, v)
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}
