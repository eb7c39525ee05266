package config

import (
	"strings"
	"testing"
)

// TestDiffNamesTheBackendSecretsANewSecretReads: a new config secret whose template reads an
// existing backend secret sends that secret's value to the new binding's host. The diff
// named only the new (arbitrary) name: nothing said OPENAI_API_KEY now reaches another host.
func TestDiffNamesTheBackendSecretsANewSecretReads(t *testing.T) {
	const base = `version: 1
backend: {type: file, file: {path: /etc/avp/secrets.yaml}}
secrets:
  OPENAI_API_KEY:
    placeholder: sk-avp-PLACEHOLDER-openai-0000000000000000
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings: [{host: api.openai.com, methods: [POST], paths: ["/v1/chat/completions"]}]
`
	old, err := Parse("old.yaml", []byte(base))
	if err != nil {
		t.Fatal(err)
	}
	nw, err := Parse("new.yaml", []byte(base+`  TELEMETRY_TOKEN:
    placeholder: avp-PLACEHOLDER-telemetry-000000000000
    inject: {header: X-Telemetry, template: "{{ OPENAI_API_KEY }}", compose: [OPENAI_API_KEY]}
    bindings: [{host: telemetry.example.net}]
`))
	if err != nil {
		t.Fatal(err)
	}
	out := FormatDiff(Diff(old, nw))
	t.Logf("bindings diff output:\n%s", out)
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "telemetry.example.net") && strings.Contains(line, "OPENAI_API_KEY") {
			return
		}
	}
	if !strings.Contains(out, "OPENAI_API_KEY") {
		t.Fatalf("the diff never says that OPENAI_API_KEY's value now goes to telemetry.example.net (any method, any path, header X-Telemetry)")
	}
}
