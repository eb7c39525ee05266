package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// target is one way of reaching the upstream.
type target struct {
	Name string
	uid  int
	host string // URL host the client dials
	auth string // Authorization value the client sends
	ca   string // the CA that verifies what the client sees, for the curl check
	pids func() []int
	// audit returns the number of lines in the target's audit log, or -1.
	audit func() int64
}

// scenario is one load shape.
type scenario struct {
	Name    string `json:"name"`
	Title   string `json:"title"`
	Tool    string `json:"tool"`
	h1      bool
	conns   int
	streams int
	mode    string // load client mode
	path    string
}

type runResult struct {
	Scenario   string  `json:"scenario"`
	Target     string  `json:"target"`
	Phase      string  `json:"phase"`
	Round      int     `json:"round"`
	Requests   int     `json:"requests"`
	Errors     int     `json:"errors"`
	FirstError string  `json:"first_error,omitempty"`
	Seconds    float64 `json:"seconds"`
	RPS        float64 `json:"req_per_s"`
	P50us      float64 `json:"p50_us"`
	P99us      float64 `json:"p99_us"`
	MeanUs     float64 `json:"mean_us"`
	// CPU of the proxy processes (avpd + journal, nginx master + workers, mitmproxy).
	ProxyCPUs float64 `json:"proxy_cpu_s"`
	// JournalCPUs is the part of ProxyCPUs spent in avpd's journal process.
	JournalCPUs float64 `json:"journal_cpu_s,omitempty"`
	CPUPer1k    float64 `json:"proxy_cpu_s_per_1k_req"`
	PeakRSSKB   int64   `json:"proxy_peak_rss_kb"`
	// What the upstream saw during the run: every request must carry the real secret.
	UpstreamRequests int64 `json:"upstream_requests"`
	UpstreamReal     int64 `json:"upstream_with_real_secret"`
	AuditLines       int64 `json:"audit_lines"`
	Valid            bool  `json:"valid"`
}

// procStat returns utime+stime in clock ticks of pid (all its threads).
func procTicks(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+2:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}

func cpuSeconds(pids []int) float64 {
	var t int64
	for _, p := range pids {
		t += procTicks(p)
	}
	return float64(t) / 100 // USER_HZ
}

// statusKB reads a "Key: N kB" line of /proc/pid/status.
func statusKB(pid int, key string) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

func sumKB(pids []int, key string) int64 {
	var t int64
	for _, p := range pids {
		t += statusKB(p, key)
	}
	return t
}

// resetPeak makes VmHWM start again from the current RSS (clear_refs 5), so the peak is per run.
func resetPeak(pids []int) {
	for _, p := range pids {
		os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", p), []byte("5"), 0o200)
	}
}

func countLines(path string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	var n int64
	buf := make([]byte, 256<<10)
	for {
		k, err := f.Read(buf)
		n += int64(bytes.Count(buf[:k], []byte{'\n'}))
		if err != nil {
			return n
		}
	}
}

var (
	reFinished = regexp.MustCompile(`finished in ([\d.]+)(m?s), ([\d.]+) req/s`)
	reRequests = regexp.MustCompile(`requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout`)
)

// runOne runs one scenario against one target and measures it.
func (b *bench) runOne(sc scenario, t *target, phase string, round int) runResult {
	r := runResult{Scenario: sc.Name, Target: t.Name, Phase: phase, Round: round}
	var pids []int
	if t.pids != nil {
		pids = t.pids()
	}
	resetPeak(pids)
	cpu0 := cpuSeconds(pids)
	var jpid []int
	if t.Name == "avpd" && b.env.journal != nil {
		jpid = []int{b.env.journal.Process.Pid}
	}
	j0 := cpuSeconds(jpid)
	tot0, good0 := b.env.up.snapshot()
	a0 := t.audit()
	url := "https://" + t.host + sc.path

	var lr loadResult
	var err error
	switch sc.Tool {
	case "h2load":
		lr, err = b.h2load(sc, t, url)
	default:
		lr, err = b.goLoad(sc, t, url)
	}
	// Let in-flight upstream requests of the last responses finish being counted.
	time.Sleep(100 * time.Millisecond)
	r.ProxyCPUs = cpuSeconds(pids) - cpu0
	r.JournalCPUs = cpuSeconds(jpid) - j0
	r.PeakRSSKB = sumKB(pids, "VmHWM")
	tot1, good1 := b.env.up.snapshot()
	r.UpstreamRequests, r.UpstreamReal = tot1-tot0, good1-good0
	if a0 >= 0 {
		r.AuditLines = t.audit() - a0
	}
	if err != nil {
		r.FirstError = err.Error()
	}
	r.Requests, r.Errors, r.Seconds = lr.Requests, lr.Errors, lr.Seconds
	if lr.FirstErr != "" && r.FirstError == "" {
		r.FirstError = lr.FirstErr
	}
	r.P50us, r.P99us, r.MeanUs = lr.P50us, lr.P99us, lr.MeanUs
	if r.Seconds > 0 {
		r.RPS = float64(r.Requests) / r.Seconds
	}
	if r.Requests > 0 && len(pids) > 0 {
		r.CPUPer1k = r.ProxyCPUs / float64(r.Requests) * 1000
	}
	// Valid: the load generator completed requests, and every request the upstream saw in
	// this window carried the real secret for the right host (injection really happened).
	r.Valid = err == nil && r.Requests > 0 && r.UpstreamRequests >= int64(r.Requests) && r.UpstreamReal == r.UpstreamRequests
	return r
}

// h2load runs Debian's h2load as the target's UID. h2load does not verify certificates; the
// upstream's per-request check and the curl check before each scenario do.
func (b *bench) h2load(sc scenario, t *target, url string) (loadResult, error) {
	logFile := filepath.Join(b.env.work, "h2load", fmt.Sprintf("%s-%s-%d.log", sc.Name, t.Name, time.Now().UnixNano()))
	args := []string{"-t1", "-c", fmt.Sprint(sc.conns), "-m", fmt.Sprint(max(sc.streams, 1)),
		"-D", fmt.Sprint(int(b.dur.Seconds())), "--warm-up-time", fmt.Sprintf("%dms", b.warm.Milliseconds()),
		"--log-file", logFile, "-H", "authorization: " + t.auth}
	if sc.h1 {
		args = append(args, "--h1")
	}
	args = append(args, url)
	cmd := b.env.asUID(t.uid, "h2load", args...)
	out, err := runTimeout(cmd, b.dur+b.warm+60*time.Second)
	defer os.Remove(logFile)
	if err != nil {
		return loadResult{}, fmt.Errorf("h2load: %v: %s", err, tail(out))
	}
	var lr loadResult
	if m := reRequests.FindStringSubmatch(out); m != nil {
		done, _ := strconv.Atoi(m[3])
		ok, _ := strconv.Atoi(m[4])
		lr.Errors = done - ok
		lr.Requests = ok
	} else {
		return lr, fmt.Errorf("h2load: no result: %s", tail(out))
	}
	if m := reFinished.FindStringSubmatch(out); m != nil {
		v, _ := strconv.ParseFloat(m[1], 64)
		if m[2] == "ms" {
			v /= 1000
		}
		lr.Seconds = v
	}
	lats, err := readH2loadLog(logFile)
	if err != nil {
		return lr, err
	}
	lr.P50us, lr.P99us, lr.MeanUs = summarize(lats)
	if lr.Errors > 0 {
		lr.FirstErr = "h2load: " + firstLine(out, "status codes")
	}
	return lr, nil
}

// readH2loadLog reads h2load's per-request log: start (µs since epoch), status, duration (µs).
func readH2loadLog(path string) ([]float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []float64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 3 || fs[1] != "200" {
			continue
		}
		v, _ := strconv.ParseFloat(fs[2], 64)
		out = append(out, v)
	}
	return out, sc.Err()
}

func (b *bench) goLoad(sc scenario, t *target, url string) (loadResult, error) {
	cmd := b.env.asUIDTrusting(t.uid, t.ca, b.env.selfBin, "load", "-mode", sc.mode, "-url", url, "-auth", t.auth,
		"-c", fmt.Sprint(sc.conns), "-d", b.dur.String(), "-warmup", b.warm.String())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := startWait(cmd, b.dur+b.warm+60*time.Second); err != nil {
		return loadResult{}, fmt.Errorf("load: %v: %s", err, tail(stderr.String()))
	}
	var lr loadResult
	if err := json.Unmarshal(stdout.Bytes(), &lr); err != nil {
		return lr, fmt.Errorf("load: %v: %s", err, tail(stdout.String()+stderr.String()))
	}
	return lr, nil
}

func runTimeout(cmd *exec.Cmd, d time.Duration) (string, error) {
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := startWait(cmd, d)
	return out.String(), err
}

// startWait runs cmd and kills it if it outlives d: every load run is bounded in time.
func startWait(cmd *exec.Cmd, d time.Duration) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		cmd.Process.Kill()
		<-done
		return fmt.Errorf("killed after %v", d)
	}
}

// check makes one verified request with curl as the target's UID and requires that the
// upstream got the real secret: h2load verifies no certificate, this does.
func (b *bench) check(t *target) error {
	cmd := b.env.asUID(t.uid, "curl", "-sS", "--max-time", "10", "--cacert", t.ca,
		"-H", "Authorization: "+t.auth, "https://"+t.host+"/v1/check")
	out, err := runTimeout(cmd, 20*time.Second)
	if err != nil {
		return fmt.Errorf("curl check for %s: %v: %s", t.Name, err, tail(out))
	}
	if !isReal(out) {
		return fmt.Errorf("curl check for %s: the upstream did not receive the real secret: %s", t.Name, tail(out))
	}
	return nil
}

func tail(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 600 {
		s = "..." + s[len(s)-600:]
	}
	return s
}

func firstLine(s, prefix string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), prefix) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}
