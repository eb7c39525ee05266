package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
)

// The audit commands are offline: they read the journal's files and need no daemon.

// auditDecisions are the values of a decision event's decision field.
var auditDecisions = []string{audit.DecisionInject, audit.DecisionForwardVerbatim, audit.DecisionRefuse,
	audit.DecisionPassthrough, audit.DecisionBackendError, audit.DecisionHostMismatch}

const (
	auditVerifyUsage = "audit verify [--key FILE] [--partial] [PATH...]"
	auditTailUsage   = "audit tail [-f] [-n N] [--secret NAME] [--decision D] [--json] [PATH]"
)

func runAudit(g globals, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		return usageErr(stderr, auditVerifyUsage+"\n       avpctl "+auditTailUsage)
	}
	switch args[0] {
	case "verify":
		return auditVerify(args[1:], stdout, stderr)
	case "tail":
		return auditTail(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "avpctl: unknown audit command %q\n", args[0])
	return usageErr(stderr, auditVerifyUsage+"\n       avpctl "+auditTailUsage)
}

// parseInterleaved parses flags that may come before or after the positional arguments.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// unverifiable reports a log that could not be read at all (missing, unreadable, or its key
// is): exit 2, so that a script tells it from a broken chain (1).
func unverifiable(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "avpctl: not verified: %v\n", err)
	return 2
}

// auditConfigPath is the config whose audit.path audit verify and tail read when given no
// log (a variable for tests).
var auditConfigPath = defaultConfig

// defaultAuditLog is the log to read when none is given: the in-process log's audit.path
// when the config sets one (else an operator with another path would read an old log
// without a word), otherwise the journal's default.
func defaultAuditLog(stderr io.Writer) string {
	cfg, err := config.Load(auditConfigPath)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(stderr, "avpctl: note: %s could not be read to find audit.path (%v); reading %s: pass the log's path to read another\n", auditConfigPath, err, config.DefaultAuditLog)
		}
		return config.DefaultAuditLog
	}
	if cfg.Audit.Socket == "" && cfg.Audit.Path != "" {
		return cfg.Audit.Path
	}
	return config.DefaultAuditLog
}

func auditVerify(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("audit verify", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	keyPath := fs.String("key", "", "")
	partial := fs.Bool("partial", false, "")
	paths, err := parseInterleaved(fs, args)
	if err != nil {
		fmt.Fprintf(stderr, "avpctl: %v\n", err)
		return usageErr(stderr, auditVerifyUsage)
	}
	if len(paths) == 0 {
		paths = []string{defaultAuditLog(stderr)}
	}
	var key []byte
	if *keyPath != "" {
		if key, err = audit.ReadKey(*keyPath); err != nil {
			return unverifiable(stderr, err)
		}
	}
	set, err := audit.ExpandLogSet(paths)
	if err != nil {
		return unverifiable(stderr, err)
	}
	if inProcessLog(set) {
		fmt.Fprintf(stdout, "not verifiable: %s is the in-process audit log (audit.path): its lines have no seq, chain or MAC. Only the journal's log (audit.socket, avpd journal) can be verified; avpctl audit tail reads both.\n", set[0])
		return 2
	}
	verify := audit.Verify
	if *partial {
		verify = audit.VerifyPartial
	}
	rep, err := verify(set, key)
	if err != nil {
		return unverifiable(stderr, err)
	}
	for _, n := range rep.Notes {
		fmt.Fprintf(stdout, "note: %s\n", n)
	}
	if rep.Problem != nil {
		fmt.Fprintf(stdout, "BROKEN: %v\n", rep.Problem)
		if rep.Problem.Seq > 0 {
			fmt.Fprintf(stdout, "the lines up to seq %d verified; nothing after this point can be trusted\n", rep.Problem.Seq)
		}
		return 1
	}
	what := []string{fmt.Sprintf("%d file(s), %d line(s)", len(rep.Files), rep.Lines)}
	if rep.Lines > 0 {
		what = append(what, fmt.Sprintf("seq %d..%d", rep.FirstSeq, rep.LastSeq))
	}
	if rep.MACsChecked {
		what = append(what, "every MAC checked")
	} else {
		what = append(what, "MACs NOT checked (no --key): an edit of the last line or a rewritten tail would go unnoticed")
	}
	if rep.HeadChecked {
		what = append(what, "head file matches")
	}
	fmt.Fprintf(stdout, "ok: %s\n", strings.Join(what, "; "))
	return 0
}

func auditTail(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("audit tail", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	follow := fs.Bool("f", false, "")
	n := fs.Int("n", 10, "")
	secret := fs.String("secret", "", "")
	decision := fs.String("decision", "", "")
	asJSON := fs.Bool("json", false, "")
	paths, err := parseInterleaved(fs, args)
	if err != nil || len(paths) > 1 || *n < 0 {
		if err != nil {
			fmt.Fprintf(stderr, "avpctl: %v\n", err)
		}
		return usageErr(stderr, auditTailUsage)
	}
	if d := *decision; d != "" && !slices.Contains(auditDecisions, d) {
		fmt.Fprintf(stderr, "avpctl: --decision %q is not one: %s\n", d, strings.Join(auditDecisions, ", "))
		return usageErr(stderr, auditTailUsage)
	}
	var live string
	if len(paths) == 1 {
		live = paths[0]
	} else {
		live = defaultAuditLog(stderr)
	}
	match := func(l *audit.Line) bool {
		return (*secret == "" || l.Secret == *secret) && (*decision == "" || l.Decision == *decision)
	}
	print := func(raw []byte) {
		l, err := audit.ParseAnyLine(raw)
		if err != nil {
			fmt.Fprintf(stderr, "avpctl: skipping a line that is not a journal line (%v); run avpctl audit verify\n", err)
			return
		}
		if !match(l) {
			return
		}
		if *asJSON {
			stdout.Write(append(raw, '\n'))
			return
		}
		fmt.Fprintln(stdout, formatLine(l))
	}

	// The last n matching lines, newest file first until there are enough.
	set, err := audit.ExpandLogSet([]string{live})
	if err != nil {
		return fail(stderr, err)
	}
	var last [][]byte
	for i := len(set) - 1; i >= 0 && len(last) < *n; i-- {
		found, err := lastMatches(set[i], *n-len(last), match)
		if err != nil {
			return fail(stderr, err)
		}
		last = append(last, found...)
	}
	for i := len(last) - 1; i >= 0; i-- {
		print(last[i])
	}
	if !*follow {
		return 0
	}
	return followLog(live, print, stderr)
}

// followLog prints lines appended to live from its current end, across rotation.
func followLog(live string, print func([]byte), stderr io.Writer) int {
	f, err := os.Open(live)
	if err != nil {
		return fail(stderr, err)
	}
	off, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return fail(stderr, err)
	}
	var partial []byte
	buf := make([]byte, 64<<10)
	// drain prints every complete line from off to the end of f.
	drain := func() error {
		for {
			n, err := f.ReadAt(buf, off)
			if n > 0 {
				off += int64(n)
				partial = append(partial, buf[:n]...)
				for {
					i := bytes.IndexByte(partial, '\n')
					if i < 0 {
						break
					}
					print(partial[:i])
					partial = partial[i+1:]
				}
				continue
			}
			if err != nil && err != io.EOF {
				return err
			}
			return nil
		}
	}
	for {
		if err := drain(); err != nil {
			return fail(stderr, err)
		}
		// At the end: has the journal rotated (a new file at the path)? Then the old file
		// may have grown between the read above and the rename: read it to its end first.
		if st, err := os.Stat(live); err == nil {
			if cur, err := f.Stat(); err == nil && !os.SameFile(st, cur) {
				if err := drain(); err != nil {
					return fail(stderr, err)
				}
				f.Close()
				if f, err = os.Open(live); err != nil {
					return fail(stderr, err)
				}
				off, partial = 0, nil
				continue
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// printable keeps a field from driving the terminal: anything but printable ASCII is quoted.
func printable(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return strconv.QuoteToASCII(s)
		}
	}
	return s
}

// formatLine is the human form of one event.
func formatLine(l *audit.Line) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s", l.TS.UTC().Format("2006-01-02T15:04:05.000Z"))
	if l.Seq > 0 { // a line of the in-process log has none
		fmt.Fprintf(&b, " #%d", l.Seq)
	}
	fmt.Fprintf(&b, " %s", l.Type)
	add := func(k, v string) {
		if v != "" {
			fmt.Fprintf(&b, " %s=%s", k, printable(v))
		}
	}
	if l.Decision != "" {
		b.WriteString(" " + printable(l.Decision))
	}
	add("reason", l.Reason)
	add("secret", l.Secret)
	if l.Binding != nil {
		add("binding", strconv.Itoa(*l.Binding))
	}
	if l.UID != nil {
		add("uid", strconv.FormatInt(*l.UID, 10))
	}
	if l.PID != nil {
		add("pid", strconv.FormatInt(*l.PID, 10))
	}
	add("dst", l.Dst)
	if l.Method != "" || l.SNI != "" || l.Path != "" {
		fmt.Fprintf(&b, " %s %s%s", printable(l.Method), printable(l.SNI), printable(l.Path))
	}
	if l.Status != 0 {
		add("status", strconv.Itoa(l.Status))
	}
	add("config_sha256", l.ConfigSHA256)
	if l.TornBytes != 0 {
		add("torn_bytes", strconv.FormatInt(l.TornBytes, 10))
	}
	add("torn_file", l.TornFile)
	if l.Detail != "" {
		d, _ := json.Marshal(l.Detail)
		fmt.Fprintf(&b, " detail=%s", d)
	}
	return b.String()
}

// lastMatches returns up to n of the last lines of file that parse and match, newest first.
// It reads the file line by line, keeping only those n: a log file is as large as an agent
// made it, and one planted on root's path may be one line of gigabytes (refused past 1 MiB).
func lastMatches(file string, n int, match func(*audit.Line) bool) ([][]byte, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", file)
	}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20+1)
	ring := make([][]byte, n) // the last n matches; seen counts all of them
	seen := 0
	for sc.Scan() {
		if l, err := audit.ParseAnyLine(sc.Bytes()); err == nil && match(l) {
			ring[seen%n] = bytes.Clone(sc.Bytes())
			seen++
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	out := make([][]byte, 0, min(seen, n))
	for k := seen - 1; k >= max(0, seen-n); k-- {
		out = append(out, ring[k%n])
	}
	return out, nil
}

// inProcessLog reports whether the first line of a log set is one of the in-process log's.
func inProcessLog(set []string) bool {
	if len(set) == 0 {
		return false
	}
	return audit.IsInProcessLog(set[0])
}
