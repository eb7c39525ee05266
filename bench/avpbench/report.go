package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type settings struct {
	DurationS  float64 `json:"duration_s"`
	WarmupS    float64 `json:"warmup_s"`
	Rounds     int     `json:"rounds"`
	AvpdEnv    string  `json:"avpd_env,omitempty"`
	JournalEnv string  `json:"journal_env,omitempty"`
}

type report struct {
	Started   string     `json:"started"`
	Finished  string     `json:"finished"`
	WallS     float64    `json:"wall_s"`
	Machine   machine    `json:"machine"`
	Settings  settings   `json:"settings"`
	Scenarios []scenario `json:"scenarios"`
	Audit     struct {
		Journal       bool      `json:"journal_service"`
		DiskPath      string    `json:"disk_path"`
		DiskFdatasync syncStats `json:"disk_fdatasync"`
		// DiskFdatasyncIdle is each fdatasync after sseGap of idle, as SSE requests meet it.
		DiskFdatasyncIdle syncStats `json:"disk_fdatasync_after_idle"`
		// DiskFdatasyncBetween is measured after each scenario of the disk phase.
		DiskFdatasyncBetween []syncStats `json:"disk_fdatasync_between_scenarios"`
		TmpfsFdatasync       syncStats   `json:"tmpfs_fdatasync"`
	} `json:"audit"`
	Memory struct {
		AvpdIdleRSSKB  int64   `json:"avpd_idle_rss_kb"`
		IdleConns      int     `json:"idle_conns"`
		IdleConnsOpenS float64 `json:"idle_conns_open_s"`
		RSSBeforeKB    int64   `json:"rss_before_kb"`
		RSSWithConnsKB int64   `json:"rss_with_conns_kb"`
		PerConnBytes   float64 `json:"per_conn_bytes"`
	} `json:"memory"`
	Interference interference `json:"interference"`
	Runs         []runResult  `json:"runs"`
	Summary      []summary    `json:"summary"`
	Ratios       []ratio      `json:"ratios"`
}

type machine struct {
	CPU      string `json:"cpu"`
	NumCPU   int    `json:"num_cpu"`
	MemMB    int64  `json:"mem_mb"`
	Kernel   string `json:"kernel"`
	Go       string `json:"go"`
	H2load   string `json:"h2load"`
	Nginx    string `json:"nginx"`
	Mitm     string `json:"mitmproxy"`
	Hostname string `json:"hostname"`
}

func machineInfo() machine {
	m := machine{NumCPU: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				m.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	m.MemMB = statusMemMB()
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		m.Kernel = cstr(u.Release[:])
	}
	m.Hostname, _ = os.Hostname()
	m.H2load = firstOut("h2load", "--version")
	m.Nginx = firstOut("nginx", "-v")
	m.Mitm = firstOut("mitmdump", "--version")
	return m
}

func cstr(b []int8) string {
	var s []byte
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}

func statusMemMB() int64 {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n / 1024
		}
	}
	return 0
}

func firstOut(name string, args ...string) string {
	out, _ := exec.Command(name, args...).CombinedOutput()
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

// interference says what else ran on the machine during the bench: the 2 cores are shared
// with other engineers' builds and tests.
type interference struct {
	MachineCPUBusyS float64     `json:"machine_cpu_busy_s"`
	BenchCPUS       float64     `json:"bench_cpu_s"`
	OtherCPUS       float64     `json:"other_cpu_s"`
	WallS           float64     `json:"wall_s"`
	LoadAvgEnd      string      `json:"loadavg_end"`
	TopOthers       []otherProc `json:"top_other_processes"`
}

type otherProc struct {
	PID  int     `json:"pid"`
	Comm string  `json:"comm"`
	CPUS float64 `json:"cpu_s"`
	Cmd  string  `json:"cmd"`
}

type monitor struct {
	start     time.Time
	busy0     int64
	first     map[int]int64
	last      map[int]int64
	cmd       map[int]string
	comm      map[int]string
	stop      chan struct{}
	done      chan struct{}
	selfStart float64
}

func machineBusyTicks() int64 {
	b, _ := os.ReadFile("/proc/stat")
	line := strings.SplitN(string(b), "\n", 2)[0]
	f := strings.Fields(line)
	var busy int64
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		busy += n
	}
	return busy
}

func ownCPU() float64 {
	var s, c syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &s)
	syscall.Getrusage(syscall.RUSAGE_CHILDREN, &c)
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(s.Utime) + tv(s.Stime) + tv(c.Utime) + tv(c.Stime)
}

func newMonitor() *monitor {
	m := &monitor{start: time.Now(), busy0: machineBusyTicks(), first: map[int]int64{}, last: map[int]int64{},
		cmd: map[int]string{}, comm: map[int]string{}, stop: make(chan struct{}), done: make(chan struct{}), selfStart: ownCPU()}
	m.sample(true)
	go func() {
		defer close(m.done)
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-m.stop:
				return
			case <-t.C:
				m.sample(false)
			}
		}
	}()
	return m
}

func (m *monitor) sample(initial bool) {
	ents, _ := os.ReadDir("/proc")
	for _, d := range ents {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		t := procTicks(pid)
		if _, ok := m.first[pid]; !ok {
			if initial {
				m.first[pid] = t
			} else {
				m.first[pid] = 0 // started during the run: all its CPU is inside the window
			}
			cl, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			m.cmd[pid] = strings.TrimSpace(strings.ReplaceAll(string(cl), "\x00", " "))
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			m.comm[pid] = strings.TrimSpace(string(comm))
		}
		m.last[pid] = t
	}
}

// finish stops sampling and reports the CPU used by processes that are not the bench's own.
func (m *monitor) finish(e *env) interference {
	close(m.stop)
	<-m.done
	m.sample(false)
	ours := map[int]bool{os.Getpid(): true}
	for _, c := range []*os.Process{procOf(e.avpd), procOf(e.journal), procOf(e.nginx), procOf(e.mitm)} {
		if c != nil {
			ours[c.Pid] = true
			for _, ch := range children(c.Pid) {
				ours[ch] = true
			}
		}
	}
	var others []otherProc
	for pid, t := range m.last {
		cmd := m.cmd[pid]
		if ours[pid] || strings.Contains(cmd, "avpbench") || strings.HasPrefix(cmd, "h2load") ||
			strings.Contains(cmd, e.ns) || strings.Contains(cmd, "mitmdump") || strings.HasPrefix(cmd, "nginx") {
			continue
		}
		d := float64(t-m.first[pid]) / 100
		if d >= 0.2 {
			if len(cmd) > 120 {
				cmd = cmd[:120] + "..."
			}
			others = append(others, otherProc{PID: pid, Comm: m.comm[pid], CPUS: d, Cmd: cmd})
		}
	}
	sort.Slice(others, func(i, j int) bool { return others[i].CPUS > others[j].CPUS })
	if len(others) > 10 {
		others = others[:10]
	}
	busy := float64(machineBusyTicks()-m.busy0) / 100
	bench := ownCPU() - m.selfStart
	for pid := range ours {
		if pid != os.Getpid() {
			bench += float64(m.last[pid]-m.first[pid]) / 100
		}
	}
	la, _ := os.ReadFile("/proc/loadavg")
	return interference{MachineCPUBusyS: busy, BenchCPUS: bench, OtherCPUS: max(0, busy-bench),
		WallS: time.Since(m.start).Seconds(), LoadAvgEnd: strings.TrimSpace(string(la)), TopOthers: others}
}

func procOf(c *exec.Cmd) *os.Process {
	if c == nil {
		return nil
	}
	return c.Process
}

var phases = []string{"disk", "tmpfs", "tmpfs-inproc"}

type summary struct {
	Scenario  string  `json:"scenario"`
	Target    string  `json:"target"`
	Phase     string  `json:"phase"`
	Rounds    int     `json:"rounds"`
	AllValid  bool    `json:"all_valid"`
	RPS       float64 `json:"req_per_s"`
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	MeanUs    float64 `json:"mean_us"`
	CPUPer1k  float64 `json:"proxy_cpu_s_per_1k_req"`
	PeakRSSKB int64   `json:"proxy_peak_rss_kb"`
}

type ratio struct {
	Scenario string  `json:"scenario"`
	Phase    string  `json:"phase"`
	Versus   string  `json:"versus"`
	RPS      float64 `json:"req_per_s_ratio"`
	P50      float64 `json:"p50_ratio"`
	AddedP50 float64 `json:"added_p50_us"` // avpd p50 minus the other's p50
}

func (r *report) addScenario(sc scenario) {
	for _, s := range r.Scenarios {
		if s.Name == sc.Name {
			return
		}
	}
	r.Scenarios = append(r.Scenarios, sc)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// summarize takes the median over rounds of each metric (peak RSS: the maximum).
func (r *report) summarize() {
	type key struct{ sc, t, ph string }
	groups := map[key][]runResult{}
	var order []key
	for _, run := range r.Runs {
		k := key{run.Scenario, run.Target, run.Phase}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], run)
	}
	r.Summary = nil
	for _, k := range order {
		runs := groups[k]
		s := summary{Scenario: k.sc, Target: k.t, Phase: k.ph, Rounds: len(runs), AllValid: true}
		var rps, p50, p99, mean, cpu []float64
		for _, x := range runs {
			if !x.Valid {
				s.AllValid = false
				continue
			}
			rps, p50, p99, mean, cpu = append(rps, x.RPS), append(p50, x.P50us), append(p99, x.P99us), append(mean, x.MeanUs), append(cpu, x.CPUPer1k)
			s.PeakRSSKB = max(s.PeakRSSKB, x.PeakRSSKB)
		}
		s.RPS, s.P50us, s.P99us, s.MeanUs, s.CPUPer1k = median(rps), median(p50), median(p99), median(mean), median(cpu)
		r.Summary = append(r.Summary, s)
	}
	r.Ratios = nil
	find := func(sc, t, ph string) *summary {
		for i := range r.Summary {
			if s := &r.Summary[i]; s.Scenario == sc && s.Target == t && s.Phase == ph {
				return s
			}
		}
		return nil
	}
	for _, s := range r.Summary {
		if s.Target != "avpd" {
			continue
		}
		for _, other := range []string{"direct", "nginx", "mitmproxy"} {
			o := find(s.Scenario, other, s.Phase)
			if o == nil || o.RPS == 0 || o.P50us == 0 {
				continue
			}
			r.Ratios = append(r.Ratios, ratio{Scenario: s.Scenario, Phase: s.Phase, Versus: other,
				RPS: s.RPS / o.RPS, P50: s.P50us / o.P50us, AddedP50: s.P50us - o.P50us})
		}
	}
}

func (r *report) write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	j, _ := json.MarshalIndent(r, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(j, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.md"), []byte(r.markdown()), 0o644); err != nil {
		return err
	}
	return r.chart(filepath.Join(dir, "results.png"))
}

func fnum(v float64) string {
	switch {
	case v == 0:
		return "–"
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}

func (r *report) markdown() string {
	var b bytes.Buffer
	m := r.Machine
	fmt.Fprintf(&b, "# avpbench results\n\n")
	fmt.Fprintf(&b, "Run %s, %.0f s wall. Machine: %d vCPU (%s), %d MB, kernel %s, %s; %s, %s, mitmproxy %s.\n\n",
		r.Started, r.WallS, m.NumCPU, m.CPU, m.MemMB, m.Kernel, m.Go, m.H2load, m.Nginx, strings.TrimPrefix(m.Mitm, "Mitmproxy: "))
	fmt.Fprintf(&b, "Each cell is the median of %d interleaved rounds of %.0f s (after %.1f s warm-up). ", r.Settings.Rounds, r.Settings.DurationS, r.Settings.WarmupS)
	sink := "in-process audit file writer (one write+fdatasync per decision)"
	if r.Audit.Journal {
		sink = "`avpd journal` (group commit; its journald mirror off, so the numbers are the log's alone)"
	}
	fmt.Fprintf(&b, "avpd audits to %s; mitmproxy's addon appends and fsyncs one line per request. ", sink)
	fmt.Fprintf(&b, "fdatasync of one line on the audit disk: p50 %.0f µs, p99 %.0f µs before the load", r.Audit.DiskFdatasync.P50us, r.Audit.DiskFdatasync.P99us)
	if st := r.Audit.DiskFdatasyncIdle; st.N > 0 {
		fmt.Fprintf(&b, " (each after %v idle, as SSE requests meet it: p50 %.0f µs, p99 %.0f µs)", sseGap, st.P50us, st.P99us)
	}
	if n := len(r.Audit.DiskFdatasyncBetween); n > 0 {
		var p50s []float64
		for _, x := range r.Audit.DiskFdatasyncBetween {
			p50s = append(p50s, x.P50us)
		}
		fmt.Fprintf(&b, "; between scenarios p50 %.0f µs (median of %d probes, max %.0f µs)", median(p50s), n, slices.Max(p50s))
	}
	if r.Audit.TmpfsFdatasync.N > 0 {
		fmt.Fprintf(&b, " (tmpfs: p50 %.0f µs)", r.Audit.TmpfsFdatasync.P50us)
	}
	if r.Settings.AvpdEnv != "" || r.Settings.JournalEnv != "" {
		fmt.Fprintf(&b, ". Extra environment: avpd `%s`, journal `%s`", r.Settings.AvpdEnv, r.Settings.JournalEnv)
	}
	fmt.Fprintf(&b, ".\n\nCPU is the proxy's processes (avpd + journal; nginx master + workers; mitmproxy), in CPU seconds per 1000 requests; peak RSS is their VmHWM during the run (summed over processes).\n\n")
	titles := map[string]string{}
	for _, s := range r.Scenarios {
		titles[s.Name] = s.Title
	}
	for _, ph := range phases {
		var rows []summary
		for _, s := range r.Summary {
			if s.Phase == ph {
				rows = append(rows, s)
			}
		}
		if len(rows) == 0 {
			continue
		}
		switch ph {
		case "disk":
			fmt.Fprintf(&b, "## Audit on the real disk\n\n")
		case "tmpfs":
			fmt.Fprintf(&b, "## Audit on tmpfs (avpd and mitmproxy restarted with their audit in /dev/shm; nginx unchanged)\n\n")
		case "tmpfs-inproc":
			fmt.Fprintf(&b, "## avpd with its in-process audit writer on tmpfs (no journal process: the difference to the tmpfs phase is the journal round trip)\n\n")
		}
		fmt.Fprintf(&b, "| scenario | target | req/s | p50 µs | p99 µs | proxy CPU s/1k req | proxy peak RSS MB | valid |\n|---|---|---:|---:|---:|---:|---:|---|\n")
		for _, s := range rows {
			valid := "yes"
			if !s.AllValid {
				valid = "**no**"
			}
			rss := "–"
			if s.PeakRSSKB > 0 {
				rss = fnum(float64(s.PeakRSSKB) / 1024)
			}
			cpu := "–"
			if s.Target != "direct" {
				cpu = strconv.FormatFloat(s.CPUPer1k, 'f', 3, 64)
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", s.Scenario, s.Target, fnum(s.RPS), fnum(s.P50us), fnum(s.P99us), cpu, rss, valid)
		}
		fmt.Fprintf(&b, "\n### Ratios (%s)\n\n| scenario | avpd/direct req/s | avpd/nginx req/s | avpd/mitmproxy req/s | avpd p50 added over direct µs | over nginx µs | over mitmproxy µs |\n|---|---:|---:|---:|---:|---:|---:|\n", ph)
		for _, sc := range r.Scenarios {
			var cells [6]string
			for i := range cells {
				cells[i] = "–"
			}
			any := false
			for _, x := range r.Ratios {
				if x.Scenario != sc.Name || x.Phase != ph {
					continue
				}
				any = true
				i := map[string]int{"direct": 0, "nginx": 1, "mitmproxy": 2}[x.Versus]
				cells[i] = fmt.Sprintf("%.3f", x.RPS)
				cells[3+i] = fmt.Sprintf("%+.0f", x.AddedP50)
			}
			if any {
				fmt.Fprintf(&b, "| %s | %s |\n", sc.Name, strings.Join(cells[:], " | "))
			}
		}
		fmt.Fprintln(&b)
	}
	fmt.Fprintf(&b, "## Scenarios\n\n")
	for _, s := range r.Scenarios {
		fmt.Fprintf(&b, "- **%s**: %s (%s)\n", s.Name, s.Title, s.Tool)
	}
	mem := r.Memory
	fmt.Fprintf(&b, "\n## Memory\n\navpd RSS after start and one request: %.1f MB.", float64(mem.AvpdIdleRSSKB)/1024)
	if mem.IdleConns > 0 {
		fmt.Fprintf(&b, " With %d idle keep-alive agent connections (one request each, opened in %.1f s): RSS %.1f MB -> %.1f MB, %.1f KB per connection.",
			mem.IdleConns, mem.IdleConnsOpenS, float64(mem.RSSBeforeKB)/1024, float64(mem.RSSWithConnsKB)/1024, mem.PerConnBytes/1024)
	}
	in := r.Interference
	fmt.Fprintf(&b, "\n\n## Other load on the machine\n\nDuring the %.0f s run the machine's CPUs were busy %.0f CPU-s; the bench (proxies, upstream, load generators) used %.0f CPU-s, other processes about %.0f CPU-s. Load average at the end: %s.\n",
		in.WallS, in.MachineCPUBusyS, in.BenchCPUS, in.OtherCPUS, in.LoadAvgEnd)
	if len(in.TopOthers) > 0 {
		fmt.Fprintf(&b, "\n| other process | CPU s | command |\n|---|---:|---|\n")
		for _, o := range in.TopOthers {
			fmt.Fprintf(&b, "| %s (%d) | %.1f | `%s` |\n", o.Comm, o.PID, o.CPUS, strings.ReplaceAll(o.Cmd, "|", "\\|"))
		}
	}
	fmt.Fprintf(&b, "\n## Correctness\n\nh2load verifies no certificate. Before each scenario a curl as the target's UID verifies the TLS chain the target presents (avpd's local CA, mitmproxy's CA, the bench CA for direct and nginx) and asks the upstream whether the real secret arrived. During every run the upstream counts requests and those carrying the real secret for the right host; a run is valid only if every request the upstream saw had it and the upstream saw at least as many requests as the client completed.\n")
	return b.String()
}

// chart draws throughput and p50 latency per scenario and target with gnuplot.
func (r *report) chart(path string) error {
	targets := []string{"direct", "avpd", "nginx", "mitmproxy"}
	var data bytes.Buffer
	fmt.Fprintf(&data, "scenario %s\n", strings.Join(targets, " "))
	var lat bytes.Buffer
	fmt.Fprintf(&lat, "scenario %s\n", strings.Join(targets, " "))
	type row struct {
		label string
		rps   []float64
		p50   []float64
	}
	var rows []row
	for _, ph := range phases {
		for _, sc := range r.Scenarios {
			rw := row{label: sc.Name}
			if ph != "disk" {
				rw.label += "/" + ph
			}
			found := false
			for _, t := range targets {
				v, l := 0.0, 0.0
				for _, s := range r.Summary {
					if s.Scenario == sc.Name && s.Target == t && s.Phase == ph {
						v, l, found = s.RPS, s.P50us/1000, true
					}
				}
				rw.rps, rw.p50 = append(rw.rps, v), append(rw.p50, l)
			}
			if found {
				rows = append(rows, rw)
			}
		}
	}
	for _, rw := range rows {
		fmt.Fprintf(&data, "%s", rw.label)
		fmt.Fprintf(&lat, "%s", rw.label)
		for i := range targets {
			fmt.Fprintf(&data, " %g", max(rw.rps[i], 0.1))
			fmt.Fprintf(&lat, " %g", max(rw.p50[i], 0.001))
		}
		fmt.Fprintln(&data)
		fmt.Fprintln(&lat)
	}
	dir, err := os.MkdirTemp("", "avpbench-chart-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	os.WriteFile(filepath.Join(dir, "rps.dat"), data.Bytes(), 0o644)
	os.WriteFile(filepath.Join(dir, "lat.dat"), lat.Bytes(), 0o644)
	title := fmt.Sprintf("avpbench %s — %d vCPU, medians of %d rounds", r.Started[:10], r.Machine.NumCPU, r.Settings.Rounds)
	script := fmt.Sprintf(`set terminal pngcairo size 1400,900 font "sans,10"
set output %q
set multiplot layout 2,1 title %q
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set key top right autotitle columnheader
set grid ytics
set logscale y
set xtics rotate by -20
set yrange [1:*]
set ylabel "requests/s (log)"
set title "Throughput"
plot for [i=2:5] %q using i:xtic(1)
set yrange [0.01:*]
set ylabel "p50 latency, ms (log)"
set title "p50 latency (SSE: time to first event)"
plot for [i=2:5] %q using i:xtic(1)
unset multiplot
`, path, title, filepath.Join(dir, "rps.dat"), filepath.Join(dir, "lat.dat"))
	cmd := exec.Command("gnuplot")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot: %v: %s", err, out)
	}
	return nil
}
