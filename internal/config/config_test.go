package config

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

func TestExampleParses(t *testing.T) {
	data, err := os.ReadFile("../../bindings.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := Parse("bindings.example.yaml", data)
	if err != nil {
		t.Fatalf("the shipped example does not validate:\n%v", err)
	}
	if len(cfg.Secrets) != 8 || cfg.Secrets[0].Name != "ANTHROPIC_API_KEY" || cfg.Secrets[0].Header != "X-Api-Key" {
		t.Fatalf("unexpected secrets %+v", cfg.Secrets)
	}
}

const good = `version: 1
backend: {type: file, file: {path: /etc/s.yaml}}
secrets:
  A:
    placeholder: sk-avp-PLACEHOLDER-aaaaaaaaaaaaaa
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: api.example.com
        methods: [GET]
        paths: ["/v1/**"]
`

func TestBadConfigs(t *testing.T) {
	tests := []struct {
		name, src, want string
	}{
		{"root in uids", strings.Replace(good, "methods: [GET]", "methods: [GET]\n        uids: [root]", 1), `uids lists uid 0, which can never be enrolled`},
		{"ttl under a second", good + "cache: {ttl: 500ms}\n", `cache.ttl "500ms" is not a duration between 1s and 24h`},
		{"unknown top key", good + "extra: 1\n", `bindings.yaml:11:1: unknown key "extra" in the top level; allowed keys are audit, backend, cache, proxy, secrets, version`},
		{"unknown binding key", strings.Replace(good, "methods:", "methdos:", 1), `bindings.yaml:9:9: unknown key "methdos" in secret A.bindings[0]`},
		{"short placeholder", strings.Replace(good, "sk-avp-PLACEHOLDER-aaaaaaaaaaaaaa", "short", 1), `bindings.yaml:5:18: secret A.placeholder is 5 characters; use at least 24`},
		{"lower-case method", strings.Replace(good, "[GET]", "[get]", 1), `bindings.yaml:9:19: secret A.bindings[0].methods entry "get" must be an upper-case HTTP method`},
		{"empty methods", strings.Replace(good, "[GET]", "[]", 1), `bindings.yaml:9:18: secret A.bindings[0].methods is empty`},
		{"star method", strings.Replace(good, "[GET]", `["*"]`, 1), `methods entry "*" must be an upper-case HTTP method`},
		{"path without slash", strings.Replace(good, `"/v1/**"`, `"v1/**"`, 1), `paths entry "v1/**": paths must start with "/"`},
		{"wildcard apex tld", strings.Replace(good, "api.example.com", `"*.com"`, 1), `a wildcard must sit above a registrable domain`},
		{"wildcard public suffix", strings.Replace(good, "api.example.com", `"*.co.uk"`, 1), `"co.uk" is a public suffix`},
		{"upper-case host", strings.Replace(good, "api.example.com", "API.example.com", 1), `write the host in lowercase`},
		{"upper-case wildcard host", strings.Replace(good, "api.example.com", `"*.Example.com"`, 1), `write the host in lowercase: "*.example.com"`},
		{"paths not a list", strings.Replace(good, `["/v1/**"]`, `"/v1/**"`, 1), `paths must be a list, for example ["/v1/**"]`},
		{"methods not a list", strings.Replace(good, "[GET]", "GET", 1), `methods must be a list, for example [GET]`},
		{"method twice", strings.Replace(good, "[GET]", "[GET, POST, GET]", 1), `bindings.yaml:9:30: secret A.bindings[0].methods lists GET twice; keep one`},
		{"trailing dot", strings.Replace(good, "api.example.com", "api.example.com.", 1), `remove the trailing dot`},
		{"ip literal", strings.Replace(good, "api.example.com", "10.0.0.1", 1), `IP literals never get injection`},
		{"host as a URL", strings.Replace(good, "api.example.com", `"https://API.example.com/v1"`, 1), `a host is a name, not a URL: write "api.example.com" (paths go under paths:)`},
		{"host with a port", strings.Replace(good, "api.example.com", `"api.example.com:443"`, 1), `a host takes no port (avpd intercepts port 443 only): write "api.example.com"`},
		{"format without secret", strings.Replace(good, `"Bearer {secret}"`, `"Bearer"`, 1), `must contain {secret} exactly once`},
		{"bad version", strings.Replace(good, "version: 1", "version: 2", 1), `bindings.yaml:1:10: unsupported version "2"`},
		{"missing backend", strings.Replace(good, "backend: {type: file, file: {path: /etc/s.yaml}}\n", "", 1), `missing backend: section`},
		{"relative secrets path", strings.Replace(good, "/etc/s.yaml", "s.yaml", 1), `backend.file.path must be an absolute path`},
		{"hop-by-hop header", strings.Replace(good, "header: Authorization", "header: Connection", 1), `is a hop-by-hop or framing header`},
		{"proxy-connection header", strings.Replace(good, "header: Authorization", "header: Proxy-Connection", 1), `is a hop-by-hop or framing header`},
		{"zero connections per uid", good + "proxy: {max_connections_per_uid: 0}\n", `bindings.yaml:11:34: proxy.max_connections_per_uid "0" is not a number between 1 and 1000000; write for example "max_connections_per_uid: 16384"`},
		{"yaml syntax", "version: 1\nsecrets: [\n", `bindings.yaml:2:1: did not find expected node content; fix the YAML syntax`},
		{"tab indentation", "version: 1\nsecrets:\n\tA:\n    placeholder: x\n", `bindings.yaml:3:1: a tab in the indentation; YAML indents with spaces only: replace the tab with spaces`},
		{"placeholder substring", good + `  B:
    placeholder: sk-avp-PLACEHOLDER-aaaaaaaaaaaaaa-longer
    bindings: [{host: b.example.com}]
`, `placeholders of secrets A and B are equal or one contains the other`},
		{"listen on 443", good + "proxy: {listen: \"127.0.0.1:443\"}\n", `proxy.listen "127.0.0.1:443" must be an IPv4 loopback address`},
		{"also repeats the header and format", strings.Replace(good, `format: "Bearer {secret}"}`, `format: "Bearer {secret}", also: [{header: authorization, format: "Bearer {secret}"}]}`, 1), `bindings.yaml:6:80: secret A.inject.also[0] repeats header "Authorization" with format "Bearer {secret}"; list each pair once`},
		{"also hop-by-hop", strings.Replace(good, `format: "Bearer {secret}"}`, `format: "Bearer {secret}", also: [{header: Keep-Alive}]}`, 1), `secret A.inject.also[0].header "Keep-Alive" is a hop-by-hop or framing header`},
		{"also format without secret", strings.Replace(good, `format: "Bearer {secret}"}`, `format: "Bearer {secret}", also: [{header: X-Key, format: "k"}]}`, 1), `secret A.inject.also[0].format must contain {secret} exactly once`},
		{"also unknown key", strings.Replace(good, `format: "Bearer {secret}"}`, `format: "Bearer {secret}", also: [{header: X-Key, fromat: "{secret}"}]}`, 1), `unknown key "fromat" in secret A.inject.also[0]; allowed keys are format, header`},
		{"also without header", strings.Replace(good, `format: "Bearer {secret}"}`, `format: "Bearer {secret}", also: [{format: "{secret}"}]}`, 1), `secret A.inject.also[0] has no header`},
		{"also not a list", strings.Replace(good, `format: "Bearer {secret}"}`, `format: "Bearer {secret}", also: {header: X-Key}}`, 1), `secret A.inject.also must be a list of {header, format}`},
		{"no bindings", good + "  C:\n    placeholder: sk-avp-PLACEHOLDER-cccccccccccccc\n", `secret C has no bindings`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("bindings.yaml", []byte(tc.src))
			if err == nil {
				t.Fatalf("accepted:\n%s", tc.src)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error:\n%v\nwant it to contain:\n%s", err, tc.want)
			}
		})
	}
}

func TestInjectAlso(t *testing.T) {
	src := strings.Replace(good, `format: "Bearer {secret}"}`, `format: "Bearer {secret}", also: [{header: x-api-key}, {header: X-Auth, format: "Token {secret}"}, {header: authorization, format: "token {secret}"}]}`, 1)
	cfg, err := Parse("bindings.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	got := cfg.Secrets[0].Targets()
	want := []InjectAs{{"Authorization", "Bearer {secret}"}, {"X-Api-Key", "{secret}"}, {"X-Auth", "Token {secret}"}, {"Authorization", "token {secret}"}}
	if len(got) != len(want) {
		t.Fatalf("targets %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("targets %+v, want %+v", got, want)
		}
	}
}

func TestGoodConfigDefaults(t *testing.T) {
	cfg, err := Parse("bindings.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Proxy.Listen.String() != DefaultListen || cfg.Cache.TTL != DefaultCacheTTL || cfg.Audit.Path != DefaultAuditLog || cfg.Proxy.MaxConnsPerUID != DefaultMaxConnsPerUID {
		t.Fatalf("defaults: %+v", cfg)
	}
	cfg, err = Parse("bindings.yaml", []byte(good+"proxy: {max_connections_per_uid: 64}\n"))
	if err != nil || cfg.Proxy.MaxConnsPerUID != 64 {
		t.Fatalf("max_connections_per_uid 64: %v %+v", err, cfg.Proxy)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	if data, err := os.ReadFile("../../bindings.example.yaml"); err == nil {
		f.Add(data)
	}
	f.Add([]byte("version: 1\nsecrets: [\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse("fuzz.yaml", data)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz.yaml:") {
				t.Fatalf("error without a position: %v", err)
			}
			return
		}
		// Whatever parses must satisfy the invariants the decision relies on.
		for _, s := range cfg.Secrets {
			if len(s.Placeholder) < MinPlaceholderLen || len(s.Bindings) == 0 {
				t.Fatalf("accepted secret %+v", s)
			}
			for _, b := range s.Bindings {
				if ValidateHostPattern(b.Host) != nil {
					t.Fatalf("accepted host %q", b.Host)
				}
			}
		}
	})
}

func TestBWSBackend(t *testing.T) {
	const org = "f4e44a7f-1190-432a-9d4a-af96013127cb"
	bwsConfig := func(backend string) string {
		return strings.Replace(good, "backend: {type: file, file: {path: /etc/s.yaml}}", backend, 1)
	}
	minimal := bwsConfig("backend:\n  type: bws\n  bws: {organization_id: " + org + ", access_token_file: /etc/avp/bws-token}")

	t.Run("defaults", func(t *testing.T) {
		cfg, err := Parse("bindings.yaml", []byte(minimal))
		if err != nil {
			t.Fatal(err)
		}
		want := BWSBackend{
			OrganizationID: org, AccessTokenFile: "/etc/avp/bws-token",
			APIURL: "https://api.bitwarden.com", IdentityURL: "https://identity.bitwarden.com", Timeout: 10 * time.Second,
		}
		if cfg.Backend.Type != "bws" || cfg.Backend.BWS != want {
			t.Fatalf("backend = %+v, want %+v", cfg.Backend, want)
		}
		if cfg.Cache.SyncInterval != 30*time.Second || cfg.Cache.MaxEntries != 1024 {
			t.Fatalf("cache defaults = %+v", cfg.Cache)
		}
	})

	t.Run("every_field", func(t *testing.T) {
		src := bwsConfig(`backend:
  type: bws
  bws:
    organization_id: ` + org + `
    access_token_file: /etc/avp/bws-token
    api_url: https://api.bitwarden.eu/
    identity_url: http://127.0.0.1:8080/identity
    state_file: /var/lib/avp/bws-state
    timeout: 3s
cache: {ttl: 2m, sync_interval: 5s, max_entries: 10}`)
		cfg, err := Parse("bindings.yaml", []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		b := cfg.Backend.BWS
		if b.APIURL != "https://api.bitwarden.eu" || b.IdentityURL != "http://127.0.0.1:8080/identity" || b.StateFile != "/var/lib/avp/bws-state" || b.Timeout != 3*time.Second {
			t.Fatalf("bws = %+v", b)
		}
		if cfg.Cache != (Cache{TTL: 2 * time.Minute, SyncInterval: 5 * time.Second, MaxEntries: 10}) {
			t.Fatalf("cache = %+v", cfg.Cache)
		}
	})

	bad := []struct {
		name, src, want string
	}{
		{"bws without section", bwsConfig("backend: {type: bws}"), `bindings.yaml:2:10: backend type bws needs "bws: {organization_id: <UUID>, access_token_file: /etc/agent-vault-proxy/bws-token}"`},
		{"missing organization", bwsConfig("backend: {type: bws, bws: {access_token_file: /t}}"), `bindings.yaml:2:27: backend.bws.organization_id is missing`},
		{"missing token file", bwsConfig("backend: {type: bws, bws: {organization_id: " + org + "}}"), `backend.bws.access_token_file is missing; add "access_token_file: /etc/agent-vault-proxy/bws-token"`},
		{"organization not a uuid", strings.Replace(minimal, org, "my-org", 1), `bindings.yaml:4:26: backend.bws.organization_id "my-org" is not a UUID`},
		{"relative token file", strings.Replace(minimal, "/etc/avp/bws-token", "bws-token", 1), `backend.bws.access_token_file must be an absolute path, got "bws-token"`},
		{"unknown bws key", strings.Replace(minimal, "access_token_file", "token_file", 1), `unknown key "token_file" in backend.bws; allowed keys are access_token_file, api_url, identity_url, organization_id, state_file, timeout`},
		{"http to a remote host", strings.Replace(minimal, "}", ", api_url: \"http://bws.example.com\"}", 1), `backend.bws.api_url "http://bws.example.com" uses http: the access token would cross the network in clear; use https`},
		{"not a url", strings.Replace(minimal, "}", ", identity_url: identity.bitwarden.com}", 1), `backend.bws.identity_url "identity.bitwarden.com" is not an https URL; write for example "https://identity.bitwarden.com"`},
		{"url with credentials", strings.Replace(minimal, "}", ", api_url: \"https://u:p@bws.example.com\"}", 1), `must not carry credentials, a query or a fragment`},
		{"timeout too short", strings.Replace(minimal, "}", ", timeout: 1ms}", 1), `backend.bws.timeout "1ms" is not a duration between 100ms and 5m`},
		{"state file is the token", strings.Replace(minimal, "}", ", state_file: /etc/avp/bws-token}", 1), `backend.bws.state_file must not be the access token file`},
		{"bws section with type file", bwsConfig("backend: {type: file, file: {path: /s}, bws: {organization_id: " + org + ", access_token_file: /t}}"), `backend.bws is only used with "type: bws"`},
		{"unknown type", bwsConfig("backend: {type: vault}"), `unknown backend type "vault"; write "file" or "bws"`},
		{"sync interval too short", minimal + "cache: {sync_interval: 10ms}\n", `cache.sync_interval "10ms" is not a duration between 1s and 24h`},
		{"max entries zero", minimal + "cache: {max_entries: 0}\n", `cache.max_entries "0" is not a number between 1 and 1000000`},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("bindings.yaml", []byte(tc.src))
			if err == nil {
				t.Fatalf("accepted:\n%s", tc.src)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error:\n%v\nwant it to contain:\n%s", err, tc.want)
			}
		})
	}
}

func TestAuditJournalConfig(t *testing.T) {
	cfg, err := Parse("bindings.yaml", []byte(good+"audit: {socket: /run/avp-journal/journal.sock, timeout: 500ms}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Audit.Socket != "/run/avp-journal/journal.sock" || cfg.Audit.Timeout != 500*time.Millisecond || cfg.Audit.AckTimeout() != 500*time.Millisecond || cfg.Audit.Path != "" {
		t.Fatalf("audit %+v", cfg.Audit)
	}
	cfg, err = Parse("bindings.yaml", []byte(good+"audit: {socket: /run/j.sock}\n"))
	if err != nil || cfg.Audit.AckTimeout() != DefaultAuditTimeout || DefaultAuditTimeout != 2*time.Second {
		t.Fatalf("default timeout: %v %v", cfg.Audit.AckTimeout(), err)
	}
	cfg, err = Parse("bindings.yaml", []byte(good))
	if err != nil || cfg.Audit.Socket != "" || cfg.Audit.Path != DefaultAuditLog {
		t.Fatalf("without audit: section the in-process log is used: %+v %v", cfg.Audit, err)
	}
	bad := []struct{ name, audit, want string }{
		{"relative socket", "audit: {socket: j.sock}\n", `bindings.yaml:11:17: audit.socket must be the absolute path of the journal's socket`},
		{"bad timeout", "audit: {socket: /j.sock, timeout: soon}\n", `bindings.yaml:11:35: audit.timeout "soon" is not a duration between 10ms and 1m; write for example "timeout: 2s"`},
		{"zero timeout", "audit: {socket: /j.sock, timeout: 0s}\n", `audit.timeout "0s" is not a duration`},
		{"huge timeout", "audit: {socket: /j.sock, timeout: 2h}\n", `audit.timeout "2h" is not a duration`},
		{"path and socket", "audit: {path: /var/log/a.jsonl, socket: /j.sock}\n", `bindings.yaml:11:15: audit.path and audit.socket exclude each other`},
		{"timeout without socket", "audit: {timeout: 2s}\n", `bindings.yaml:11:8: audit.timeout applies only to the journal`},
		{"unknown audit key", "audit: {sokcet: /j.sock}\n", `bindings.yaml:11:9: unknown key "sokcet" in audit; allowed keys are path, socket, timeout`},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("bindings.yaml", []byte(good+tc.audit))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error:\n%v\nwant it to contain:\n%s", err, tc.want)
			}
		})
	}
}

// TestDiffAlso: adding a header the secret may be injected into widens access, and the
// change names both shapes.
func TestDiffAlso(t *testing.T) {
	old, err := Parse("bindings.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	nw, err := Parse("bindings.yaml", []byte(strings.Replace(good, `format: "Bearer {secret}"}`, `format: "Bearer {secret}", also: [{header: X-Api-Key}]}`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	changes := Diff(old, nw)
	if len(changes) != 1 || !Widens(changes) {
		t.Fatalf("changes %+v, want one widening change", changes)
	}
	want := `injected as "Bearer {secret}" into Authorization or "{secret}" into X-Api-Key (was "Bearer {secret}" into Authorization)`
	if changes[0].Text != want {
		t.Fatalf("change text %q, want %q", changes[0].Text, want)
	}
}

// Several problems come in the order of the file, whichever check found them first.
func TestProblemsInFileOrder(t *testing.T) {
	src := strings.Replace(strings.Replace(good, "[GET]", "[get]", 1), "api.example.com", "API.example.com", 1) + "extra: 1\n"
	_, err := Parse("bindings.yaml", []byte(src))
	var ce *Error
	if !errors.As(err, &ce) || len(ce.Problems) < 3 {
		t.Fatalf("err %v", err)
	}
	last := 0
	for _, p := range ce.Problems {
		var line int
		fmt.Sscanf(strings.TrimPrefix(p, "bindings.yaml:"), "%d:", &line)
		if line < last {
			t.Fatalf("problems out of order: %q", ce.Problems)
		}
		last = line
	}
}

// TestSyntaxErrorNamesTheMisindentedLine: a key indented one space short was reported at the
// line where its block starts (yaml.v3's context), two lines above the mistake, at column 1,
// with only "fix the YAML syntax".
func TestSyntaxErrorNamesTheMisindentedLine(t *testing.T) {
	for _, tc := range []struct{ name, src, want string }{
		{"list item key one space short", good[:strings.Index(good, "        methods")] + "       methods: [GET]\n        paths: [\"/v1/**\"]\n",
			"f.yaml:9:8: this line's indentation matches no key above it"},
		{"after a multi-line flow mapping", "version: 1\nbackend: {type: file,\n  file: {path: /etc/s.yaml}}\nsecrets:\n  A:\n    placeholder: x\n    bindings:\n      - host: a.example.com\n       methods: [GET]\n",
			"f.yaml:9:8: this line's indentation matches no key above it"},
		{"mapping key one space short", "version: 1\nsecrets:\n  A:\n    placeholder: x\n   bindings: []\n",
			"f.yaml:5:4: this line's indentation matches no key above it"},
		{"unclosed quote", "version: 1\nsecrets: \"x\n", "f.yaml:2:1: found unexpected end of stream; fix the YAML syntax"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.src))
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("got %v\nwant a line starting %q", err, tc.want)
			}
		})
	}
}

// TestLoadErrorNamesTheFileOnce: "read config X: open X: no such file or directory" named
// the file twice and gave no fix; the cause stays wrapped (doctor tells an unreadable file
// from an invalid one by it).
func TestLoadErrorNamesTheFileOnce(t *testing.T) {
	p := t.TempDir() + "/missing.yaml"
	_, err := Load(p)
	if err == nil || strings.Count(err.Error(), p) != 1 || !strings.Contains(err.Error(), "bindings.example.yaml") || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%v", err)
	}
}

// A quote never closed in a secrets file was reported at a line past its end (yaml names
// the line after the last); the line the quote opens on is named.
func TestSecretsSyntaxErrorNamesTheUnclosedQuote(t *testing.T) {
	for _, tc := range []struct {
		data string
		line int
	}{
		{"FOO: \"unterminated\nBAR: ok\nBAZ: ok\n", 1},
		{"FOO: ok\nBAR: 'open\n", 2},
	} {
		err := SecretsSyntaxError("/s.yaml", []byte(tc.data))
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("/s.yaml:%d:", tc.line)) {
			t.Errorf("%q: %v, want line %d", tc.data, err, tc.line)
		}
		if strings.Contains(fmt.Sprint(err), "unterminated") || strings.Contains(fmt.Sprint(err), "open") && strings.Contains(fmt.Sprint(err), "'open") {
			t.Errorf("a value reached the error: %v", err)
		}
	}
}
