package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// cmdCacheFlush wipes cached values: those of one secret (a composed secret's parts, or a
// backend name), or all of them. The next request fetches from the backend again.
func (d *Daemon) cmdCacheFlush(ctx context.Context, peer uint32, args []string) (any, error) {
	if len(args) > 1 {
		return nil, errors.New("usage: avpctl cache flush [NAME]")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var names []string
	if len(args) == 1 {
		for _, s := range d.cfg.Secrets {
			if s.Name == args[0] {
				names = s.FetchNames()
			}
		}
		if names == nil && slices.Contains(d.secretNamesLocked(), args[0]) {
			names = []string{args[0]}
		}
		if names == nil {
			return nil, fmt.Errorf("no secret %q in the config; avpctl status lists the secret names", args[0])
		}
	}
	n := 0
	if names == nil {
		n = d.cache.Flush("")
	}
	for _, name := range names {
		n += d.cache.Flush(name)
	}
	what := "every secret"
	if names != nil {
		what = "secret " + strings.Join(names, ", ")
	}
	d.logf("cache flushed by uid %d: %s (%d value(s) wiped)", peer, what, n)
	return map[string]any{"secret": strings.Join(names, ", "), "flushed": n}, nil
}
