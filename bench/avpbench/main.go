// Command avpbench is the side-by-side benchmark behind `make bench` (issue 7).
//
// In a throwaway network namespace it runs a Go fake upstream, the real avpd (file backend,
// real audit on the real disk, an enrolled load UID), Debian's nginx as an explicit
// TLS-terminating reverse proxy, and Debian's mitmproxy in transparent mode behind the same
// kind of nftables redirect for a second UID. Each scenario runs against the four targets
// interleaved, in rounds, and the report gives medians and the ratios avpd/direct,
// avpd/nginx and avpd/mitmproxy.
//
// Nothing here touches the host's network: every listener, redirect and connection is inside
// the namespace, every load run is bounded in time, and everything is removed at the end,
// also on Ctrl-C.
//
//	avpbench run  [flags]     the whole suite (root)
//	avpbench load [flags]     the Go load client (run by `run` inside the namespace)
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: avpbench run|load [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "run":
		os.Exit(runMain(os.Args[2:]))
	case "load":
		os.Exit(loadMain(os.Args[2:]))
	}
	fmt.Fprintf(os.Stderr, "avpbench: unknown command %q\n", os.Args[1])
	os.Exit(2)
}
