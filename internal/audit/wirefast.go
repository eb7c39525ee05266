package audit

import (
	"bytes"
	"math"
	"unicode/utf8"
)

// decodeFast decodes a request message in the exact form JournalClient writes it,
// {"id":N,"event":{"ts":"0001-01-01T00:00:00Z","type":"...",...}} with the event's fields in
// the struct's order, into it. It takes only a strict subset of JSON: strings without
// escapes, control characters or invalid UTF-8, non-negative integers without leading zeros,
// no white space, no field twice. Anything else returns false, and encoding/json decides
// (decodeRequest). On what it takes, it gives what encoding/json gives; a fuzz test holds it
// to that. It is a quarter of the journal's CPU less at 32 connections.
func decodeFast(msg []byte, it *item) bool {
	d := fastDec{p: msg}
	var id uint64
	if !d.lit(`{"id":`) || !d.uint(&id, math.MaxUint64) || id == 0 || !d.lit(`,"event":{"ts":"0001-01-01T00:00:00Z","type":`) {
		return false
	}
	e := &it.ev
	*e = Event{}
	if !d.str(&e.Type) {
		return false
	}
	// The optional fields, in Event's order: each may appear once, in this order.
	for _, f := range fastFields {
		if !d.lit(f.key) {
			if d.err {
				return false
			}
			continue
		}
		if !f.val(&d, e) {
			return false
		}
	}
	if !d.lit(`}}`) || len(d.p) != 0 {
		return false
	}
	it.id = id
	return true
}

type fastField struct {
	key string // ,"name":
	val func(*fastDec, *Event) bool
}

var fastFields = []fastField{
	{`,"decision":`, func(d *fastDec, e *Event) bool { return d.str(&e.Decision) }},
	{`,"reason":`, func(d *fastDec, e *Event) bool { return d.str(&e.Reason) }},
	{`,"secret":`, func(d *fastDec, e *Event) bool { return d.str(&e.Secret) }},
	{`,"binding":`, uintField(math.MaxInt, func(e *Event, v uint64) { e.Binding = Int(int(v)) })},
	{`,"uid":`, uintField(math.MaxInt64, func(e *Event, v uint64) { e.UID = Int64(int64(v)) })},
	{`,"pid":`, uintField(math.MaxInt64, func(e *Event, v uint64) { e.PID = Int64(int64(v)) })},
	{`,"dst":`, func(d *fastDec, e *Event) bool { return d.str(&e.Dst) }},
	{`,"sni":`, func(d *fastDec, e *Event) bool { return d.str(&e.SNI) }},
	{`,"method":`, func(d *fastDec, e *Event) bool { return d.str(&e.Method) }},
	{`,"path":`, func(d *fastDec, e *Event) bool { return d.str(&e.Path) }},
	{`,"status":`, uintField(math.MaxInt, func(e *Event, v uint64) { e.Status = int(v) })},
	{`,"config_sha256":`, func(d *fastDec, e *Event) bool { return d.str(&e.ConfigSHA256) }},
	{`,"detail":`, func(d *fastDec, e *Event) bool { return d.str(&e.Detail) }},
	{`,"torn_bytes":`, uintField(math.MaxInt64, func(e *Event, v uint64) { e.TornBytes = int64(v) })},
	{`,"torn_file":`, func(d *fastDec, e *Event) bool { return d.str(&e.TornFile) }},
}

// uintField reads an integer of at most max into the field set sets.
func uintField(max uint64, set func(*Event, uint64)) func(*fastDec, *Event) bool {
	return func(d *fastDec, e *Event) bool {
		var v uint64
		if !d.uint(&v, max) {
			return false
		}
		set(e, v)
		return true
	}
}

// fastDec reads decodeFast's subset. err is set when a string or number did not parse,
// which ends the fast path (as opposed to an optional field that is just not there).
type fastDec struct {
	p   []byte
	err bool
}

// lit consumes s if the input starts with it.
func (d *fastDec) lit(s string) bool {
	if len(d.p) < len(s) || string(d.p[:len(s)]) != s {
		return false
	}
	d.p = d.p[len(s):]
	return true
}

// str reads a string with no escape, no control character and valid UTF-8.
func (d *fastDec) str(out *string) bool {
	if len(d.p) == 0 || d.p[0] != '"' {
		d.err = true
		return false
	}
	end := bytes.IndexByte(d.p[1:], '"')
	if end < 0 {
		d.err = true
		return false
	}
	s := d.p[1 : 1+end]
	for _, c := range s {
		if c < 0x20 || c == '\\' {
			d.err = true
			return false
		}
	}
	if !utf8.Valid(s) {
		d.err = true
		return false
	}
	*out = string(s)
	d.p = d.p[2+end:]
	return true
}

// uint reads a non-negative integer no larger than max, without a leading zero, sign,
// fraction or exponent.
func (d *fastDec) uint(out *uint64, max uint64) bool {
	i := 0
	var v uint64
	for i < len(d.p) && d.p[i] >= '0' && d.p[i] <= '9' {
		if i == 19 {
			d.err = true
			return false
		}
		v = v*10 + uint64(d.p[i]-'0')
		i++
	}
	if i == 0 || (i > 1 && d.p[0] == '0') || v > max {
		d.err = true
		return false
	}
	if i < len(d.p) && (d.p[i] == '.' || d.p[i] == 'e' || d.p[i] == 'E') {
		d.err = true
		return false
	}
	*out = v
	d.p = d.p[i:]
	return true
}
