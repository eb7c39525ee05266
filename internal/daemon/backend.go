package daemon

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bws"
)

// bwsHelperCommand starts the process that runs the Bitwarden SDK: this same binary, so the
// helper always matches the daemon, even if the file on disk was replaced since.
var bwsHelperCommand = []string{"/proc/self/exe", "bws-helper"}

// openBackend builds the configured backend and the cache in front of it. A bws backend
// checks its token file here (so a readable token stops the start) but logs in later, in
// runBackend, so an unreachable BWS never keeps the proxy from starting.
func (d *Daemon) openBackend(cfg *config.Config) error {
	var backend store.SecretsBackend
	switch cfg.Backend.Type {
	case "file":
		fb, err := store.NewFileBackend(cfg.Backend.File.Path)
		if err != nil {
			return config.SecretsFileError(cfg.Backend.File.Path, []int{os.Geteuid()}, err)
		}
		d.file, backend = fb, fb
		_ = d.checkFileNames(cfg) // NewFileBackend has checked the file; this logs missing names
	case "bws":
		w := cfg.Backend.BWS
		b, err := bws.New(bws.Options{
			OrganizationID: w.OrganizationID, AccessTokenFile: w.AccessTokenFile,
			APIURL: w.APIURL, IdentityURL: w.IdentityURL, StateFile: w.StateFile,
			Timeout: w.Timeout, SyncInterval: cfg.Cache.SyncInterval,
			Helper: bwsHelperCommand, Logf: d.logf,
		})
		if err != nil {
			return err
		}
		d.bws, backend = b, b
	default:
		return fmt.Errorf("backend type %q is not available", cfg.Backend.Type)
	}
	d.cache = store.NewCacheWithOptions(backend, store.CacheOptions{
		TTL: cfg.Cache.TTL, Jitter: store.DefaultJitter, MaxEntries: cfg.Cache.MaxEntries, LockMemory: true,
	})
	return nil
}

// runBackend logs in to BWS and then polls it for changed secrets until ctx ends. A failed
// login is logged and shown by status; requests fail closed (503) and the backend retries.
func (d *Daemon) runBackend(ctx context.Context) {
	if d.bws == nil {
		return
	}
	if err := d.bws.Start(ctx); err != nil {
		d.logf("bws: not ready: %v; requests that need a secret get 503 until this is fixed (avpctl status shows the state)", err)
	} else {
		h := d.bws.Health(d.secretNames())
		d.logf("bws: ready: %d secret name(s) in organization %s", h.KnownNames, h.OrganizationID)
		if len(h.Missing) > 0 {
			d.logf("bws: warning: no secret named %s in organization %s that the machine account can read; requests for it get 503", strings.Join(h.Missing, ", "), h.OrganizationID)
		}
	}
	d.bws.Run(ctx, func(name string) { d.cache.Flush(name) })
}

// closeBackend stops the BWS helper and wipes every cached value.
func (d *Daemon) closeBackend() {
	if d.bws != nil {
		d.bws.Close()
	}
	if d.cache != nil {
		d.cache.Flush("")
	}
}

// checkFileNames checks the secrets file as a fetch would and logs the names the config
// fetches that it does not hold: each would get 503 secret_unavailable on first use, and a
// misspelt name is better found at start than by the first agent. The error is the file's.
func (d *Daemon) checkFileNames(cfg *config.Config) error {
	if d.file == nil {
		return nil
	}
	have, err := d.file.Check()
	if err != nil {
		return config.SecretsFileError(cfg.Backend.File.Path, []int{os.Geteuid()}, err)
	}
	missing := cfg.MissingNames(have)
	if len(missing) > 0 {
		d.logf("secrets file %s has no value for %s: requests that inject them get 503 secret_unavailable until it does", cfg.Backend.File.Path, strings.Join(missing, ", "))
	}
	d.fileMissing.Store(&missing)
	return nil
}

func (d *Daemon) secretNames() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.secretNamesLocked()
}

// secretNamesLocked lists the names avpd fetches from the backend (a composed secret
// fetches its parts), sorted; the caller holds d.mu.
func (d *Daemon) secretNamesLocked() []string {
	var names []string
	for _, s := range d.cfg.Secrets {
		for _, n := range s.FetchNames() {
			if !slices.Contains(names, n) {
				names = append(names, n)
			}
		}
	}
	slices.Sort(names)
	return names
}

// backendStatus adds the cache, the process's memory hygiene and the BWS state to status;
// the caller holds d.mu.
func (d *Daemon) backendStatus(st *Status) {
	st.Cache = d.cache.Stats()
	st.Memory = store.CurrentHygiene()
	if d.bws != nil {
		h := d.bws.Health(d.secretNamesLocked())
		st.BWS = &h
	}
	if m := d.fileMissing.Load(); m != nil {
		st.FileMissing = *m
	}
}
