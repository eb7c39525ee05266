package template

import "testing"

// BenchmarkRender measures what an injected request with a template pays per request: the
// Basic-auth composition that Jira-style APIs need, and an HMAC signature.
func BenchmarkRender(b *testing.B) {
	for _, bc := range []struct{ name, src string }{
		{"basic", `Basic {{ (JIRA_EMAIL + ":" + JIRA_TOKEN) | b64encode }}`},
		{"hmac", `{{ hmac_sha256(JIRA_TOKEN, JIRA_EMAIL) }}`},
	} {
		b.Run(bc.name, func(b *testing.B) {
			tm, err := Parse(bc.src, compose)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				out, err := tm.Render(vals)
				if err != nil {
					b.Fatal(err)
				}
				wipe(out)
			}
		})
	}
}
