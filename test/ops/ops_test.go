// Package ops tests what an operator installs: the systemd units (systemd-analyze verify
// and security), and make install / make uninstall into a scratch DESTDIR. Nothing here
// touches the host's own /etc, /usr or services.
package ops

import (
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/install.golden from the current make install")

// repo is the repository root, where the Makefile is.
const repo = "../.."

var units = []string{"avpd.socket", "avpd.service", "avp-journal.socket", "avp-journal.service"}

// Exposure limits from the issue: avpd needs the network and CAP_NET_ADMIN; the journal
// needs neither.
var maxExposure = map[string]float64{"avpd.service": 2.0, "avp-journal.service": 1.5}

// need returns the path of a tool the test cannot do without. In CI a missing tool fails the
// test (.ci/run installs it); elsewhere the test skips and says why.
func need(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed; .ci/run installs the systemd package", tool)
		}
		t.Skipf("SKIP: %s is not installed (apt install systemd)", tool)
	}
	return p
}

func makeCmd(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command("make", append([]string{"-C", repo, "--no-print-directory"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// TestUnitsVerifyAndScore installs with an absolute PREFIX, so the units name binaries that
// exist, then runs systemd-analyze verify on every unit and systemd-analyze security
// --offline=true on both services, failing above the exposure limits. The README states the
// scores; they must match.
func TestUnitsVerifyAndScore(t *testing.T) {
	analyze := need(t, "systemd-analyze")
	prefix := t.TempDir()
	makeCmd(t, "install", "PREFIX="+prefix, "SYSCONFDIR="+filepath.Join(prefix, "etc"))
	unitDir := filepath.Join(prefix, "lib", "systemd", "system")

	var paths []string
	for _, u := range units {
		p := filepath.Join(unitDir, u)
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(data), "@BINDIR@") || strings.Contains(string(data), "@DOCDIR@") {
			t.Fatalf("%s still holds a placeholder", p)
		}
		if strings.HasSuffix(u, ".service") && !strings.Contains(string(data), "ExecStart="+filepath.Join(prefix, "bin", "avpd")+" ") {
			t.Fatalf("%s does not start %s/bin/avpd:\n%s", u, prefix, data)
		}
		paths = append(paths, p)
	}
	out, err := exec.Command(analyze, append([]string{"verify", "--man=no"}, paths...)...).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}

	readme, err := os.ReadFile(filepath.Join(repo, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`Overall exposure level for (\S+): ([0-9.]+) (\S+)`)
	for _, svc := range []string{"avpd.service", "avp-journal.service"} {
		out, err := exec.Command(analyze, "security", "--offline=true", "--no-pager", filepath.Join(unitDir, svc)).CombinedOutput()
		if err != nil {
			t.Fatalf("systemd-analyze security %s: %v\n%s", svc, err, out)
		}
		m := re.FindStringSubmatch(string(out))
		if m == nil || m[1] != svc {
			t.Fatalf("no overall exposure for %s in:\n%s", svc, out)
		}
		score, _ := strconv.ParseFloat(m[2], 64)
		t.Logf("systemd-analyze security: %s %s %s", svc, m[2], m[3])
		if score > maxExposure[svc] {
			t.Errorf("%s exposure %.1f is above %.1f:\n%s", svc, score, maxExposure[svc], out)
		}
		want := fmt.Sprintf("| `%s` | %s %s |", svc, m[2], m[3])
		if !strings.Contains(string(readme), want) {
			t.Errorf("README.md does not state the score; it needs the line %q", want)
		}
	}
}

// tree lists every file and directory under root as "MODE TYPE PATH", sorted.
func tree(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == root {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		typ := "f"
		if d.IsDir() {
			typ = "d"
		}
		out = append(out, fmt.Sprintf("%04o %s %s", fi.Mode().Perm(), typ, rel))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(out, func(a, b string) int { return strings.Compare(a[7:], b[7:]) })
	return out
}

// TestInstallLayout: make install DESTDIR=... lays out exactly the golden tree with its
// modes; running it again keeps an edited config; make uninstall removes every file it
// installed and keeps the edited config.
func TestInstallLayout(t *testing.T) {
	// The golden modes of directories that install -d creates as parents follow the umask.
	syscall.Umask(0o022)
	dest := t.TempDir()
	out := makeCmd(t, "install", "DESTDIR="+dest)
	if !strings.Contains(out, "from bindings.example.yaml") {
		t.Fatalf("install did not say it created the config:\n%s", out)
	}
	got := strings.Join(tree(t, dest), "\n") + "\n"
	golden := filepath.Join("testdata", "install.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Fatalf("make install laid out (go test ./test/ops -update to accept):\n%s\nwant:\n%s", got, want)
	}
	example, err := os.ReadFile(filepath.Join(repo, "bindings.example.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dest, "etc", "agent-vault-proxy", "bindings.yaml")
	if data, _ := os.ReadFile(cfg); string(data) != string(example) {
		t.Fatal("the installed config is not bindings.example.yaml")
	}

	// An operator's config survives a second install and the uninstall.
	edited := append([]byte("# edited by the operator\n"), example...)
	if err := os.WriteFile(cfg, edited, 0o640); err != nil {
		t.Fatal(err)
	}
	if out := makeCmd(t, "install", "DESTDIR="+dest); !strings.Contains(out, "keeping the existing") {
		t.Fatalf("second install did not keep the config:\n%s", out)
	}
	if data, _ := os.ReadFile(cfg); string(data) != string(edited) {
		t.Fatal("make install overwrote an edited config")
	}
	makeCmd(t, "uninstall", "DESTDIR="+dest)
	var left []string
	for _, line := range tree(t, dest) {
		if strings.Contains(line, " f ") || strings.Contains(line, "agent-vault-proxy") {
			left = append(left, line)
		}
	}
	wantLeft := []string{"0750 d etc/agent-vault-proxy", "0640 f etc/agent-vault-proxy/bindings.yaml"}
	if !slices.Equal(left, wantLeft) {
		t.Fatalf("after uninstall with an edited config, left: %v, want %v", left, wantLeft)
	}

	// A fresh install, uninstalled, leaves no file and none of its own directories.
	dest2 := t.TempDir()
	makeCmd(t, "install", "DESTDIR="+dest2)
	makeCmd(t, "uninstall", "DESTDIR="+dest2)
	for _, line := range tree(t, dest2) {
		if strings.Contains(line, " f ") || strings.Contains(line, "agent-vault-proxy") {
			t.Errorf("left after uninstall: %s", line)
		}
	}
}

// TestSysusersTmpfiles (root): the installed sysusers.d and tmpfiles.d entries, applied to
// the DESTDIR tree with --root, create the users and give the config, state and log
// directories their owners and modes.
func TestSysusersTmpfiles(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set but not running as root")
		}
		t.Skip("SKIP: needs root to chown in the scratch tree (sudo make test)")
	}
	sysusers, tmpfiles := need(t, "systemd-sysusers"), need(t, "systemd-tmpfiles")
	dest := t.TempDir()
	makeCmd(t, "install", "DESTDIR="+dest)
	for _, d := range []string{"var/lib", "var/log"} {
		os.MkdirAll(filepath.Join(dest, d), 0o755)
	}
	if out, err := exec.Command(sysusers, "--root="+dest).CombinedOutput(); err != nil {
		t.Fatalf("systemd-sysusers: %v\n%s", err, out)
	}
	ids := map[string]int{}
	for _, f := range []string{"passwd", "group"} {
		data, err := os.ReadFile(filepath.Join(dest, "etc", f))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(data), "\n") {
			parts := strings.Split(line, ":")
			if len(parts) >= 3 {
				n, _ := strconv.Atoi(parts[2])
				ids[f+":"+parts[0]] = n
			}
		}
	}
	for _, k := range []string{"passwd:avp", "passwd:avp-audit", "group:avp", "group:avp-audit", "group:avp-admin"} {
		if _, ok := ids[k]; !ok {
			t.Fatalf("systemd-sysusers did not create %s", k)
		}
	}
	// tmpfiles resolves the ACL's group on the host, where avp-admin does not exist; it
	// reports that and carries on (on a real host sysusers runs first).
	if out, err := exec.Command(tmpfiles, "--create", "--root="+dest).CombinedOutput(); err != nil {
		t.Fatalf("systemd-tmpfiles: %v\n%s", err, out)
	}
	for _, c := range []struct {
		path      string
		mode      os.FileMode
		user, grp string
	}{
		{"etc/agent-vault-proxy", 0o750, "", "avp"},
		{"etc/agent-vault-proxy/bindings.yaml", 0o640, "", "avp"},
		{"var/lib/agent-vault-proxy", 0o700, "avp", "avp"},
		{"var/log/agent-vault-proxy", 0o750, "avp-audit", "avp-audit"},
	} {
		fi, err := os.Stat(filepath.Join(dest, c.path))
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		wantUID := 0
		if c.user != "" {
			wantUID = ids["passwd:"+c.user]
		}
		if fi.Mode().Perm() != c.mode || int(st.Uid) != wantUID || int(st.Gid) != ids["group:"+c.grp] {
			t.Errorf("%s: mode %04o uid %d gid %d, want %04o uid %d gid %d", c.path, fi.Mode().Perm(), st.Uid, st.Gid, c.mode, wantUID, ids["group:"+c.grp])
		}
	}
}
