package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestServeHelpPrintsUsageOnce: "avpd serve --help" printed its usage twice, once to stderr
// (flag's own ErrHelp handling) and once to stdout.
func TestServeHelpPrintsUsageOnce(t *testing.T) {
	for _, cmd := range []string{"serve", "journal"} {
		var out, errb bytes.Buffer
		code := run([]string{cmd, "--help"}, &out, &errb)
		if code != 0 || errb.Len() != 0 || strings.Count(out.String(), "usage: avpd "+cmd) != 1 {
			t.Errorf("avpd %s --help: exit %d; stdout %q; stderr %q: want the usage once, on stdout", cmd, code, out.String(), errb.String())
		}
	}
}

// TestServeBadFlagSaysWhich: a flag avpd serve does not know is named, then the usage, on
// stderr, with exit 2.
func TestServeBadFlagSaysWhich(t *testing.T) {
	var out, errb bytes.Buffer
	code := run([]string{"serve", "--bogus"}, &out, &errb)
	if code != 2 || out.Len() != 0 || !strings.Contains(errb.String(), "-bogus") || strings.Count(errb.String(), "usage: avpd serve") != 1 {
		t.Errorf("exit %d; stdout %q; stderr %q", code, out.String(), errb.String())
	}
}
