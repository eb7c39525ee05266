package config

import (
	"os"
	"strings"
	"testing"
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
		{"trailing dot", strings.Replace(good, "api.example.com", "api.example.com.", 1), `remove the trailing dot`},
		{"ip literal", strings.Replace(good, "api.example.com", "10.0.0.1", 1), `IP literals never get injection`},
		{"format without secret", strings.Replace(good, `"Bearer {secret}"`, `"Bearer"`, 1), `must contain {secret} exactly once`},
		{"bad version", strings.Replace(good, "version: 1", "version: 2", 1), `bindings.yaml:1:10: unsupported version "2"`},
		{"missing backend", strings.Replace(good, "backend: {type: file, file: {path: /etc/s.yaml}}\n", "", 1), `missing backend: section`},
		{"relative secrets path", strings.Replace(good, "/etc/s.yaml", "s.yaml", 1), `backend.file.path must be an absolute path`},
		{"hop-by-hop header", strings.Replace(good, "header: Authorization", "header: Connection", 1), `is a hop-by-hop or framing header`},
		{"yaml syntax", "version: 1\nsecrets: [\n", `bindings.yaml:2:1: did not find expected node content; fix the YAML syntax`},
		{"placeholder substring", good + `  B:
    placeholder: sk-avp-PLACEHOLDER-aaaaaaaaaaaaaa-longer
    bindings: [{host: b.example.com}]
`, `placeholders of secrets A and B are equal or one contains the other`},
		{"listen on 443", good + "proxy: {listen: \"127.0.0.1:443\"}\n", `proxy.listen "127.0.0.1:443" must be an IPv4 loopback address`},
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

func TestGoodConfigDefaults(t *testing.T) {
	cfg, err := Parse("bindings.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Proxy.Listen.String() != DefaultListen || cfg.Cache.TTL != DefaultCacheTTL || cfg.Audit.Path != DefaultAuditLog {
		t.Fatalf("defaults: %+v", cfg)
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
