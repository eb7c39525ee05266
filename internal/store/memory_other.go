//go:build !linux

package store

import "errors"

var errNoHygiene = errors.New("core dump and mlock controls are only implemented on linux")

// NoCoreDumps is only implemented on linux.
func NoCoreDumps() error { return errNoHygiene }

// ProcessHygiene reports what NoCoreDumps set, for status.
type ProcessHygiene struct {
	Dumpable     bool   `json:"dumpable"`
	CoreLimit    uint64 `json:"core_limit"`
	MemlockLimit uint64 `json:"memlock_limit"`
}

// CurrentHygiene reports a dumpable process: nothing was changed.
func CurrentHygiene() ProcessHygiene { return ProcessHygiene{Dumpable: true, CoreLimit: ^uint64(0)} }

type secretMem struct {
	buf    []byte
	mapped bool
	locked bool
	err    error
}

func allocSecret(n int) secretMem { return secretMem{buf: make([]byte, n), err: errNoHygiene} }

func (m *secretMem) free() { Wipe(m.buf[:cap(m.buf)]); m.buf = nil }

func (m *secretMem) size() int { return cap(m.buf) }
