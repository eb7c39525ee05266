package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	sddaemon "github.com/coreos/go-systemd/v22/daemon"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// testAckDelayEnv delays every ack after its fdatasync. It exists only so the end-to-end
// test can show that nothing goes upstream before the ack; the journal says so when set.
const testAckDelayEnv = "AVP_JOURNAL_TEST_ACK_DELAY"

const journalUsage = `usage: avpd journal --log PATH [--socket PATH] [--socket-group GROUP] [--allow-uid UID ...]
                    [--key PATH] [--rotate-size BYTES] [--journald auto|off]

Runs the audit journal: receives avpd's events on a SOCK_SEQPACKET Unix socket (the one
systemd passes, else --socket), appends each as a hash-chained, HMAC-signed JSON line to
--log, and acknowledges it only after the fdatasync that covers it. Root may always send
events; --allow-uid adds other users (avpd's), and --socket-group lets them connect to a
socket the journal binds itself. SIGHUP reopens the log file.

Flags:
`

type uidList []uint32

func (u *uidList) String() string { return fmt.Sprint(*u) }

func (u *uidList) Set(s string) error {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		*u = append(*u, uint32(n))
		return nil
	}
	us, err := user.Lookup(s)
	if err != nil {
		return fmt.Errorf("no user %q; give a user name or a numeric UID", s)
	}
	n, err := strconv.ParseUint(us.Uid, 10, 32)
	if err != nil {
		return fmt.Errorf("user %q has a non-numeric uid %q", s, us.Uid)
	}
	*u = append(*u, uint32(n))
	return nil
}

// parseSize accepts bytes with an optional K, M or G suffix (powers of 1024).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("--rotate-size %q is not a positive size in bytes (K, M, G suffixes allowed)", s)
	}
	return n * mult, nil
}

func journalCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("avpd journal", flag.ContinueOnError)
	fs.SetOutput(stderr)
	logPath := fs.String("log", "", "`PATH` of the live audit log; rotated files and the .head file sit beside it")
	socket := fs.String("socket", "/run/avp-journal/journal.sock", "`PATH` of the socket to bind when systemd passes none, mode 0660")
	key := fs.String("key", "", "`PATH` of the HMAC key file, created 0600 on first start (default: journal.key beside --log)")
	rotate := fs.String("rotate-size", "64M", "rotate the log when it reaches this size (`BYTES`, K/M/G suffixes)")
	sockGroup := fs.String("socket-group", "", "give the socket it binds to this group (`GROUP`, name or number), so avpd's user can connect: avp for a journal run by hand")
	mirror := fs.String("journald", "auto", "mirror events to systemd-journald: auto (when its socket exists) or off")
	var allow uidList
	fs.Var(&allow, "allow-uid", "also accept events from this user (`UID` or name); repeatable; root is always accepted")
	usage := func(w io.Writer) {
		fs.SetOutput(w)
		fmt.Fprint(w, journalUsage)
		fs.PrintDefaults()
	}
	fs.Usage = func() {} // printed below, once, to the right stream
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			usage(stdout)
			return 0
		}
		usage(stderr)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "avpd journal: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if *logPath == "" || !filepath.IsAbs(*logPath) {
		fmt.Fprintf(stderr, "avpd journal: --log must be an absolute path, for example --log /var/log/agent-vault-proxy/audit.jsonl\n")
		return 2
	}
	size, err := parseSize(*rotate)
	if err != nil {
		fmt.Fprintf(stderr, "avpd journal: %v\n", err)
		return 2
	}
	if *mirror != "auto" && *mirror != "off" {
		fmt.Fprintf(stderr, "avpd journal: --journald must be auto or off, got %q\n", *mirror)
		return 2
	}
	logger := log.New(stderr, "avpd: ", log.LstdFlags|log.Lmsgprefix)
	opts := audit.JournalOptions{
		Log: *logPath, Key: *key, AllowUIDs: allow, RotateSize: size, Logf: logger.Printf,
	}
	if v := os.Getenv(testAckDelayEnv); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			fmt.Fprintf(stderr, "avpd journal: %s=%q is not a duration\n", testAckDelayEnv, v)
			return 2
		}
		opts.AckDelay = d
		logger.Printf("journal: TEST MODE: %s=%v delays every ack; never use this in production", testAckDelayEnv, d)
	}
	if *mirror == "auto" {
		if m := audit.NewJournaldMirror(); m != nil {
			opts.Mirror = m.Push
		}
	}

	// Taken before the log is opened and recovered: a SIGHUP (logrotate's) during that
	// would otherwise end the process. The handler below acts on what came meanwhile.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	ln, fromSystemd, err := journalListener(*socket)
	if err != nil {
		fmt.Fprintf(stderr, "avpd journal: %v\n", err)
		return 1
	}
	j, err := audit.OpenJournal(opts)
	if err != nil {
		ln.Close()
		fmt.Fprintf(stderr, "avpd journal: %v\n", err)
		return 1
	}
	if *sockGroup != "" {
		if fromSystemd {
			logger.Printf("journal: --socket-group ignored: the socket is systemd's (SocketGroup= in avp-journal.socket)")
		} else if err := chgrpSocket(*socket, *sockGroup); err != nil {
			ln.Close()
			fmt.Fprintf(stderr, "avpd journal: %v\n", err)
			return 1
		}
	}
	if !fromSystemd {
		// Remove the socket on exit so a client fails fast instead of waiting on a file
		// nobody listens on; systemd owns its own socket.
		ln.SetUnlinkOnClose(true)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for s := range sigs {
			if s == syscall.SIGHUP {
				if err := j.Reopen(); err != nil {
					logger.Printf("journal: reopen on SIGHUP: %v", err)
				}
				continue
			}
			logger.Printf("journal: received %v; committing what is queued and stopping", s)
			cancel()
			return
		}
	}()
	where := *socket
	if fromSystemd {
		where = "the socket from systemd"
	}
	uids := "root only"
	if len(allow) > 0 {
		names := make([]string, len(allow))
		for i, u := range allow {
			names[i] = "uid " + strconv.FormatUint(uint64(u), 10)
			if usr, err := user.LookupId(strconv.FormatUint(uint64(u), 10)); err == nil {
				names[i] += " (" + usr.Username + ")"
			}
		}
		uids = "root and " + strings.Join(names, ", ")
	}
	logger.Printf("journal: ready on %s, writing %s (events accepted from %s)", where, *logPath, uids)
	sddaemon.SdNotify(false, sddaemon.SdNotifyReady)
	if err := j.Serve(ctx, ln); err != nil {
		logger.Printf("journal: %v", err)
		if errors.Is(err, audit.ErrFsync) {
			logger.Printf("journal: exiting without retrying; a restart recovers from the file")
		}
		return 1
	}
	return 0
}

// journalListener takes the one socket systemd passes or binds path itself.
func journalListener(path string) (*net.UnixListener, bool, error) {
	files := activation.Files(true)
	switch len(files) {
	case 0:
		ln, err := audit.ListenJournal(path)
		return ln, false, err
	case 1:
		ln, err := audit.FileListener(files[0])
		files[0].Close()
		return ln, true, err
	}
	for _, f := range files {
		f.Close()
	}
	return nil, false, fmt.Errorf("systemd passed %d sockets; the journal takes exactly one (ListenSequentialPacket=)", len(files))
}

// chgrpSocket gives the socket at path to group (a name or a number), keeping mode 0660.
func chgrpSocket(path, group string) error {
	gid, err := strconv.Atoi(group)
	if err != nil {
		g, lerr := user.LookupGroup(group)
		if lerr != nil {
			return fmt.Errorf("--socket-group %q: no such group", group)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	if err := os.Chown(path, -1, gid); err != nil {
		return fmt.Errorf("--socket-group %s: chgrp %s: %w (the journal's user must be root or in that group)", group, path, err)
	}
	return nil
}
