package redirect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// errClosed is returned by every method called after Close.
var errClosed = errors.New("firewall is closed")

// opTimeout bounds each exchange with the kernel. Replies to nftables
// requests are immediate; the deadline only keeps a lost reply (a library or
// kernel bug) from blocking avpd, which holds the mutex, forever.
const opTimeout = 30 * time.Second

// maxUIDs bounds Install. All elements travel in one netlink batch, which must
// fit in the socket's default send buffer (about 208 KiB; each element costs
// 16 bytes plus per-message overhead).
const maxUIDs = 8192

// elemsPerMessage keeps each element list attribute far below the 64 KiB that
// a netlink attribute length can express; the nftables library does not check
// that limit and would silently produce a corrupt message.
const elemsPerMessage = 1024

// Firewall programs and inspects the table inet agent_vault_proxy through one
// netlink connection. It is safe for concurrent use: a mutex serialises the
// operations, so batches built by different goroutines never interleave.
type Firewall struct {
	port uint16 // listener port the redirect rule targets

	mu     sync.Mutex // guards the fields below and serialises batches on conn
	conn   *nftables.Conn
	nl     *netlink.Conn // conn's underlying socket, kept to set deadlines
	closed bool
	// broken is set when the connection may hold queued commands or unread
	// replies that would corrupt the next exchange; the Firewall then refuses
	// further work and the caller must create a new one.
	broken error
}

// New returns a Firewall whose redirect rule sends enrolled UIDs' TCP 443 to
// port on the loopback address (127.0.0.1 for IPv4, ::1 for IPv6).
//
// New opens a lasting netlink socket. A socket belongs to the network
// namespace it was created in, so every later operation, from any goroutine,
// acts on the namespace of the OS thread that called New. Binding it once,
// rather than entering a namespace by file descriptor for each operation, means
// avpd needs only CAP_NET_ADMIN and not the CAP_SYS_ADMIN that setns requires.
// New itself changes nothing in the kernel.
func New(port uint16) (*Firewall, error) {
	if port == 0 {
		return nil, errors.New("new nftables firewall: listener port must not be 0")
	}
	f := &Firewall{port: port}
	keep := func(c *netlink.Conn) error {
		f.nl = c
		return nil
	}
	conn, err := nftables.New(nftables.AsLasting(), nftables.WithSockOptions(keep))
	if err != nil {
		return nil, fmt.Errorf("new nftables firewall: open netlink connection: %w", err)
	}
	if f.nl == nil {
		_ = conn.CloseLasting()
		return nil, errors.New("new nftables firewall: netlink connection was not opened")
	}
	f.conn = conn
	return f, nil
}

// begin checks that the Firewall can be used and arms the deadline for one
// operation. It must be called with f.mu held.
func (f *Firewall) begin() error {
	if f.closed {
		return errClosed
	}
	if f.broken != nil {
		return fmt.Errorf("netlink connection unusable after an earlier failure, create a new Firewall: %w", f.broken)
	}
	if err := f.nl.SetDeadline(time.Now().Add(opTimeout)); err != nil {
		return fmt.Errorf("set netlink deadline: %w", err)
	}
	return nil
}

// end inspects the result of an operation: a timeout leaves replies unread on
// the socket, which would be mistaken for the answers to the next request.
func (f *Firewall) end(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		f.broken = err
	}
	return err
}

// poison records that commands were queued on the connection for a batch that
// could not be completed. The library has no way to discard them, and sending
// them would apply half a change (for Install, deleting the table), so the
// Firewall stops using the connection instead.
func (f *Firewall) poison(err error) error {
	f.broken = err
	return err
}

// table returns a fresh description of the owned table. Fresh values are used
// for every batch because the nftables library stores state (set IDs) in them.
func table() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

// agentsSet describes the set of enrolled UIDs. The uid datatype is in host
// byte order, so elements are encoded with binary.NativeEndian; that is also
// what "meta skuid" loads into the register the lookup compares.
func agentsSet(t *nftables.Table) *nftables.Set {
	return &nftables.Set{
		Table:        t,
		Name:         SetName,
		KeyType:      nftables.TypeUID,
		KeyByteOrder: binaryutil.NativeEndian,
		Comment:      setComment,
	}
}

// uidElements encodes uids as set elements, dropping duplicates.
func uidElements(uids []uint32) []nftables.SetElement {
	sorted := slices.Clone(uids)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	elems := make([]nftables.SetElement, 0, len(sorted))
	for _, uid := range sorted {
		elems = append(elems, uidElement(uid))
	}
	return elems
}

func uidElement(uid uint32) nftables.SetElement {
	return nftables.SetElement{Key: binary.NativeEndian.AppendUint32(nil, uid)}
}

var acceptPolicy = nftables.ChainPolicyAccept

// natChain hooks output before routing is finalised (priority -100, the
// dstnat priority) so the redirect rewrites the destination of the first
// packet of each connection; conntrack applies it to the rest.
func natChain(t *nftables.Table) *nftables.Chain {
	return &nftables.Chain{
		Name:     natChainName,
		Table:    t,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookOutput,
		Priority: nftables.ChainPriorityNATDest,
		Policy:   &acceptPolicy,
	}
}

// filterChain hooks output at the standard filter priority. Its policy is
// accept: it only rejects QUIC from enrolled UIDs and must not affect anyone
// else's traffic.
func filterChain(t *nftables.Table) *nftables.Chain {
	return &nftables.Chain{
		Name:     filterChainName,
		Table:    t,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  nftables.ChainHookOutput,
		Priority: nftables.ChainPriorityFilter,
		Policy:   &acceptPolicy,
	}
}

// matchAgentsDport443 is "meta skuid @agents <proto> dport 443". The
// explicit "meta l4proto" match is what nft itself generates in the inet
// family (where the network header differs between IPv4 and IPv6) before a
// transport header load, and it lets nft print the rule as "tcp dport 443".
func matchAgentsDport443(set *nftables.Set, proto byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{
			DestRegister: 1,
			Base:         expr.PayloadBaseTransportHeader,
			Offset:       2, // destination port, same offset in TCP and UDP
			Len:          2,
		},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(443)},
	}
}

// natRule is "meta skuid @agents tcp dport 443 redirect to :PORT".
func (f *Firewall) natRule(c *nftables.Chain, set *nftables.Set) *nftables.Rule {
	exprs := append(matchAgentsDport443(set, unix.IPPROTO_TCP),
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(f.port)},
		&expr.Redir{RegisterProtoMin: 1},
	)
	return &nftables.Rule{
		Table:    c.Table,
		Chain:    c,
		Exprs:    exprs,
		UserData: userdata.AppendString(nil, userdata.TypeComment, natComment),
	}
}

// filterRule is "meta skuid @agents udp dport 443 reject". In the inet
// family only the icmpx reject type is valid for both IPv4 and IPv6; port
// unreachable is what nft's plain "reject" means there. The sender's send
// fails at once with EPERM (the datagram is dropped in the output path) and
// the ICMP error then surfaces on a connected socket as ECONNREFUSED, so a
// QUIC client gives up on UDP immediately instead of waiting for a timeout.
func filterRule(c *nftables.Chain, set *nftables.Set) *nftables.Rule {
	exprs := append(matchAgentsDport443(set, unix.IPPROTO_UDP),
		&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH},
	)
	return &nftables.Rule{
		Table:    c.Table,
		Chain:    c,
		Exprs:    exprs,
		UserData: userdata.AppendString(nil, userdata.TypeComment, filterComment),
	}
}

// bypassRule is "meta skuid @agents tcp dport 443 reject". The filter hook runs after the
// nat hook, so a redirected connection's packets already carry the listener's port here;
// one that still goes to port 443 missed the redirect. That happens when a new connection
// reuses a conntrack entry (TCP TIME_WAIT reuse on loopback was seen to do it under load),
// since NAT rules only see the first packet of a new entry. Refusing it keeps I12: an
// enrolled UID reaches port 443 only through avpd, or not at all.
func bypassRule(c *nftables.Chain, set *nftables.Set) *nftables.Rule {
	exprs := append(matchAgentsDport443(set, unix.IPPROTO_TCP),
		&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH},
	)
	return &nftables.Rule{
		Table:    c.Table,
		Chain:    c,
		Exprs:    exprs,
		UserData: userdata.AppendString(nil, userdata.TypeComment, bypassComment),
	}
}

// Install (re)creates the whole table with uids as the enrolled set, in one
// atomic netlink batch: either everything below is in place afterwards or the
// kernel is unchanged. Whatever the table held before (from an earlier run of
// avpd, a half-finished manual edit, or a different listener port) is
// replaced, so Install is the way to start from a known state and running it
// again never duplicates anything.
//
// Replacing the table does not break established connections: their NAT
// binding lives in conntrack, not in the rules.
func (f *Firewall) Install(uids []uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.install(uids); err != nil {
		return fmt.Errorf("install nftables table inet %s: %w", TableName, err)
	}
	return nil
}

func (f *Firewall) install(uids []uint32) error {
	elems := uidElements(uids)
	if len(elems) > maxUIDs {
		return fmt.Errorf("%d uids exceed the limit of %d", len(elems), maxUIDs)
	}
	if err := f.begin(); err != nil {
		return err
	}
	t := table()
	// "Add" of an existing table is a no-op, so adding before deleting makes
	// the delete valid whether or not the table exists; the kernel applies the
	// batch as one transaction, so no packet sees the table missing.
	f.conn.AddTable(t)
	f.conn.DelTable(t)
	f.conn.AddTable(t)

	set := agentsSet(t)
	// Set IDs only need to be unique within a batch; setting one here keeps
	// the library from touching its unsynchronised global ID counter.
	set.ID = 1
	if err := f.conn.AddSet(set, nil); err != nil {
		return f.poison(fmt.Errorf("add set %s: %w", SetName, err))
	}
	for chunk := range slices.Chunk(elems, elemsPerMessage) {
		if err := f.conn.SetAddElements(set, chunk); err != nil {
			return f.poison(fmt.Errorf("add elements to set %s: %w", SetName, err))
		}
	}
	nat := f.conn.AddChain(natChain(t))
	filter := f.conn.AddChain(filterChain(t))
	f.conn.AddRule(f.natRule(nat, set))
	f.conn.AddRule(bypassRule(filter, set))
	f.conn.AddRule(filterRule(filter, set))
	return f.end(f.conn.Flush())
}

// Enroll adds uid to the set, so its new TCP 443 connections are redirected
// from now on. Enrolling a UID that is already enrolled is not an error.
// Existing connections are not affected.
func (f *Firewall) Enroll(uid uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enroll(uid); err != nil {
		return fmt.Errorf("enroll uid %d in nftables set inet %s %s: %w", uid, TableName, SetName, err)
	}
	return nil
}

func (f *Firewall) enroll(uid uint32) error {
	if err := f.begin(); err != nil {
		return err
	}
	// Without NLM_F_EXCL, which the library does not set, adding an element
	// that is already present succeeds.
	if err := f.conn.SetAddElements(agentsSet(table()), []nftables.SetElement{uidElement(uid)}); err != nil {
		return f.poison(err)
	}
	return f.end(f.conn.Flush())
}

// Unenroll removes uid from the set. Removing a UID that is not enrolled is
// not an error. Connections already redirected stay redirected until they
// close.
func (f *Firewall) Unenroll(uid uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.unenroll(uid); err != nil {
		return fmt.Errorf("unenroll uid %d from nftables set inet %s %s: %w", uid, TableName, SetName, err)
	}
	return nil
}

func (f *Firewall) unenroll(uid uint32) error {
	if err := f.begin(); err != nil {
		return err
	}
	// Deleting an absent element fails with ENOENT. Adding it first in the
	// same transaction makes the delete always valid, with no window in which
	// the kernel sees it added, and works on kernels without "destroy".
	set := agentsSet(table())
	elem := []nftables.SetElement{uidElement(uid)}
	if err := f.conn.SetAddElements(set, elem); err != nil {
		return f.poison(err)
	}
	if err := f.conn.SetDeleteElements(set, elem); err != nil {
		return f.poison(err)
	}
	return f.end(f.conn.Flush())
}

// Enrolled reads the set back from the kernel and returns its UIDs in
// ascending order. It reports what the kernel enforces, which may differ from
// what avpd believes if another tool edited the set.
func (f *Firewall) Enrolled() ([]uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	uids, err := f.enrolled()
	if err != nil {
		return nil, fmt.Errorf("list nftables set inet %s %s: %w", TableName, SetName, err)
	}
	return uids, nil
}

// enrolled lists the set until two listings in a row agree. A listing is a netlink dump in
// several messages, each a new walk of the set resumed by count; when the kernel resizes the
// set's hash table in between (it does so in the background after a large insert), a walk
// can return some elements twice and miss others, which would look like another tool's edit.
func (f *Firewall) enrolled() ([]uint32, error) {
	return consistentList(f.listEnrolled, listAttempts)
}

const listAttempts = 5

func consistentList(list func() ([]uint32, error), attempts int) ([]uint32, error) {
	prev, err := list()
	if err != nil {
		return nil, err
	}
	for range attempts - 1 {
		cur, err := list()
		if err != nil {
			return nil, err
		}
		if slices.Equal(prev, cur) {
			return cur, nil
		}
		prev = cur
	}
	return nil, fmt.Errorf("the set's elements differed in each of %d listings in a row", attempts)
}

func (f *Firewall) listEnrolled() ([]uint32, error) {
	if err := f.begin(); err != nil {
		return nil, err
	}
	elems, err := f.conn.GetSetElements(agentsSet(table()))
	if err != nil {
		return nil, f.end(err)
	}
	uids := make([]uint32, 0, len(elems))
	for _, e := range elems {
		if len(e.Key) != 4 {
			return nil, fmt.Errorf("element key is %d bytes, want 4 for a uid", len(e.Key))
		}
		uids = append(uids, binary.NativeEndian.Uint32(e.Key))
	}
	slices.Sort(uids)
	return uids, nil
}

// Healthy reports whether the table, the set and both chains exist with the
// expected types and hooks and exactly one rule each. It returns false, with
// a nil error, when something is missing, as happens after another tool runs
// "nft flush ruleset"; the caller can then Install again. An error means the
// kernel could not be asked.
func (f *Firewall) Healthy() (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ok, err := f.healthy()
	if err != nil {
		return false, fmt.Errorf("check nftables table inet %s: %w", TableName, err)
	}
	return ok, nil
}

func (f *Firewall) healthy() (bool, error) {
	if err := f.begin(); err != nil {
		return false, err
	}
	present, err := f.tablePresent()
	if err != nil || !present {
		return false, f.end(err)
	}
	ok, err := f.contentsHealthy()
	if err != nil {
		if f.end(err) != nil && f.broken != nil {
			return false, err
		}
		// The table can vanish between the queries above; the library does
		// not preserve ENOENT through its wrapping, so look again to tell
		// "gone" from a real failure.
		if present, perr := f.tablePresent(); perr == nil && !present {
			return false, nil
		}
		return false, err
	}
	return ok, nil
}

func (f *Firewall) tablePresent() (bool, error) {
	// A dump, unlike a lookup by name, answers "not there" with an empty list
	// rather than an error.
	tables, err := f.conn.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, err
	}
	for _, t := range tables {
		if t.Name == TableName {
			return true, nil
		}
	}
	return false, nil
}

func (f *Firewall) contentsHealthy() (bool, error) {
	t := table()
	sets, err := f.conn.GetSets(t)
	if err != nil {
		return false, err
	}
	setOK := false
	for _, s := range sets {
		if s.Name == SetName && s.KeyType.Name == nftables.TypeUID.Name && !s.IsMap {
			setOK = true
		}
	}
	if !setOK {
		return false, nil
	}

	chains, err := f.conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, err
	}
	// The rules are compared expression by expression with what Install writes: counting
	// them missed another tool's edit that kept the count (a redirect replaced by a rule
	// that does nothing).
	set := &nftables.Set{Table: t, Name: SetName}
	nc, fc := natChain(t), filterChain(t)
	wantRules := map[string][]*nftables.Rule{
		natChainName:    {f.natRule(nc, set)},
		filterChainName: {bypassRule(fc, set), filterRule(fc, set)}, // as install adds them
	}
	for _, want := range []*nftables.Chain{nc, fc} {
		var got *nftables.Chain
		for _, c := range chains {
			if c.Table != nil && c.Table.Name == TableName && c.Name == want.Name {
				got = c
			}
		}
		if got == nil || got.Type != want.Type ||
			got.Hooknum == nil || *got.Hooknum != *want.Hooknum ||
			got.Priority == nil || *got.Priority != *want.Priority {
			return false, nil
		}
		rules, err := f.conn.GetRules(t, want)
		if err != nil {
			return false, err
		}
		if !sameRules(rules, wantRules[want.Name]) {
			return false, nil
		}
	}
	return true, nil
}

// sameRules reports whether got (as the kernel lists a chain) holds exactly the rules of
// want, in order: the same expressions, as netlink encodes them. A set lookup is compared
// by the set's name (its ID is only a handle within the batch that made it).
func sameRules(got, want []*nftables.Rule) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if len(got[i].Exprs) != len(want[i].Exprs) {
			return false
		}
		for j := range got[i].Exprs {
			a, errA := marshalExpr(got[i].Exprs[j])
			b, errB := marshalExpr(want[i].Exprs[j])
			if errA != nil || errB != nil || !bytes.Equal(a, b) {
				return false
			}
		}
	}
	return true
}

func marshalExpr(e expr.Any) ([]byte, error) {
	switch x := e.(type) {
	case *expr.Lookup:
		c := *x
		c.SetID = 0
		e = &c
	case *expr.Redir:
		// The kernel lists a redirect to one port as the range [port, port], flagged as
		// specified.
		c := *x
		if c.RegisterProtoMin != 0 {
			if c.RegisterProtoMax == 0 {
				c.RegisterProtoMax = c.RegisterProtoMin
			}
			c.Flags |= unix.NF_NAT_RANGE_PROTO_SPECIFIED
		}
		e = &c
	}
	return expr.Marshal(byte(nftables.TableFamilyINet), e)
}

// Remove deletes the table, ending all redirection. It is not an error if the
// table does not exist. Connections already redirected keep their conntrack
// NAT binding until they close.
func (f *Firewall) Remove() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.remove(); err != nil {
		return fmt.Errorf("remove nftables table inet %s: %w", TableName, err)
	}
	return nil
}

func (f *Firewall) remove() error {
	if err := f.begin(); err != nil {
		return err
	}
	// As in Install: adding first makes the delete valid if the table is
	// absent, and the pair is one transaction.
	t := table()
	f.conn.AddTable(t)
	f.conn.DelTable(t)
	return f.end(f.conn.Flush())
}

// Close releases the netlink socket. It does not remove the table: avpd
// leaves interception in place across restarts (call Remove to end it).
// Calling Close more than once is not an error.
func (f *Firewall) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	if err := f.conn.CloseLasting(); err != nil {
		return fmt.Errorf("close nftables netlink connection: %w", err)
	}
	return nil
}
