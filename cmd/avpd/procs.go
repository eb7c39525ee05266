package main

import (
	"os"
	"runtime"
)

// journalProcs runs the journal on one P unless GOMAXPROCS says otherwise. It commits
// serially, and its work per event is a few short wake-ups; a second P only spins and wakes
// threads looking for work, on cores the proxy and the agents need.
func journalProcs() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
}
