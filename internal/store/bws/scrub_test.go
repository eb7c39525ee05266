package bws

import (
	"strings"
	"testing"
)

const testToken = "0.d2c7afaf-ce2f-4f73-93cf-c3f48a0c969d.CvQlqbc9l8eBqbWM_PneUFTSxJhqrw:CAoeeqPtpEFzoyMIZuE5/w=="

const testJWT = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJjbGllbnRfaWQiOiJkMmM3YWZhZi1jZTJmLTRmNzMtOTNjZi1jM2Y0OGEwYzk2OWQifQ.1xkzT_EIUdabc"

// Raw sdk-go errors as the real SDK produced them against the fake (see bwsfake's Fail and
// MalformedEcho faults), and what avpd may say instead.
func TestScrubNeverQuotesTheServer(t *testing.T) {
	tests := []struct {
		raw, want string
		status    int
	}{
		{"API error: Received error message from server: [500 Internal Server Error] internal error while handling request: client_id=d2c7afaf-ce2f-4f73-93cf-c3f48a0c969d&client_secret=CvQlqbc9l8eBqbWM_PneUFTSxJhqrw&grant_type=client_credentials&scope=api.secrets token=" + testToken,
			"BWS answered HTTP 500 Internal Server Error (response body withheld)", 500},
		{"API error: Received error message from server: [200 OK] {\"access_token\":\"" + testJWT + "\",\"scope\":\"api.secrets\"}",
			"BWS answered HTTP 200 with a body the SDK could not read (body withheld)", 0},
		{"API error: Received error message from server: [404 Not Found] {\"message\":\"Resource not found.\"}", "BWS answered HTTP 404 Not Found (response body withheld); not found", 404},
		{"API error: Received error message from server: [401 Unauthorized] ", "BWS answered HTTP 401 Unauthorized (response body withheld); the machine account may have lost access", 401},
		{"API error: Error parsing Identity response: invalid_client", "the identity server refused the login: the access token is wrong, expired or revoked", 0},
		{"API error: Cryptography error, The cipher's MAC doesn't match the expected value", "decryption failed: the access token does not match the organization's key (wrong or revoked token?)", 0},
		{"API error: error sending request for url (https://127.0.0.1:41777/identity/connect/token)", "cannot reach https://127.0.0.1:41777 (connection refused, DNS, TLS or proxy error)", 0},
		{"API error: Access token is not in a valid format: Doesn't contain a decryption key", "the access token is not in the BWS format 0.<id>.<secret>:<key> (doesn't contain a decryption key)", 0},
		{"API error: missing a required field: response.note", "BWS sent a response the SDK could not read (details withheld)", 0},
		{`API error: invalid type: string "sk-live-REALVALUE", expected a sequence`, "BWS sent a response the SDK could not read (details withheld)", 0},
		{"API error: Not authenticated", "BWS SDK error: Not authenticated (details withheld)", 0},
		{"API error: " + testToken, "BWS SDK error (details withheld: they may quote the server's response)", 0},
	}
	red := NewRedactor(testToken)
	for _, tc := range tests {
		got, status := Scrub(tc.raw, red)
		if got != tc.want || status != tc.status {
			t.Errorf("Scrub(%.60q)\n got %q, %d\nwant %q, %d", tc.raw, got, status, tc.want, tc.status)
		}
	}
}

func TestRedactFreeText(t *testing.T) {
	line := "ERROR reqwest: body " + testJWT + " token " + testToken + " key=CAoeeqPtpEFzoyMIZuE5/w== enc 2.AAAAAAAAAAAAAAAAAAAAAA==|BBBB|CCCC"
	for _, r := range []*Redactor{nil, NewRedactor(testToken)} {
		got := r.RedactFreeText(line)
		for _, bad := range []string{"eyJ", "CvQlqbc9l8eBqbWM", "CAoeeqPtpEFzoyMIZuE5", "d2c7afaf-ce2f", "AAAAAAAAAAAA"} {
			if strings.Contains(got, bad) {
				t.Errorf("redactor %v left %q in %q", r != nil, bad, got)
			}
		}
		if !strings.HasPrefix(got, "ERROR reqwest: body ") {
			t.Errorf("ordinary words were removed: %q", got)
		}
	}
}
