package store

import (
	"context"
	"sync"
	"time"
)

// Cache is a TTL cache in front of a backend. Concurrent misses for one name share one
// fetch (singleflight), failures are never cached, and values are overwritten when they
// leave the cache.
type Cache struct {
	backend SecretsBackend
	ttl     time.Duration
	now     func() time.Time

	mu       sync.Mutex
	entries  map[string]*entry
	inflight map[string]*call
	// gen increases on every flush so a fetch that started before a flush cannot store
	// a value the operator just asked to forget.
	gen uint64
}

type entry struct {
	value   []byte
	expires time.Time
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

// NewCache wraps backend with a cache whose entries live for ttl.
func NewCache(backend SecretsBackend, ttl time.Duration) *Cache {
	return &Cache{backend: backend, ttl: ttl, now: time.Now, entries: map[string]*entry{}, inflight: map[string]*call{}}
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
		Wipe(e.value)
		delete(c.entries, name)
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
		c.entries[name] = &entry{value: append([]byte(nil), v...), expires: c.now().Add(c.ttl)}
	}
	c.mu.Unlock()
	cl.value, cl.err = v, err
	close(cl.done)
	c.release(cl)
}

// Flush forgets name, or every secret when name is "".
func (c *Cache) Flush(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for k, e := range c.entries {
		if name == "" || k == name {
			Wipe(e.value)
			delete(c.entries, k)
		}
	}
}

// Len is the number of cached secrets, for status.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
