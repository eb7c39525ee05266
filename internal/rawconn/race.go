//go:build race

package rawconn

// The race detector learns that a write happens before the read of the same bytes from
// syscall.Write and syscall.Read; RawSyscall tells it nothing, and it reports races
// between two goroutines that only talk through a socket. Race builds take syscall's
// calls instead.
const raceEnabled = true
