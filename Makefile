# agent-vault-proxy. `make build` writes bin/avpd and bin/avpctl; `make test` runs every test
# (root-only tests run when root or in CI); `sudo make demo` shows the main job end to end.
# sudo resets PATH (secure_path), so fall back to the usual Go install location.
GO      ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
PREFIX  ?= /usr/local
# make install / uninstall: every path below is under $(DESTDIR). The config stays in /etc
# (avpd's default --config) whatever PREFIX is; /usr/local/lib/systemd, sysusers.d and
# tmpfiles.d are on systemd's search paths, so the default PREFIX needs nothing more.
BINDIR      ?= $(PREFIX)/bin
LIBDIR      ?= $(PREFIX)/lib
UNITDIR     ?= $(LIBDIR)/systemd/system
SYSUSERSDIR ?= $(LIBDIR)/sysusers.d
TMPFILESDIR ?= $(LIBDIR)/tmpfiles.d
DOCDIR      ?= $(PREFIX)/share/doc/agent-vault-proxy
SYSCONFDIR  ?= /etc
CONFDIR     := $(SYSCONFDIR)/agent-vault-proxy
UNITS       := avpd.socket avpd.service avp-journal.socket avp-journal.service
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/agent-vault-proxy/agent-vault-proxy/internal/daemon.Version=$(VERSION)

.PHONY: all build test unit fuzz e2e demo vet fmt clean bench bench-deps install uninstall

all: build

# avpd links the Bitwarden SDK (a Rust static library) through cgo: it needs a C compiler and
# links dynamically against libc, libm and libgcc_s. avpctl and the demo upstream stay static.
build:
	@command -v $${CC:-gcc} >/dev/null || { echo "make build: avpd needs a C compiler for cgo (the Bitwarden SDK); on Debian: apt-get install gcc libc6-dev"; exit 1; }
	CGO_ENABLED=1 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/avpd ./cmd/avpd
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/avpctl ./cmd/avpctl
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/avp-demo-upstream ./tools/demo-upstream

vet:
	@test -z "$$(gofmt -l cmd internal test tools)" || { gofmt -l cmd internal test tools; echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

# Everything: unit tests, root-only namespace tests, end-to-end tests and short fuzz runs.
test: vet
	$(GO) test -count=1 -timeout 20m ./...
	$(MAKE) fuzz

# Fixed execution counts, not durations: a time budget on a loaded 2-core machine has failed
# with a bare "context deadline exceeded" (go.dev/issue/75804), and counts make CI repeatable.
FUZZ_FAST ?= 200000x
FUZZ_SLOW ?= 30000x
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzNormalizePath$$' -fuzztime $(FUZZ_FAST) ./internal/inject/
	$(GO) test -run '^$$' -fuzz '^FuzzParseClientHello$$' -fuzztime $(FUZZ_FAST) ./internal/intercept/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZ_SLOW) ./internal/config/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZ_FAST) ./internal/template/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeFast$$' -fuzztime $(FUZZ_FAST) ./internal/audit/
	$(GO) test -run '^$$' -fuzz '^FuzzAppendEvent$$' -fuzztime $(FUZZ_FAST) ./internal/audit/
	$(GO) test -run '^$$' -fuzz '^FuzzBodyScannerForm$$' -fuzztime $(FUZZ_FAST) ./internal/inject/
	$(GO) test -run '^$$' -fuzz '^FuzzBodyScannerJSON$$' -fuzztime $(FUZZ_FAST) ./internal/inject/

e2e:
	$(GO) test -count=1 -v -timeout 20m ./test/e2e/

demo: build
	bash scripts/demo.sh

# The side-by-side benchmark (issue 7): direct, avpd, nginx and mitmproxy in a throwaway
# network namespace; about 9 minutes, root, results in bench/results/. Not part of `make test`.
# BENCHFLAGS passes flags to avpbench run, for example BENCHFLAGS='-rounds 1 -scenarios ka32'.
bench: bench-deps
	GO=$(GO) bash bench/run.sh $(BENCHFLAGS)

# What `make bench` needs from Debian (nginx, mitmproxy, h2load, gnuplot); installs only what is missing.
bench-deps:
	bash bench/deps.sh

# Acknowledged events/s through the audit journal on the real disk, 1/16/64 writers, group
# commit against fsync per event in the same run, and the ratio.
.PHONY: bench-journal
bench-journal:
	bash scripts/bench-journal.sh

# Binaries, systemd units (with BINDIR filled in), sysusers.d and tmpfiles.d entries, the
# reference nftables ruleset and the example config. bindings.example.yaml becomes the config
# only when there is none: an operator's bindings.yaml is never overwritten. install uses the
# binaries make build wrote (building them only when bin/ has none), so "sudo make install"
# needs no Go toolchain in root's PATH: run make build first after changing the code.
# BIN is where the binaries are taken from (the e2e test of the units installs the ones it
# built).
BIN ?= bin
install: $(BIN)/avpd $(BIN)/avpctl
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(DOCDIR)
	install -m 0755 $(BIN)/avpd $(BIN)/avpctl $(DESTDIR)$(BINDIR)/
	for u in $(UNITS); do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u.tmp && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.tmp && mv -f $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	install -m 0644 systemd/sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/agent-vault-proxy.conf
	install -m 0644 systemd/tmpfiles.conf $(DESTDIR)$(TMPFILESDIR)/agent-vault-proxy.conf
	install -m 0644 README.md bindings.example.yaml nft/agent-vault-proxy.nft $(DESTDIR)$(DOCDIR)/
	install -d -m 0750 $(DESTDIR)$(CONFDIR)
	@if [ -e $(DESTDIR)$(CONFDIR)/bindings.yaml ]; then \
		echo "keeping the existing $(DESTDIR)$(CONFDIR)/bindings.yaml"; \
	else \
		install -m 0640 bindings.example.yaml $(DESTDIR)$(CONFDIR)/bindings.yaml && \
		echo "installed $(DESTDIR)$(CONFDIR)/bindings.yaml from bindings.example.yaml: edit it"; \
	fi

bin/avpd bin/avpctl &:
	$(MAKE) build

# Removes what install put there. The config is the operator's: bindings.yaml goes only if it
# is still the unedited example, and nothing else in $(CONFDIR) is touched. State (the CA,
# enrollment) and the audit log are left for the operator to archive or delete.
uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,avpd avpctl)
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS))
	rm -f $(DESTDIR)$(SYSUSERSDIR)/agent-vault-proxy.conf $(DESTDIR)$(TMPFILESDIR)/agent-vault-proxy.conf
	rm -f $(addprefix $(DESTDIR)$(DOCDIR)/,README.md bindings.example.yaml agent-vault-proxy.nft)
	@rmdir $(DESTDIR)$(DOCDIR) 2>/dev/null || true
	@if cmp -s bindings.example.yaml $(DESTDIR)$(CONFDIR)/bindings.yaml; then \
		rm -f $(DESTDIR)$(CONFDIR)/bindings.yaml; \
	elif [ -e $(DESTDIR)$(CONFDIR)/bindings.yaml ]; then \
		echo "keeping $(DESTDIR)$(CONFDIR)/bindings.yaml: it was edited"; \
	fi
	@rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null || \
		echo "kept $(DESTDIR)$(CONFDIR): it still holds files of yours (the secrets file or the BWS token hold REAL credentials: delete or archive them)"
	@echo "uninstalled the files. If avpd ran here: its redirect (nft table inet agent_vault_proxy) and its CA in the system trust store stay until removed; README, Uninstalling"

clean:
	rm -rf bin
