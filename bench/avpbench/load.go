package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The load subcommand is the Go client for the scenarios h2load cannot express: a new TLS
// connection per request, time to first SSE event, 1 MiB bodies, and holding many idle
// connections. It runs inside the namespace as the target's UID, so the avpd and mitmproxy
// targets are reached through the transparent redirect exactly like an agent. Unlike
// h2load it verifies TLS, against the CA bundle in SSL_CERT_FILE.

type loadResult struct {
	Requests  int       `json:"requests"`
	Errors    int       `json:"errors"`
	FirstErr  string    `json:"first_error,omitempty"`
	Seconds   float64   `json:"seconds"`
	Latencies []float64 `json:"-"`
	P50us     float64   `json:"p50_us"`
	P99us     float64   `json:"p99_us"`
	MeanUs    float64   `json:"mean_us"`
}

func loadMain(args []string) int {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	mode := fs.String("mode", "newconn", "newconn | sse | upload | download | hold")
	url := fs.String("url", "", "request URL")
	auth := fs.String("auth", "", "Authorization header value")
	conns := fs.Int("c", 1, "concurrent connections")
	dur := fs.Duration("d", 3*time.Second, "measured duration")
	warm := fs.Duration("warmup", 500*time.Millisecond, "unmeasured warm-up")
	n := fs.Int("n", 0, "hold: connections to open")
	fs.Parse(args)

	if *mode == "hold" {
		return hold(*url, *auth, *n)
	}
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{ClientSessionCache: tls.NewLRUClientSessionCache(64)},
		DisableKeepAlives:   *mode == "newconn",
		MaxIdleConnsPerHost: *conns,
		DisableCompression:  true,
		ForceAttemptHTTP2:   false, // HTTP/1.1: h2 has its own h2load scenario
	}
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	var upload []byte
	if *mode == "upload" {
		upload = bigBody
	}
	once := func(ctx context.Context) (time.Duration, error) {
		method, body := http.MethodGet, io.Reader(nil)
		if upload != nil {
			method, body = http.MethodPost, bytes.NewReader(upload)
		}
		req, _ := http.NewRequestWithContext(ctx, method, *url, body)
		req.Header.Set("Authorization", *auth)
		if upload != nil {
			req.ContentLength = int64(len(upload))
			req.Header.Set("Content-Type", "application/octet-stream")
		}
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			io.Copy(io.Discard, resp.Body)
			return 0, fmt.Errorf("status %d (%s)", resp.StatusCode, resp.Header.Get("X-Agent-Vault-Proxy"))
		}
		var lat time.Duration
		switch *mode {
		case "sse":
			br := bufio.NewReader(resp.Body)
			for {
				line, err := br.ReadString('\n')
				if strings.HasPrefix(line, "data:") {
					lat = time.Since(start)
					break
				}
				if err != nil {
					return 0, fmt.Errorf("no SSE event: %v", err)
				}
			}
			io.Copy(io.Discard, br)
		case "download":
			got, err := io.Copy(io.Discard, resp.Body)
			if err != nil || got != bodySize {
				return 0, fmt.Errorf("download got %d bytes: %v", got, err)
			}
			lat = time.Since(start)
		default:
			if _, err := io.Copy(io.Discard, resp.Body); err != nil {
				return 0, err
			}
			lat = time.Since(start)
		}
		return lat, nil
	}

	var mu sync.Mutex
	res := loadResult{}
	var wg sync.WaitGroup
	begin := time.Now()
	measureFrom := begin.Add(*warm)
	end := measureFrom.Add(*dur)
	ctx, cancel := context.WithDeadline(context.Background(), end.Add(30*time.Second))
	defer cancel()
	for range *conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lats []float64
			var errs int
			var first error
			for {
				t0 := time.Now()
				if !t0.Before(end) {
					break
				}
				lat, err := once(ctx)
				if t0.Before(measureFrom) {
					continue
				}
				if err != nil {
					errs++
					if first == nil {
						first = err
					}
					continue
				}
				lats = append(lats, float64(lat.Microseconds()))
			}
			mu.Lock()
			res.Latencies = append(res.Latencies, lats...)
			res.Errors += errs
			if first != nil && res.FirstErr == "" {
				res.FirstErr = first.Error()
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.Seconds = time.Since(measureFrom).Seconds()
	res.Requests = len(res.Latencies)
	res.P50us, res.P99us, res.MeanUs = summarize(res.Latencies)
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

// summarize returns p50, p99 and the mean of microsecond samples.
func summarize(us []float64) (p50, p99, mean float64) {
	if len(us) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(us)
	slices.Sort(s)
	var sum float64
	for _, v := range s {
		sum += v
	}
	return pct(s, 50), pct(s, 99), sum / float64(len(s))
}

// pct is the nearest-rank percentile of sorted samples.
func pct(sorted []float64, p float64) float64 {
	i := int(float64(len(sorted))*p/100+0.5) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// hold opens n keep-alive TLS connections, makes one request on each and leaves them idle,
// as an agent's HTTP client leaves its pool between calls. It prints "ready <opened>" and
// keeps them until stdin closes or a signal arrives.
func hold(url, auth string, n int) int {
	host := strings.TrimPrefix(url, "https://")
	host, path, _ := strings.Cut(host, "/")
	cfg := &tls.Config{ServerName: host, NextProtos: []string{"http/1.1"}, ClientSessionCache: tls.NewLRUClientSessionCache(64)}
	reqText := "GET /" + path + " HTTP/1.1\r\nHost: " + host + "\r\nAuthorization: " + auth + "\r\n\r\n"
	var conns []net.Conn
	var firstErr error
	sem := make(chan struct{}, 32)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range n {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			d := &net.Dialer{Timeout: 10 * time.Second}
			c, err := tls.DialWithDialer(d, "tcp", net.JoinHostPort(host, "443"), cfg)
			if err == nil {
				err = oneRequest(c, reqText)
				if err != nil {
					c.Close()
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			conns = append(conns, c)
		}()
	}
	wg.Wait()
	if firstErr != nil {
		fmt.Fprintf(os.Stderr, "hold: %v\n", firstErr)
	}
	fmt.Printf("ready %d\n", len(conns))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	select {
	case <-sig:
	case <-done:
	case <-time.After(2 * time.Minute):
	}
	for _, c := range conns {
		c.Close()
	}
	if len(conns) < n {
		return 1
	}
	return 0
}

// oneRequest sends one HTTP/1.1 request on c and reads the whole response, leaving the
// connection open and idle.
func oneRequest(c net.Conn, req string) error {
	c.SetDeadline(time.Now().Add(30 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, req); err != nil {
		return err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return errors.New(resp.Status)
	}
	return nil
}
