package store

import (
	"context"
	"math/rand/v2"
	"sync"
	"time"
)

// Cache is a TTL cache in front of a backend. Concurrent misses for one name share one
// fetch (singleflight), failures are never cached, and values are overwritten when they
// leave the cache. Entries live in their own mlocked, non-dumpable pages where the memlock
// limit allows (see CacheStats), and expire on a timer, so an expired value does not wait
// for the next request to be wiped.
type Cache struct {
	backend SecretsBackend
	opts    CacheOptions
	now     func() time.Time
	// jitter returns a fraction in [0, 1) of opts.Jitter to take off an entry's TTL.
	jitter func() float64

	mu       sync.Mutex
	entries  map[string]*entry
	inflight map[string]*call
	// gen increases on every flush so a fetch that started before a flush cannot store
	// a value the operator just asked to forget.
	gen uint64
	// lockErr is the last reason a value could not be locked in RAM.
	lockErr  string
	unlocked int
}

// CacheOptions tune a Cache.
type CacheOptions struct {
	// TTL is the upper bound on how long a fetched value is reused (I8).
	TTL time.Duration
	// Jitter shortens each entry's lifetime by a random fraction of TTL up to Jitter (0.1 is
	// up to 10%), so values fetched together are not all refetched together. TTL stays the
	// upper bound.
	Jitter float64
	// MaxEntries bounds the number of cached values; at the bound, the entry closest to
	// expiry is evicted. 0 means no bound.
	MaxEntries int
	// LockMemory puts each value in its own mlocked mapping, excluded from core dumps.
	LockMemory bool
}

// DefaultJitter is the TTL jitter NewCache uses.
const DefaultJitter = 0.1

type entry struct {
	value   []byte
	mem     secretMem
	expires time.Time
	timer   *time.Timer
}

type call struct {
	done  chan struct{}
	value []byte
	err   error
	// refs counts the fetcher and the waiters still to copy value; the last one wipes it.
	refs int
}

func (c *Cache) release(cl *call) {
	c.mu.Lock()
	cl.refs--
	last := cl.refs == 0
	c.mu.Unlock()
	if last {
		Wipe(cl.value)
	}
}

// NewCache wraps backend with a cache whose entries live for at most ttl, with the default
// jitter, no entry bound and values on the Go heap.
func NewCache(backend SecretsBackend, ttl time.Duration) *Cache {
	return NewCacheWithOptions(backend, CacheOptions{TTL: ttl, Jitter: DefaultJitter})
}

// NewCacheWithOptions wraps backend with a cache tuned by opts.
func NewCacheWithOptions(backend SecretsBackend, opts CacheOptions) *Cache {
	opts.Jitter = min(max(opts.Jitter, 0), 0.5)
	return &Cache{
		backend: backend, opts: opts, now: time.Now, jitter: rand.Float64,
		entries: map[string]*entry{}, inflight: map[string]*call{},
	}
}

// Get returns a copy of the named secret that the caller must Wipe when done.
func (c *Cache) Get(ctx context.Context, name string) ([]byte, error) {
	c.mu.Lock()
	if e, ok := c.entries[name]; ok {
		if c.now().Before(e.expires) {
			v := append([]byte(nil), e.value...)
			c.mu.Unlock()
			return v, nil
		}
		c.evictLocked(name, e)
	}
	cl, ok := c.inflight[name]
	if !ok {
		cl = &call{done: make(chan struct{}), refs: 1}
		c.inflight[name] = cl
		gen := c.gen
		go c.fetch(name, cl, gen)
	}
	cl.refs++
	c.mu.Unlock()
	defer c.release(cl)

	select {
	case <-cl.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if cl.err != nil {
		return nil, cl.err
	}
	return append([]byte(nil), cl.value...), nil
}

// fetch runs detached from any one caller's context, so a caller that gives up does not
// fail the others waiting on the same fetch; the backend bounds its own time.
func (c *Cache) fetch(name string, cl *call, gen uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v, err := c.backend.Fetch(ctx, name)
	c.mu.Lock()
	delete(c.inflight, name)
	if err == nil && gen == c.gen {
		c.storeLocked(name, v)
	}
	c.mu.Unlock()
	cl.value, cl.err = v, err
	close(cl.done)
	c.release(cl)
}

// storeLocked caches a copy of v; the caller holds c.mu.
func (c *Cache) storeLocked(name string, v []byte) {
	if old, ok := c.entries[name]; ok {
		c.evictLocked(name, old)
	}
	if c.opts.MaxEntries > 0 {
		for len(c.entries) >= c.opts.MaxEntries {
			var victim string
			var first time.Time
			for k, e := range c.entries {
				if victim == "" || e.expires.Before(first) {
					victim, first = k, e.expires
				}
			}
			c.evictLocked(victim, c.entries[victim])
		}
	}
	e := &entry{}
	if c.opts.LockMemory {
		e.mem = allocSecret(len(v))
		if !e.mem.locked && e.mem.err != nil {
			c.unlocked++
			c.lockErr = e.mem.err.Error()
		}
	} else {
		e.mem = secretMem{buf: make([]byte, len(v))}
	}
	copy(e.mem.buf, v)
	e.value = e.mem.buf
	ttl := c.opts.TTL - time.Duration(c.jitter()*c.opts.Jitter*float64(c.opts.TTL))
	e.expires = c.now().Add(ttl)
	e.timer = time.AfterFunc(ttl, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if cur, ok := c.entries[name]; ok && cur == e {
			c.evictLocked(name, e)
		}
	})
	c.entries[name] = e
}

// evictLocked wipes and forgets one entry; the caller holds c.mu.
func (c *Cache) evictLocked(name string, e *entry) {
	if e.timer != nil {
		e.timer.Stop()
	}
	if c.opts.LockMemory && !e.mem.locked && e.mem.err != nil {
		c.unlocked--
	}
	e.mem.free()
	e.value = nil
	delete(c.entries, name)
}

// Flush forgets name, or every secret when name is "", and returns how many values it
// wiped. Fetches already running when Flush is called do not store their result.
func (c *Cache) Flush(name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	n := 0
	for k, e := range c.entries {
		if name == "" || k == name {
			c.evictLocked(k, e)
			n++
		}
	}
	return n
}

// Len is the number of cached secrets, for status.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}

// CacheStats describe the cache for status: never a name's value, only counts.
type CacheStats struct {
	Entries    int `json:"entries"`
	MaxEntries int `json:"max_entries,omitempty"`
	// Locked counts values in mlocked memory; Unlocked those that could not be locked, with
	// LockError saying why. Both are 0 when locking is off.
	LockMemory  bool   `json:"lock_memory"`
	Locked      int    `json:"locked"`
	Unlocked    int    `json:"unlocked"`
	LockedBytes int    `json:"locked_bytes"`
	LockError   string `json:"lock_error,omitempty"`
}

// Stats reports the cache's size and how much of it is locked in RAM.
func (c *Cache) Stats() CacheStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := CacheStats{Entries: len(c.entries), MaxEntries: c.opts.MaxEntries, LockMemory: c.opts.LockMemory, Unlocked: c.unlocked}
	for _, e := range c.entries {
		if e.mem.locked {
			st.Locked++
			st.LockedBytes += e.mem.size()
		}
	}
	if st.Unlocked > 0 {
		st.LockError = c.lockErr
	}
	return st
}
