package config

import (
	"fmt"
	"slices"
	"sort"
	"strings"
)

// Change is one line of a semantic diff between two configs.
type Change struct {
	Secret string
	// Kind is "+" for access that NEW allows and OLD did not, "-" for access removed, "~"
	// for a change to where or how the secret is injected.
	Kind   string
	Text   string
	Widens []string
	// Remains, for a removed binding, are the new bindings for the same host that still
	// allow part of what it allowed: a narrowing is not a removal.
	Remains []string
}

// Diff compares what two configs allow, per secret: which (uid, host, method, path)
// accesses appear or disappear, and which changes widen access. It reasons on bindings, not
// YAML: reordering or reformatting is no change.
func Diff(old, new *Config) []Change {
	olds, news := bySecret(old), bySecret(new)
	var names []string
	for n := range olds {
		names = append(names, n)
	}
	for n := range news {
		if _, ok := olds[n]; !ok {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var out []Change
	for _, n := range names {
		o, nw := olds[n], news[n]
		switch {
		case o == nil:
			// What it injects, and which backend secrets that reads: a new name can carry
			// an existing secret's value ({{ OPENAI_API_KEY }}) to its new hosts.
			text := "injected as " + shape(nw)
			if fetch := nw.FetchNames(); !slices.Equal(fetch, []string{n}) {
				text += "; it sends the value of backend secret(s) " + strings.Join(fetch, ", ")
			}
			out = append(out, Change{Secret: n, Kind: "+", Text: text})
			for _, b := range nw.Bindings {
				out = append(out, Change{Secret: n, Kind: "+", Text: describe(b), Widens: append([]string{"new secret"}, bindingRisks(b)...)})
			}
			continue
		case nw == nil:
			out = append(out, Change{Secret: n, Kind: "-", Text: "secret removed"})
			continue
		}
		if !slices.Equal(o.Targets(), nw.Targets()) || templateSrc(o) != templateSrc(nw) || !slices.Equal(o.Compose, nw.Compose) {
			out = append(out, Change{Secret: n, Kind: "~", Text: fmt.Sprintf("injected as %s (was %s)", shape(nw), shape(o)),
				Widens: []string{"the secret goes into a different header or shape"}})
		}
		if o.Placeholder != nw.Placeholder {
			out = append(out, Change{Secret: n, Kind: "~", Text: "placeholder changed (agents must be given the new one)"})
		}
		for _, b := range nw.Bindings {
			if !coveredByAny(b, o.Bindings) {
				out = append(out, Change{Secret: n, Kind: "+", Text: describe(b), Widens: widening(b, o.Bindings)})
			}
		}
		for _, b := range o.Bindings {
			if !coveredByAny(b, nw.Bindings) {
				out = append(out, Change{Secret: n, Kind: "-", Text: describe(b), Remains: remains(b, nw.Bindings)})
			}
		}
	}
	return out
}

// Widens reports whether any change widens access.
func Widens(changes []Change) bool {
	for _, c := range changes {
		if len(c.Widens) > 0 {
			return true
		}
	}
	return false
}

// FormatDiff renders changes for a reviewer.
func FormatDiff(changes []Change) string {
	if len(changes) == 0 {
		return "no change in what any secret may reach\n"
	}
	var b strings.Builder
	last := ""
	for _, c := range changes {
		if c.Secret != last {
			fmt.Fprintf(&b, "secret %s:\n", c.Secret)
			last = c.Secret
		}
		fmt.Fprintf(&b, "  %s %s\n", c.Kind, c.Text)
		for _, w := range c.Widens {
			fmt.Fprintf(&b, "      WIDENS: %s\n", w)
		}
		for _, r := range c.Remains {
			fmt.Fprintf(&b, "      still allowed: %s\n", r)
		}
	}
	return b.String()
}

func bySecret(c *Config) map[string]*Secret {
	m := map[string]*Secret{}
	for _, s := range c.Secrets {
		m[s.Name] = s
	}
	return m
}

func templateSrc(s *Secret) string {
	if s.Template == nil {
		return ""
	}
	return s.Template.String()
}

// shape says where and how a secret is injected: each header with its format, and the
// template that computes the value, if any.
func shape(s *Secret) string {
	var into []string
	for _, t := range s.Targets() {
		into = append(into, fmt.Sprintf("%q into %s", t.Format, t.Header))
	}
	out := strings.Join(into, " or ")
	if s.Template != nil {
		out += fmt.Sprintf(" with template %q over %s", s.Template.String(), strings.Join(s.Compose, ", "))
	}
	return out
}

func describe(b Binding) string {
	methods, paths, uids := "any method", "any path", "any uid"
	if b.Methods != nil {
		methods = strings.Join(b.Methods, ",")
	}
	if b.Paths != nil {
		paths = strings.Join(b.Paths, " ")
	}
	if b.UIDs != nil {
		u := make([]string, len(b.UIDs))
		for i, x := range b.UIDs {
			u[i] = fmt.Sprint(x)
		}
		uids = "uid " + strings.Join(u, ",")
	}
	return fmt.Sprintf("host %s  methods %s  paths %s  %s", b.Host, methods, paths, uids)
}

// remains describes the bindings of set for the host (or hosts) a removed binding b was for:
// what is still allowed there.
func remains(b Binding, set []Binding) []string {
	var out []string
	for _, n := range set {
		if hostCovers(b.Host, n.Host) || hostCovers(n.Host, b.Host) {
			out = append(out, describe(n))
		}
	}
	return out
}

// bindingRisks names what makes a binding broad on its own.
func bindingRisks(b Binding) []string {
	var r []string
	if strings.HasPrefix(b.Host, "*.") {
		r = append(r, "wildcard host "+b.Host)
	}
	if b.Methods == nil {
		r = append(r, "any method")
	}
	if b.Paths == nil {
		r = append(r, "any path")
	}
	for _, p := range b.Paths {
		if strings.Contains(p, "**") {
			r = append(r, "path "+p+" matches any depth")
		}
	}
	if b.UIDs == nil {
		r = append(r, "any uid")
	}
	return r
}

// widening explains why a new binding reaches more than the old bindings for the same host.
func widening(b Binding, old []Binding) []string {
	var same []Binding
	for _, o := range old {
		if hostCovers(o.Host, b.Host) {
			same = append(same, o)
		}
	}
	if len(same) == 0 {
		return append([]string{"host " + b.Host + " was not bound"}, bindingRisks(b)...)
	}
	var r []string
	if strings.HasPrefix(b.Host, "*.") && !strings.HasPrefix(same[0].Host, "*.") {
		r = append(r, "wildcard host "+b.Host)
	}
	anyHas := func(f func(Binding) bool) bool {
		for _, o := range same {
			if f(o) {
				return true
			}
		}
		return false
	}
	if b.Methods == nil && !anyHas(func(o Binding) bool { return o.Methods == nil }) {
		r = append(r, "methods removed: any method is now allowed")
	} else {
		for _, m := range b.Methods {
			if !anyHas(func(o Binding) bool { return o.Methods == nil || slices.Contains(o.Methods, m) }) {
				r = append(r, "method "+m+" added")
			}
		}
	}
	if b.Paths == nil && !anyHas(func(o Binding) bool { return o.Paths == nil }) {
		r = append(r, "paths removed: any path is now allowed")
	} else {
		for _, p := range b.Paths {
			if !anyHas(func(o Binding) bool { return o.Paths == nil || globCoveredBy(p, o.Paths) }) {
				if strings.Contains(p, "**") {
					r = append(r, "path "+p+" added (** matches any depth)")
				} else {
					r = append(r, "path "+p+" added")
				}
			}
		}
	}
	if b.UIDs == nil && !anyHas(func(o Binding) bool { return o.UIDs == nil }) {
		r = append(r, "uids removed: any user is now allowed")
	} else {
		for _, u := range b.UIDs {
			if !anyHas(func(o Binding) bool { return o.UIDs == nil || slices.Contains(o.UIDs, u) }) {
				r = append(r, fmt.Sprintf("uid %d added", u))
			}
		}
	}
	if len(r) == 0 {
		r = append(r, "access not covered by any single old binding")
	}
	return r
}

// coveredByAny reports whether one binding of set allows everything b allows. It is
// conservative: when it cannot prove coverage it says no, so a reviewer sees the change.
func coveredByAny(b Binding, set []Binding) bool {
	for _, a := range set {
		if covers(a, b) {
			return true
		}
	}
	return false
}

func covers(a, b Binding) bool {
	if !hostCovers(a.Host, b.Host) {
		return false
	}
	if a.Methods != nil {
		if b.Methods == nil {
			return false
		}
		for _, m := range b.Methods {
			if !slices.Contains(a.Methods, m) {
				return false
			}
		}
	}
	if a.UIDs != nil {
		if b.UIDs == nil {
			return false
		}
		for _, u := range b.UIDs {
			if !slices.Contains(a.UIDs, u) {
				return false
			}
		}
	}
	if a.Paths != nil {
		if b.Paths == nil {
			return false
		}
		for _, p := range b.Paths {
			if !globCoveredBy(p, a.Paths) {
				return false
			}
		}
	}
	return true
}

func hostCovers(a, b string) bool {
	if a == b {
		return true
	}
	if rest, ok := strings.CutPrefix(a, "*."); ok && !strings.HasPrefix(b, "*.") {
		label, parent, found := strings.Cut(b, ".")
		return found && label != "" && parent == rest
	}
	return false
}

func globCoveredBy(p string, globs []string) bool {
	for _, g := range globs {
		if globCovers(g, p) {
			return true
		}
	}
	return false
}

// globCovers reports whether every path matched by glob b is matched by glob a, for the
// forms that occur in practice: equal globs, a trailing "/**" over a prefix, and "*"
// segments over literal or "*" segments.
func globCovers(a, b string) bool {
	if a == b || a == "/**" {
		return true
	}
	as, bs := strings.Split(strings.Trim(a, "/"), "/"), strings.Split(strings.Trim(b, "/"), "/")
	for i, seg := range as {
		if seg == "**" {
			return i == len(as)-1 && len(bs) >= i
		}
		if i >= len(bs) || bs[i] == "**" {
			return false
		}
		if seg == bs[i] {
			continue
		}
		if seg == "*" && !strings.Contains(bs[i], "**") {
			continue
		}
		return false
	}
	return len(as) == len(bs)
}
