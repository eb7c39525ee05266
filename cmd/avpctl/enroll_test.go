package main

import (
	"strings"
	"testing"
)

// TestEnrollRefusesPrivilegedGroupMember: an enrolled user could be a member of avp-admin
// (the admin socket's group) and unenroll itself, its HTTPS then going past avpd. enroll-uid
// now refuses a member of avp-admin, avp or avp-audit, primary or supplementary, before it
// asks avpd, saying why and how to fix it.
func TestEnrollRefusesPrivilegedGroupMember(t *testing.T) {
	saved := userGroups
	t.Cleanup(func() { userGroups = saved })
	for _, tc := range []struct {
		name, primary string
		groups        []string
		want          string // "" when allowed
	}{
		{"agent", "agent", []string{"agent", "avp-admin"}, "gpasswd -d agent avp-admin"},
		{"agent", "agent", []string{"agent", "docker", "avp-audit"}, "gpasswd -d agent avp-audit"},
		{"agent", "avp", []string{"avp"}, "usermod -g <another group> agent"},
		{"agent", "agent", []string{"agent", "avp-admins"}, ""},
	} {
		userGroups = func(string) (string, string, []string, error) { return tc.name, tc.primary, tc.groups, nil }
		code, out, errs := avpctl("--runtime-dir", t.TempDir(), "enroll-uid", "agent")
		if tc.want == "" {
			if strings.Contains(errs, "member of group") {
				t.Errorf("groups %v: refused: %q", tc.groups, errs)
			}
			continue
		}
		if code != 1 || out != "" || !strings.Contains(errs, "member of group") || !strings.Contains(errs, tc.want) {
			t.Errorf("groups %v: exit %d, stdout %q, stderr %q: want a refusal with %q", tc.groups, code, out, errs, tc.want)
		}
	}
}
