package inject

import (
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"net/http"
	"path"
	"regexp"
	"strings"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
)

const uidConfig = `version: 1
backend: {type: file, file: {path: /etc/avp/secrets.yaml}}
secrets:
  JIRA:
    placeholder: avp-PLACEHOLDER-jira-000000000000000
    inject:
      header: Authorization
      format: "Basic {secret}"
      template: "{{ (JIRA_EMAIL + ':' + JIRA_TOKEN) | b64encode }}"
      compose: [JIRA_EMAIL, JIRA_TOKEN]
    bindings:
      - host: acme.atlassian.test
        methods: [GET]
        paths: ["/rest/api/3/**"]
        uids: [1001, 1002]
`

func TestUIDScopedBinding(t *testing.T) {
	cfg, err := config.Parse("bindings.yaml", []byte(uidConfig))
	if err != nil {
		t.Fatal(err)
	}
	p := NewPolicy(cfg)
	r := req("GET", "acme.atlassian.test", "/rest/api/3/issue/1", "Authorization", "Basic avp-PLACEHOLDER-jira-000000000000000")
	for _, tc := range []struct {
		uid    int64
		action Action
		reason string
	}{
		{1001, Inject, ReasonAllowed},
		{1002, Inject, ReasonAllowed},
		{1003, ForwardVerbatim, ReasonUIDNotAllowed},
		{-1, ForwardVerbatim, ReasonUIDNotAllowed}, // unknown caller: fail closed
	} {
		d := p.Decide(Facts{UID: tc.uid, SNI: "acme.atlassian.test"}, r)
		if d.Action != tc.action || d.Reason != tc.reason {
			t.Errorf("uid %d: %v/%s, want %v/%s", tc.uid, d.Action, d.Reason, tc.action, tc.reason)
		}
	}
}

func TestTemplateValue(t *testing.T) {
	cfg, err := config.Parse("bindings.yaml", []byte(uidConfig))
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.Secrets[0]
	if got := s.FetchNames(); len(got) != 2 || got[0] != "JIRA_EMAIL" || got[1] != "JIRA_TOKEN" {
		t.Fatalf("FetchNames = %v", got)
	}
	v, err := Value(s, map[string][]byte{"JIRA_EMAIL": []byte("me@acme.test"), "JIRA_TOKEN": []byte("t0k")})
	if err != nil {
		t.Fatal(err)
	}
	if want := base64.StdEncoding.EncodeToString([]byte("me@acme.test:t0k")); string(v) != want {
		t.Fatalf("Value = %q, want %q", v, want)
	}
	h := http.Header{"Authorization": {"Basic avp-PLACEHOLDER-jira-000000000000000"}}
	Apply(h, s, v)
	if got := h.Get("Authorization"); got != "Basic "+base64.StdEncoding.EncodeToString([]byte("me@acme.test:t0k")) {
		t.Fatalf("Authorization = %q", got)
	}
}

func TestValueRefusesControlBytes(t *testing.T) {
	p := testPolicy(t)
	s := p.Secrets()[2] // OPENAI
	if _, err := Value(s, map[string][]byte{"OPENAI": []byte("sk-x\r\nX-Evil: 1")}); err == nil {
		t.Fatal("a stored value with CR LF was accepted into a header")
	}
}

// TestPropertyInjectIffReferenceAllows: over random (uid, host, method, path) the policy
// injects exactly when an independent reference matcher, written with regexps and
// path.Clean, authorizes the request.
func TestPropertyInjectIffReferenceAllows(t *testing.T) {
	const src = `version: 1
backend: {type: file, file: {path: /etc/avp/secrets.yaml}}
secrets:
  K:
    placeholder: avp-PLACEHOLDER-property-00000000000
    bindings:
      - host: api.a.test
        methods: [GET, POST]
        paths: ["/v1/**", "/x/*/y"]
      - host: "*.b.test"
        uids: [1001]
      - host: c.test
        methods: [DELETE]
        paths: ["/v1/*"]
`
	cfg, err := config.Parse("bindings.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	p := NewPolicy(cfg)
	hosts := []string{"api.a.test", "a.test", "x.b.test", "b.test", "y.x.b.test", "c.test", "API.A.TEST", "evil.test"}
	methods := []string{"GET", "POST", "DELETE", "PUT", "get"}
	segs := []string{"v1", "x", "y", "z", "..", ".", "", "admin"}
	uids := []int64{1001, 1002, -1}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20000; i++ {
		host := hosts[rng.IntN(len(hosts))]
		method := methods[rng.IntN(len(methods))]
		uid := uids[rng.IntN(len(uids))]
		n := rng.IntN(5)
		parts := make([]string, n)
		for j := range parts {
			parts[j] = segs[rng.IntN(len(segs))]
		}
		p0 := "/" + strings.Join(parts, "/")
		r := req(method, host, p0, "Authorization", "avp-PLACEHOLDER-property-00000000000")
		d := p.Decide(Facts{UID: uid, SNI: strings.ToLower(host)}, r)
		want := referenceAllows(uid, strings.ToLower(host), method, p0)
		if (d.Action == Inject) != want {
			t.Fatalf("uid=%d host=%s method=%s path=%q: policy %v (%s), reference %v", uid, host, method, p0, d.Action, d.Reason, want)
		}
	}
}

func referenceAllows(uid int64, host, method, p string) bool {
	// A dot segment is never allowed: servers disagree on what it names.
	for _, s := range strings.Split(p, "/") {
		if s == "." || s == ".." {
			return false
		}
	}
	clean := path.Clean(p)
	glob := func(g string) bool {
		re := "^" + strings.NewReplacer("/**", "(/[^/]+)*", "*", "[^/]*", ".", `\.`).Replace(g) + "/?$"
		return regexp.MustCompile(re).MatchString(clean)
	}
	in := func(x string, xs ...string) bool {
		for _, y := range xs {
			if x == y {
				return true
			}
		}
		return false
	}
	switch {
	case host == "api.a.test":
		return in(method, "GET", "POST") && (glob("/v1/**") || glob("/x/*/y"))
	case regexp.MustCompile(`^[^.]+\.b\.test$`).MatchString(host):
		return uid == 1001
	case host == "c.test":
		return method == "DELETE" && glob("/v1/*")
	}
	return false
}

func BenchmarkNormalizePath(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		NormalizePath("/v1/chat/%63ompletions/../completions")
	}
}

func ExamplePolicy_Decide() {
	cfg, _ := config.Parse("bindings.yaml", []byte(testConfig))
	p := NewPolicy(cfg)
	d := p.Decide(Facts{UID: 1000, SNI: "api.openai.com"}, req("DELETE", "api.openai.com", "/v1/files/1", "Authorization", "Bearer "+phOpenAI))
	fmt.Println(d.Action, d.Reason)
	// Output: forward_verbatim method_not_allowed
}
