// Package redirect owns the kernel side of avpd's interception: one nftables
// table, inet agent_vault_proxy, and nothing else on the host's firewall.
//
// The table holds the set "agents" of enrolled UIDs and two base chains on the
// output hook:
//
//   - nat_output (type nat, priority -100) redirects new TCP connections to
//     port 443 made by sockets owned by an enrolled UID to avpd's local
//     listener. Because the table family is inet, the same rule covers IPv4
//     (redirected to 127.0.0.1) and IPv6 (redirected to ::1).
//   - filter_output (type filter, priority 0, policy accept) rejects UDP to port
//     443 from enrolled UIDs with an ICMP port-unreachable, so HTTP/3 (QUIC)
//     clients fail fast and fall back to TCP, which is redirected. Without it,
//     QUIC traffic would reach the internet unmodified and unobserved.
//
// The ruleset is programmed over netlink with github.com/google/nftables; the
// nft binary is never run. A reference copy of the ruleset, in nft syntax and
// loadable by hand with nft -f, lives in nft/agent-vault-proxy.nft at the root
// of the repository and is checked against the kernel's listing by the tests.
//
// This package is mechanism only. It knows nothing about HTTP, TLS or secrets,
// and it does not decide which UIDs may be enrolled: refusing to enroll avpd's
// own UID (which would make the proxy redirect its own upstream connections
// back to itself) or root is the caller's job.
package redirect

// TableName is the nftables table (family inet) that this package owns. Every
// change it makes is confined to this table, so flushing or deleting it undoes
// avpd's interception without touching any other firewall rule.
const TableName = "agent_vault_proxy"

// SetName is the set, inside TableName, of UIDs whose outbound TCP 443 is
// redirected. Keeping the UIDs in a set rather than in the rules lets avpd
// enroll and unenroll users by changing set elements only, without rewriting
// rules.
const SetName = "agents"

// Names of the two base chains and the comments the kernel stores with each
// object so that "nft list" explains to an operator where they come from.
const (
	natChainName    = "nat_output"
	filterChainName = "filter_output"

	setComment    = "UIDs whose outbound HTTPS avpd intercepts"
	natComment    = "avpd: send enrolled UIDs' HTTPS (TCP 443) to the local proxy"
	filterComment = "avpd: block enrolled UIDs' QUIC (UDP 443) so clients use TCP"
	bypassComment = "avpd: refuse enrolled UIDs' TCP 443 that missed the redirect"
)
