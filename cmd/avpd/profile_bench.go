//go:build benchprofile

package main

// Built only with -tags benchprofile, by `avpbench run -avpd-cpuprofile` (make bench). A
// production avpd has no profiler: no listener, no signal, nothing to turn on.
//
// With AVPD_CPUPROFILE set, the process profiles its CPU from start; SIGUSR2 stops the
// profile and writes it to that path, and a heap profile beside it (.heap).

import (
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

func init() {
	path := os.Getenv("AVPD_CPUPROFILE")
	if path == "" {
		return
	}
	f, err := os.Create(path)
	if err != nil {
		return
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR2)
	go func() {
		<-sig
		pprof.StopCPUProfile()
		f.Close()
		if h, err := os.Create(path + ".heap"); err == nil {
			pprof.Lookup("heap").WriteTo(h, 0)
			h.Close()
		}
	}()
}
