# agent-vault-proxy. `make build` writes bin/avpd and bin/avpctl; `make test` runs every test
# (root-only tests run when root or in CI); `sudo make demo` shows the main job end to end.
GO      ?= go
PREFIX  ?= /usr/local
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/agent-vault-proxy/agent-vault-proxy/internal/daemon.Version=$(VERSION)
FUZZTIME ?= 10s

.PHONY: all build test unit fuzz e2e demo vet fmt clean bench bench-deps

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

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzNormalizePath$$' -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz '^FuzzParseClientHello$$' -fuzztime $(FUZZTIME) ./internal/intercept/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./internal/config/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./internal/template/

e2e:
	$(GO) test -count=1 -v -timeout 20m ./test/e2e/

demo: build
	bash scripts/demo.sh

# The side-by-side benchmark (issue 7): direct, avpd, nginx and mitmproxy in a throwaway
# network namespace; about 9 minutes, root, results in bench/results/. Not part of `make test`.
# BENCHFLAGS passes flags to avpbench run, for example BENCHFLAGS='-rounds 1 -scenarios ka32'.
bench: bench-deps
	bash bench/run.sh $(BENCHFLAGS)

# What `make bench` needs from Debian (nginx, mitmproxy, h2load, gnuplot); installs only what is missing.
bench-deps:
	bash bench/deps.sh

# Acknowledged events/s through the audit journal on the real disk, 1/16/64 writers, group
# commit against fsync per event in the same run, and the ratio.
.PHONY: bench-journal
bench-journal:
	bash scripts/bench-journal.sh

clean:
	rm -rf bin
