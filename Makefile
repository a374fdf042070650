# Outpost. `make run` and `make test` are the two set-up commands; `make help` lists the rest.
.DEFAULT_GOAL := help
SHELL := /bin/bash

GO      ?= go
BIN     := bin/outpost
VERSION := $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
# Test packages run in parallel up to this many at once; the race detector is on.
TESTFLAGS ?= -race -shuffle=on -timeout 25m

.PHONY: help build agent builtins examples run test deps bench lint fuzz install clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: examples agent ## build the agent into bin/outpost, the example and the first-party handlers

agent: ## build the agent alone into bin/outpost
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/outpost

# Each examples/<name>/ and plugins/builtin/<name>/ builds into its build/:
# module.wasm and manifest.yaml, the manifest.yaml.in with the module's
# sha256 filled in.
BUILTINS    := plugins/builtin/firmware plugins/builtin/device
EXAMPLES_GO := examples/handler-go $(BUILTINS)
RUN_PLUGINS := examples/handler-go $(BUILTINS)
EXAMPLES_AS := examples/handler-as
EXAMPLES    := $(EXAMPLES_GO) $(EXAMPLES_AS)
ASC         := abi/guest-as/node_modules/.bin/asc

$(ASC): abi/guest-as/package-lock.json
	npm ci --prefix abi/guest-as --no-audit --no-fund
	@touch $(ASC)

builtins: ## build the first-party handlers alone (plugins/builtin/*/build), without npm
	@for d in $(BUILTINS); do \
		mkdir -p $$d/build && \
		(cd $$d && GOOS=wasip1 GOARCH=wasm $(GO) build -buildmode=c-shared -trimpath -o build/module.wasm .) && \
		sum=$$(sha256sum $$d/build/module.wasm | cut -d' ' -f1) && \
		sed "s/@SHA256@/$$sum/" $$d/manifest.yaml.in > $$d/build/manifest.yaml && \
		echo "built $$d/build (sha256 $$sum)" || exit 1; \
	done

examples: $(ASC) ## build the example handlers (Go, AssemblyScript) and the first-party ones (plugins/builtin) into */build
	@for d in $(EXAMPLES_GO); do \
		mkdir -p $$d/build && \
		(cd $$d && GOOS=wasip1 GOARCH=wasm $(GO) build -buildmode=c-shared -trimpath -o build/module.wasm .) || exit 1; \
	done
	@for d in $(EXAMPLES_AS); do \
		mkdir -p $$d/build && \
		(cd $$d && $(CURDIR)/$(ASC) assembly/index.ts --config asconfig.json --outFile build/module.wasm) || exit 1; \
	done
	@for d in $(EXAMPLES); do \
		sum=$$(sha256sum $$d/build/module.wasm | cut -d' ' -f1) && \
		sed "s/@SHA256@/$$sum/" $$d/manifest.yaml.in > $$d/build/manifest.yaml && \
		echo "built $$d/build (sha256 $$sum)" || exit 1; \
	done

# The AssemblyScript example serves the same names as the Go one; make run
# installs the Go one (bin/outpost plugin install swaps them). The
# walkthrough test (cmd/outpost/walkthrough_test.go) reads this command
# line with make -n run.
run: build ## build, then run the local hub and the agent connected to it, with the example and first-party handlers (Ctrl-C stops both)
	$(BIN) run --hub --hints --admin-http 127.0.0.1:9181 $(addprefix --install ,$(addsuffix /build,$(RUN_PLUGINS)))

deps: ## install what the tests need (mosquitto, mosquitto-clients, wabt) when missing
	@need=; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need="$$need mosquitto"; \
	command -v mosquitto_pub >/dev/null 2>&1 || need="$$need mosquitto-clients"; \
	command -v wat2wasm >/dev/null 2>&1 || need="$$need wabt"; \
	if [ -n "$$need" ]; then \
		echo "installing:$$need"; \
		sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		if ! { $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq$$need; }; then \
			if [ "$$CI" = true ]; then echo "make deps: could not install$$need (CI=true: the tests need it)" >&2; exit 1; fi; \
			echo "make deps: could not install$$need; the tests that need it will skip"; \
		fi; \
	fi

test: deps $(ASC) ## install what the tests need, then run the whole suite (vet, race detector)
	$(GO) vet ./...
	$(GO) test $(TESTFLAGS) ./...

bench: build deps ## measure Outpost beside a Mosquitto bridge on the same workload, print one table
	$(GO) test -run '^$$' -bench . -benchtime 20000x ./storage/ ./runtime/uplink/ 2>&1 | grep -E '^(Benchmark|ok|PASS|FAIL)' || true
	@mkdir -p bin
	@{ $(GO) test -run '^$$' -bench . -benchtime 20000x ./runtime/ 2>&1; \
	  $(GO) test -run '^$$' -bench 'Call256' -benchtime 20000x ./plugins/sandbox/ 2>&1; \
	  $(GO) test -run '^$$' -bench 'LoadWarm|InstanceMemory' -benchtime 5x ./plugins/sandbox/ 2>&1; } | tee bin/bench-handlers.txt | grep -E '^(Benchmark|ok|PASS|FAIL)' || true
	@if grep -q '^\(--- \)\?FAIL' bin/bench-handlers.txt; then echo "a handler benchmark failed: see bin/bench-handlers.txt"; exit 1; fi
	@echo; echo "Handlers and hub dialects (from bin/bench-handlers.txt):"; echo
	@$(GO) run ./internal/benchtable -quiet < bin/bench-handlers.txt
	@echo
	$(GO) run ./internal/bench -agent $(BIN)

lint: ## go vet, gofmt, and staticcheck when installed
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	@if command -v staticcheck >/dev/null 2>&1; then staticcheck ./...; else echo "staticcheck not installed: skipped"; fi

fuzz: ## run each fuzz target for 30s
	$(GO) test -run '^$$' -fuzz '^FuzzRecord$$' -fuzztime 30s ./storage/
	$(GO) test -run '^$$' -fuzz '^FuzzSegment$$' -fuzztime 30s ./storage/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeMeta$$' -fuzztime 30s ./abi/
	@for f in FuzzParseTopic FuzzParseCommand FuzzParseStatus; do $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime 30s ./runtime/dialect/azure/ || exit 1; done
	@for f in FuzzParseCommandTopic FuzzParseDMTopic FuzzParseEventTopic FuzzDMRequest; do $(GO) test -run '^$$' -fuzz "^$$f\$$" -fuzztime 30s ./runtime/dialect/watson/ || exit 1; done
	$(GO) test -run '^$$' -fuzz '^FuzzParseDoc$$' -fuzztime 30s ./runtime/twin/

# make install: the agent, the first-party handlers, a systemd unit with
# hardening options, the system user, and a default configuration (an
# existing one is kept). DESTDIR stages it elsewhere (packaging, tests).
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR  := $(PREFIX)/bin
SHAREDIR := $(PREFIX)/share/outpost

install: agent builtins ## install the agent, its first-party handlers, a systemd unit and /etc/outpost/config.yaml (PREFIX, DESTDIR)
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/outpost
	@for d in $(BUILTINS); do n=$$(basename $$d); \
		install -D -m 0644 $$d/build/module.wasm $(DESTDIR)$(SHAREDIR)/plugins/$$n/module.wasm && \
		install -m 0644 $$d/build/manifest.yaml $(DESTDIR)$(SHAREDIR)/plugins/$$n/manifest.yaml || exit 1; \
	done
	install -d -m 0755 $(DESTDIR)/etc/systemd/system $(DESTDIR)$(PREFIX)/lib/sysusers.d $(DESTDIR)$(PREFIX)/share/doc/outpost
	sed -e 's#@BINDIR@#$(BINDIR)#' -e 's#@DOCDIR@#$(PREFIX)/share/doc/outpost#' examples/systemd/outpost.service > $(DESTDIR)/etc/systemd/system/outpost.service
	chmod 0644 $(DESTDIR)/etc/systemd/system/outpost.service
	install -m 0644 examples/systemd/outpost.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/outpost.conf
	install -m 0644 README.md docs/*.md abi/ABI.md $(DESTDIR)$(PREFIX)/share/doc/outpost/
	install -d -m 0750 $(DESTDIR)/etc/outpost
	@if [ -e $(DESTDIR)/etc/outpost/config.yaml ]; then \
		echo "kept $(DESTDIR)/etc/outpost/config.yaml (the new default is examples/configs/outpost.yaml)"; \
	else install -m 0640 examples/configs/outpost.yaml $(DESTDIR)/etc/outpost/config.yaml; fi
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then \
		getent passwd outpost >/dev/null || systemd-sysusers $(PREFIX)/lib/sysusers.d/outpost.conf 2>/dev/null || \
			useradd --system --home-dir /var/lib/outpost --no-create-home --shell /usr/sbin/nologin outpost; \
		chgrp outpost /etc/outpost /etc/outpost/config.yaml; \
		command -v systemctl >/dev/null && systemctl daemon-reload || true; \
	fi
	@echo; echo "Installed. Next (docs/OPERATIONS.md):"; \
	echo "  edit /etc/outpost/config.yaml, then: outpost config validate /etc/outpost/config.yaml"; \
	echo "  systemctl enable --now outpost"; \
	echo "  outpost plugin install $(SHAREDIR)/plugins/firmware   # and .../device, once it runs"; \
	echo "  outpost status"

clean: ## remove build output and the default data directory
	rm -rf bin data examples/*/build plugins/builtin/*/build
