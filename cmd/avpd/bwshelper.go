package main

import (
	"fmt"
	"io"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws/sdkhelper"
)

// bwsHelper is "avpd bws-helper": the process avpd serve starts to run the Bitwarden SDK,
// so that an abort or a hung call in the SDK never takes the proxy down. It serves the
// socket avpd passes as fd 3 and is not meant to be run by hand.
func bwsHelper(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		fmt.Fprintln(stdout, "usage: avpd bws-helper\n\nStarted by avpd serve for backend type bws; it runs the Bitwarden SDK on the\nsocket passed as fd 3. There is nothing to run by hand.")
		if args[0] == "-h" || args[0] == "--help" {
			return 0
		}
		return 2
	}
	return sdkhelper.Main(stderr)
}
