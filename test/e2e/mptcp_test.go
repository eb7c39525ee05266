package e2e

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestMPTCPAgentIsServed: an agent whose client opens MPTCP sockets (IPPROTO_MPTCP, as curl
// --mptcp from 8.0, Go with Dialer.SetMultipathTCP or GODEBUG=multipathtcp=1, and any
// program asking for it) is redirected like any other and must be served. avpd's listener is
// MPTCP by Go's default (Go 1.24+: ListenConfig uses MPTCP where the kernel has it), so the
// accepted socket is an MPTCP socket, on which getsockopt(SO_ORIGINAL_DST) fails with
// EOPNOTSUPP: every such connection is closed before its ClientHello is read.
func TestMPTCPAgentIsServed(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	for _, tc := range []struct{ name, fam, addr, host string }{
		{"v4", "AF_INET", "127.0.0.2", hostOpenAI},
		{"v6", "AF_INET6", "::1", hostV6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			script := filepath.Join(e.dir, "mp"+tc.name+".py")
			writeFile(t, script, []byte(fmt.Sprintf(`import socket, ssl
ctx = ssl.create_default_context()
s = socket.socket(socket.%s, socket.SOCK_STREAM, 262)  # IPPROTO_MPTCP
s.settimeout(10)
s.connect((%q, 443))
t = ctx.wrap_socket(s, server_hostname=%q)
t.sendall(b"GET /v1/mptcp HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n")
print(t.recv(4096).decode("latin-1").split("\r\n")[0])
`, tc.fam, tc.addr, tc.host, tc.host, phOpenAI)), 0o644)
			before := len(e.upstream.requests())
			out, err := e.agent(agentUID, "python3", script)
			if err != nil || !strings.HasPrefix(out, "HTTP/1.1 200") {
				t.Fatalf("MPTCP agent through avpd: %q %v\navpd log:\n%s", out, err, e.avpdLog.String())
			}
			reqs := e.upstream.requests()[before:]
			if len(reqs) != 1 || reqs[0].Header.Get("Authorization") != "Bearer "+realOpenAI {
				t.Fatalf("upstream got %+v", reqs)
			}
		})
	}
}
