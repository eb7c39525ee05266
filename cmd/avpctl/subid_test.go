package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSubordinateRanges(t *testing.T) {
	dir := t.TempDir()
	sub := filepath.Join(dir, "subuid")
	os.WriteFile(sub, []byte("other:100000:65536\nagent:165536:65536\n4242:300000:10\nbad:x:1\nagent:0:0\n"), 0o644)
	got, err := subordinateRanges(sub, "agent", 4242)
	if err != nil || strings.Join(got, ",") != "165536-231071,300000-300009" {
		t.Fatalf("got %v %v", got, err)
	}
	if got, err := subordinateRanges(sub, "nobody", 1); err != nil || got != nil {
		t.Fatalf("a user with none: %v %v", got, err)
	}
	if got, err := subordinateRanges(filepath.Join(dir, "missing"), "agent", 4242); err != nil || got != nil {
		t.Fatalf("no file: %v %v", got, err)
	}
}

// An enrolled user with subordinate IDs could leave the redirect through a user namespace;
// the warning names them and the usermod that removes them.
func TestSubordinateWarning(t *testing.T) {
	dir := t.TempDir()
	su, sg := filepath.Join(dir, "subuid"), filepath.Join(dir, "subgid")
	os.WriteFile(su, []byte("54321:100000:65536\n"), 0o644)
	os.WriteFile(sg, []byte("54321:100000:65536\n"), 0o644)
	old := subuidFiles
	subuidFiles = []string{su, sg}
	t.Cleanup(func() { subuidFiles = old })
	msg, fix, _ := subordinateWarning(54321)
	if !strings.Contains(msg, "100000-165535") || fix != "usermod --del-subuids 100000-165535 --del-subgids 100000-165535 54321" {
		t.Fatalf("msg %q fix %q", msg, fix)
	}
	if msg, _, _ := subordinateWarning(54322); msg != "" {
		t.Fatalf("a user with none: %q", msg)
	}
}

// explain --uid takes a user name as enroll-uid and doctor do.
func TestExplainUID(t *testing.T) {
	for in, want := range map[string]int64{"": -1, "0": 0, "4242": 4242, "root": 0} {
		if got, err := explainUID(in); err != nil || got != want {
			t.Errorf("explainUID(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := explainUID("no-such-user-avp"); err == nil || !strings.Contains(err.Error(), "no such user") {
		t.Errorf("unknown user: %v", err)
	}
}
