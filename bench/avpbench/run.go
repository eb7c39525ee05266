package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type bench struct {
	env    *env
	dur    time.Duration
	warm   time.Duration
	rounds int
	logf   func(string, ...any)
	res    report
}

var scenarios = []scenario{
	{Name: "ka1", Title: "keep-alive HTTP/1.1, 1 connection", Tool: "h2load", h1: true, conns: 1, path: "/v1/small"},
	{Name: "ka32", Title: "keep-alive HTTP/1.1, 32 connections", Tool: "h2load", h1: true, conns: 32, path: "/v1/small"},
	{Name: "h2", Title: "HTTP/2, 1 connection, 32 streams", Tool: "h2load", conns: 1, streams: 32, path: "/v1/small"},
	{Name: "newconn", Title: "new TLS connection per request (resumption allowed), 1 client", Tool: "go", mode: "newconn", conns: 1, path: "/v1/small"},
	{Name: "sse", Title: "SSE time to first event, 1 client", Tool: "go", mode: "sse", conns: 1, path: "/v1/sse"},
	{Name: "upload", Title: "1 MiB upload, 4 connections", Tool: "go", mode: "upload", conns: 4, path: "/v1/upload"},
	{Name: "download", Title: "1 MiB download, 4 connections", Tool: "go", mode: "download", conns: 4, path: "/v1/download"},
}

func runMain(args []string) int {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	repo := fs.String("repo", ".", "repository root (avpd is built from it)")
	out := fs.String("out", "bench/results", "results directory")
	dur := fs.Duration("d", 3*time.Second, "measured duration of each run")
	warm := fs.Duration("warmup", 500*time.Millisecond, "warm-up before each run")
	rounds := fs.Int("rounds", 3, "rounds; targets are interleaved within each round")
	only := fs.String("scenarios", "", "comma-separated subset of scenarios (default all)")
	holdN := fs.Int("idle-conns", 10000, "idle terminated connections for the memory measurement (0: skip)")
	noTmpfs := fs.Bool("no-tmpfs", false, "skip the audit-on-tmpfs phase")
	noDisk := fs.Bool("no-disk", false, "skip the audit-on-disk phase (for profiling runs)")
	tmpfsScenarios := fs.String("tmpfs-scenarios", "ka1,ka32,newconn,sse", "scenarios of the audit-on-tmpfs phase")
	inprocScenarios := fs.String("inproc-scenarios", "ka1", "scenarios of the phase with avpd's in-process audit writer on tmpfs, to show the journal round trip (empty: skip)")
	onlyTargets := fs.String("targets", "", "comma-separated subset of targets (default all; for profiling runs)")
	profile := fs.String("avpd-cpuprofile", "", "build avpd with the benchprofile tag and write its CPU profile here")
	noJournal := fs.Bool("no-journal", false, "audit with avpd's in-process file writer even when avpd has the journal service")
	fs.Parse(args)

	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "avpbench: needs root for a network namespace and nftables; run: sudo make bench")
		return 1
	}
	for _, tool := range []string{"ip", "nft", "setpriv", "curl", "h2load", "nginx", "mitmdump", "gnuplot"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "avpbench: %s is missing; run: make bench-deps\n", tool)
			return 1
		}
	}
	start := time.Now()
	logf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, a...))
	}
	// Enough descriptors for 10,000 idle connections on both ends; children inherit it.
	var lim unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_NOFILE, &lim)
	lim.Cur = lim.Max
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		logf("warning: raise RLIMIT_NOFILE: %v", err)
	}

	absRepo, _ := filepath.Abs(*repo)
	work, err := os.MkdirTemp("/var/tmp", "avpbench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	os.Chmod(work, 0o755)
	e := &env{work: work, priv: filepath.Join(work, "private"), repo: absRepo, logf: logf}
	os.MkdirAll(e.priv, 0o700)
	if os.Getenv("AVPBENCH_KEEP") == "" {
		defer os.RemoveAll(work)
	}
	defer e.cleanup()
	ctx := context.Background()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		logf("interrupted; cleaning up")
		e.cleanup()
		os.RemoveAll(work)
		os.Exit(130)
	}()

	if err := e.build(*profile != ""); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if *profile != "" {
		os.Setenv("AVPBENCH_AVPD_CPUPROFILE", *profile)
	}
	if *noJournal {
		e.useJournal = false
	}
	b := &bench{env: e, dur: *dur, warm: *warm, rounds: *rounds, logf: logf}
	b.res.Started = start.UTC().Format(time.RFC3339)
	b.res.Machine = machineInfo()
	b.res.Settings = settings{DurationS: dur.Seconds(), WarmupS: warm.Seconds(), Rounds: *rounds,
		AvpdEnv: os.Getenv("AVPBENCH_AVPD_ENV"), JournalEnv: os.Getenv("AVPBENCH_JOURNAL_ENV")}
	b.res.Audit.Journal = e.useJournal
	mon := newMonitor()

	logf("setting up namespace, upstream, avpd (journal: %v), nginx, mitmproxy in %s", e.useJournal, work)
	if err := e.setup(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "avpbench: setup: %v\n", err)
		return 1
	}
	targets := b.targets()
	if *onlyTargets != "" {
		targets = slices.DeleteFunc(targets, func(t *target) bool { return !slices.Contains(strings.Split(*onlyTargets, ","), t.Name) })
	}
	for _, t := range targets {
		if err := b.check(t); err != nil {
			fmt.Fprintln(os.Stderr, "avpbench:", err)
			return 1
		}
	}
	time.Sleep(time.Second)
	b.res.Memory.AvpdIdleRSSKB = statusKB(e.avpd.Process.Pid, "VmRSS")
	b.res.Audit.DiskFdatasync = measureFdatasync(filepath.Join(e.priv, "audit"), 200, 0)
	b.res.Audit.DiskFdatasyncIdle = measureFdatasync(filepath.Join(e.priv, "audit"), 50, sseGap)
	b.res.Audit.DiskPath = e.auditPath
	logf("fdatasync on the audit disk: p50 %.0f µs back to back, %.0f µs after %v idle",
		b.res.Audit.DiskFdatasync.P50us, b.res.Audit.DiskFdatasyncIdle.P50us, sseGap)

	sel := scenarios
	if *only != "" {
		sel = nil
		for _, s := range scenarios {
			if slices.Contains(strings.Split(*only, ","), s.Name) {
				sel = append(sel, s)
			}
		}
	}
	if !*noDisk {
		b.phase("disk", sel, targets)
	}

	if !*noTmpfs {
		// Phase 2: avpd's and mitmproxy's audit on tmpfs, to separate the proxy's own cost
		// from the disk's (the targets are stated both ways).
		tdir, err := os.MkdirTemp("/dev/shm", "avpbench-")
		if err == nil {
			e.tmpfs = tdir
			os.Chmod(tdir, 0o700)
			logf("restarting avpd and mitmproxy with their audit on tmpfs (%s)", tdir)
			if err := e.restartAvpd(filepath.Join(tdir, "audit")); err == nil {
				err = e.restartMitm(filepath.Join(tdir, "mitm-audit.jsonl"))
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "avpbench: tmpfs phase: %v\n", err)
				return 1
			}
			b.res.Audit.TmpfsFdatasync = measureFdatasync(tdir, 200, 0)
			var tsel []scenario
			for _, s := range sel {
				if slices.Contains(strings.Split(*tmpfsScenarios, ","), s.Name) {
					tsel = append(tsel, s)
				}
			}
			// nginx audits nothing, but it runs again in this phase so that avpd/nginx is
			// measured in the same time slot as the tmpfs target asks.
			ttargets := targets
			for _, t := range ttargets {
				if err := b.check(t); err != nil {
					fmt.Fprintln(os.Stderr, "avpbench:", err)
					return 1
				}
			}
			b.phase("tmpfs", tsel, ttargets)
			if *holdN > 0 {
				b.idleConns(*holdN)
				*holdN = 0
			}
			// Phase 3: the same avpd with its in-process audit writer on tmpfs: the difference
			// to phase 2 is the round trip to the journal process.
			var isel []scenario
			for _, s := range sel {
				if slices.Contains(strings.Split(*inprocScenarios, ","), s.Name) {
					isel = append(isel, s)
				}
			}
			if e.useJournal && len(isel) > 0 {
				logf("restarting avpd with its in-process audit writer on tmpfs")
				e.useJournal = false
				err := e.restartAvpd(filepath.Join(tdir, "audit-inproc"))
				e.useJournal = true
				if err != nil {
					fmt.Fprintf(os.Stderr, "avpbench: in-process phase: %v\n", err)
					return 1
				}
				itargets := slices.DeleteFunc(slices.Clone(ttargets), func(t *target) bool { return t.Name != "direct" && t.Name != "avpd" })
				b.phase("tmpfs-inproc", isel, itargets)
			}
		}
	}
	if *holdN > 0 {
		b.idleConns(*holdN)
	}
	b.res.Finished = time.Now().UTC().Format(time.RFC3339)
	b.res.WallS = time.Since(start).Seconds()
	b.res.Interference = mon.finish(e)
	b.res.summarize()
	outDir := *out
	if !filepath.IsAbs(outDir) {
		outDir = filepath.Join(absRepo, outDir)
	}
	if err := b.res.write(outDir); err != nil {
		fmt.Fprintln(os.Stderr, "avpbench:", err)
		return 1
	}
	logf("done: results in %s", outDir)
	return 0
}

// build compiles avpd and avpctl from the repository (the real daemon) and copies this
// program where the load UIDs can run it.
func (e *env) build(profile bool) error {
	bin := filepath.Join(e.work, "bin")
	os.MkdirAll(bin, 0o755)
	e.avpdBin, e.ctlBin = filepath.Join(bin, "avpd"), filepath.Join(bin, "avpctl")
	args := []string{"build", "-trimpath", "-o", e.avpdBin}
	if profile {
		args = append(args, "-tags", "benchprofile")
	}
	for _, c := range []struct {
		args []string
		pkg  string
	}{{args, "./cmd/avpd"}, {[]string{"build", "-trimpath", "-o", e.ctlBin}, "./cmd/avpctl"}} {
		cmd := exec.Command("go", append(c.args, c.pkg)...)
		cmd.Dir = e.repo
		cmd.Env = os.Environ() // as the Makefile builds it, minus -ldflags
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build %s: %v\n%s", c.pkg, err, out)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	e.selfBin = filepath.Join(bin, "avpbench")
	if err := copyFile(self, e.selfBin, 0o755); err != nil {
		return err
	}
	// Use the journal service when this avpd has it (issue: "the real journal").
	e.useJournal = exec.Command(e.avpdBin, "journal", "--help").Run() == nil
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func (b *bench) targets() []*target {
	e := b.env
	none := func() int64 { return -1 }
	avpdPids := func() []int {
		p := []int{e.avpd.Process.Pid}
		if e.journal != nil {
			p = append(p, e.journal.Process.Pid)
		}
		return p
	}
	return []*target{
		{Name: "direct", uid: uidPlain, host: apiHost, auth: "Bearer " + realSecret, ca: e.upCAFile, audit: none},
		{Name: "avpd", uid: uidAvpd, host: apiHost, auth: "Bearer " + placeholder, ca: e.avpCAFile,
			pids: avpdPids, audit: func() int64 { return countLines(e.auditPath) }},
		{Name: "nginx", uid: uidPlain, host: nginxHost, auth: "Bearer " + placeholder, ca: e.upCAFile,
			pids: func() []int { return append([]int{e.nginx.Process.Pid}, children(e.nginx.Process.Pid)...) }, audit: none},
		{Name: "mitmproxy", uid: uidMitm, host: apiHost, auth: "Bearer " + placeholder, ca: e.mitmCA,
			pids: func() []int { return []int{e.mitm.Process.Pid} }, audit: func() int64 { return countLines(e.mitmAudit) }},
	}
}

// phase runs every scenario against every target, rounds times, rotating the target order
// each round so no target always runs first (or right after the slowest).
func (b *bench) phase(name string, sel []scenario, targets []*target) {
	for _, sc := range sel {
		b.res.addScenario(sc)
		for _, t := range targets {
			if err := b.check(t); err != nil {
				b.logf("WARNING: %v", err)
			}
		}
		for round := 0; round < b.rounds; round++ {
			for i := range targets {
				t := targets[(i+round)%len(targets)]
				r := b.runOne(sc, t, name, round+1)
				b.res.Runs = append(b.res.Runs, r)
				flag := ""
				if r.JournalCPUs > 0 && r.Requests > 0 {
					flag = fmt.Sprintf("  (journal %.3f s/1k)", r.JournalCPUs/float64(r.Requests)*1000)
				}
				if !r.Valid {
					flag += "  INVALID: " + r.FirstError
					if r.UpstreamReal != r.UpstreamRequests {
						flag += fmt.Sprintf(" (upstream saw %d requests, %d with the real secret)", r.UpstreamRequests, r.UpstreamReal)
					}
				}
				b.logf("%-5.5s %-8s r%d %-9s %8.0f req/s  p50 %8.0f µs  p99 %8.0f µs  cpu/1k %6.3f s  peak %6d KB%s",
					name, sc.Name, round+1, t.Name, r.RPS, r.P50us, r.P99us, r.CPUPer1k, r.PeakRSSKB, flag)
			}
		}
		if name == "disk" {
			// fdatasync on the audit disk between scenarios: the disk is shared with other
			// processes, so its latency moves during the run.
			st := measureFdatasync(filepath.Dir(b.env.auditPath), 200, 0)
			b.res.Audit.DiskFdatasyncBetween = append(b.res.Audit.DiskFdatasyncBetween, st)
		}
	}
}

// idleConns measures what an idle terminated agent connection costs avpd: n keep-alive
// connections that made one request each, then sit idle.
func (b *bench) idleConns(n int) {
	e := b.env
	pid := e.avpd.Process.Pid
	runtime.GC()
	time.Sleep(2 * time.Second)
	before := statusKB(pid, "VmRSS")
	cmd := e.asUIDTrusting(uidAvpd, e.avpCAFile, e.selfBin, "load", "-mode", "hold", "-n", fmt.Sprint(n),
		"-url", "https://"+apiHost+"/v1/small", "-auth", "Bearer "+placeholder)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		b.logf("idle connections: %v", err)
		return
	}
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	var opened int
	fmt.Sscanf(line, "ready %d", &opened)
	took := time.Since(t0)
	time.Sleep(2 * time.Second)
	after := statusKB(pid, "VmRSS")
	stdin.Close()
	startWait2(cmd, 30*time.Second)
	m := &b.res.Memory
	m.IdleConns, m.IdleConnsOpenS = opened, took.Seconds()
	m.RSSBeforeKB, m.RSSWithConnsKB = before, after
	if opened > 0 {
		m.PerConnBytes = float64(after-before) * 1024 / float64(opened)
	}
	b.logf("idle connections: %d open in %.1fs; avpd RSS %d KB -> %d KB: %.1f KB per connection",
		opened, took.Seconds(), before, after, m.PerConnBytes/1024)
	if opened < n {
		b.logf("idle connections: only %d of %d opened (avpd's proxy.max_connections_per_uid, or the load UID's file limit)", opened, n)
	}
}

func startWait2(cmd *exec.Cmd, d time.Duration) {
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		cmd.Process.Kill()
		<-done
	}
}

type syncStats struct {
	N     int     `json:"n"`
	P50us float64 `json:"p50_us"`
	P99us float64 `json:"p99_us"`
}

// measureFdatasync times n appends+fdatasyncs of one audit-sized line in dir, as the audit
// does, each after idle. A virtual disk answers a flush that follows idle more slowly (on
// this kind of machine about twice as slowly after 10 ms), and SSE requests, which take
// sseGap each, meet that case.
func measureFdatasync(dir string, n int, idle time.Duration) syncStats {
	f, err := os.CreateTemp(dir, "fdatasync-probe-")
	if err != nil {
		return syncStats{}
	}
	defer os.Remove(f.Name())
	defer f.Close()
	line := []byte(strings.Repeat("x", 300) + "\n")
	var lats []float64
	for range n {
		time.Sleep(idle)
		t := time.Now()
		f.Write(line)
		unix.Fdatasync(int(f.Fd()))
		lats = append(lats, float64(time.Since(t).Microseconds()))
	}
	p50, p99, _ := summarize(lats)
	return syncStats{N: len(lats), P50us: p50, P99us: p99}
}
