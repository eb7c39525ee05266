package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
)

// A user with subordinate UIDs (/etc/subuid, which useradd fills by default) can, through the
// setuid newuidmap of the uidmap package, run a process as one of them inside a user
// namespace that shares the host's network. Its sockets then belong to that UID, which is
// not enrolled: its HTTPS goes out directly, past avpd and its audit. nftables could match
// the ranges too, but the simpler and sturdier fix is that an agent's user has none.

// subuidFiles are the files of subordinate IDs; a test points them elsewhere.
var subuidFiles = []string{"/etc/subuid", "/etc/subgid"}

// subordinateRanges lists the ranges file gives the user with this name or UID
// ("start-end"); a missing file gives none.
func subordinateRanges(file, name string, uid uint32) ([]string, error) {
	f, err := os.Open(file)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		owner, rest, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		if !ok || owner != name && owner != strconv.FormatUint(uint64(uid), 10) {
			continue
		}
		startS, countS, _ := strings.Cut(rest, ":")
		start, err1 := strconv.ParseUint(startS, 10, 32)
		count, err2 := strconv.ParseUint(countS, 10, 32)
		if err1 != nil || err2 != nil || count == 0 {
			continue
		}
		out = append(out, fmt.Sprintf("%d-%d", start, start+count-1))
	}
	return out, sc.Err()
}

// subordinateWarning is what to tell an operator about uid's subordinate IDs: "" when it has
// none. bad reports that newuidmap is there to use them.
func subordinateWarning(uid uint32) (msg, fix string, bad bool) {
	name := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(name); err == nil {
		name = u.Username
	}
	var found []string
	var fixes []string
	for i, file := range subuidFiles {
		r, err := subordinateRanges(file, name, uid)
		if err != nil {
			return fmt.Sprintf("cannot read %s: %v", file, err), "", false
		}
		if len(r) == 0 {
			continue
		}
		found = append(found, file+" "+strings.Join(r, ","))
		flag := []string{"--del-subuids", "--del-subgids"}[min(i, 1)]
		for _, x := range r {
			fixes = append(fixes, flag+" "+x)
		}
	}
	if len(found) == 0 {
		return "", "", false
	}
	_, err := exec.LookPath("newuidmap")
	bad = err == nil
	msg = fmt.Sprintf("user %s (uid %d) has subordinate IDs (%s): in a user namespace made with newuidmap it can run as them, and their HTTPS is not redirected", name, uid, strings.Join(found, "; "))
	if !bad {
		msg += " (newuidmap is not installed now)"
	}
	return msg, "usermod " + strings.Join(fixes, " ") + " " + name, bad
}
