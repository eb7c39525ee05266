package store

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// NoCoreDumps makes this process non-dumpable (no core file, and same-UID processes cannot
// ptrace it or read /proc/PID/mem) and sets RLIMIT_CORE to 0 in case something turns
// dumping back on. avpd and its BWS helper call it first thing.
func NoCoreDumps() error {
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		// A seccomp filter (systemd's SystemCallFilter=~@resources) may refuse setrlimit;
		// then LimitCORE=0 in the unit must already have done it.
		var rl unix.Rlimit
		if gerr := unix.Getrlimit(unix.RLIMIT_CORE, &rl); gerr != nil || rl.Cur != 0 {
			return fmt.Errorf("set RLIMIT_CORE to 0: %w (with a seccomp filter, set LimitCORE=0 in the unit)", err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_DUMPABLE, 0): %w", err)
	}
	return nil
}

// ProcessHygiene reports what NoCoreDumps set, for status.
type ProcessHygiene struct {
	Dumpable  bool   `json:"dumpable"`
	CoreLimit uint64 `json:"core_limit"`
	// MemlockLimit is RLIMIT_MEMLOCK in bytes (the soft limit).
	MemlockLimit uint64 `json:"memlock_limit"`
}

// CurrentHygiene reads the process's dumpable flag and limits.
func CurrentHygiene() ProcessHygiene {
	var h ProcessHygiene
	if d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); err == nil {
		h.Dumpable = d != 0
	}
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_CORE, &rl) == nil {
		h.CoreLimit = rl.Cur
	}
	if unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl) == nil {
		h.MemlockLimit = rl.Cur
	}
	return h
}

var pageSize = os.Getpagesize()

// mlockFn is unix.Mlock; tests replace it to see the fallback.
var mlockFn = unix.Mlock

// secretMem is memory for one cached value: its own anonymous mapping, excluded from core
// dumps and locked in RAM when RLIMIT_MEMLOCK allows, so the value is never written to swap.
// When the mapping itself fails the value lives on the Go heap (mapped false).
type secretMem struct {
	buf    []byte // len is the value's length, cap the mapping's
	mapped bool
	locked bool
	err    error // why it is not locked
}

func allocSecret(n int) secretMem {
	size := (max(n, 1) + pageSize - 1) / pageSize * pageSize
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return secretMem{buf: make([]byte, n), err: fmt.Errorf("mmap: %w", err)}
	}
	m := secretMem{buf: b[:n], mapped: true}
	unix.Madvise(b, unix.MADV_DONTDUMP)
	if err := mlockFn(b); err != nil {
		m.err = fmt.Errorf("mlock %d bytes: %w (raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK= in the unit)", size, err)
	} else {
		m.locked = true
	}
	return m
}

// free wipes the whole mapping and returns it.
func (m *secretMem) free() {
	full := m.buf[:cap(m.buf)]
	Wipe(full)
	if m.mapped {
		if m.locked {
			unix.Munlock(full)
		}
		unix.Munmap(full)
	}
	m.buf = nil
}

func (m *secretMem) size() int { return cap(m.buf) }
