# Build, test and demo modelpack-snapshotter. `make test` and `make demo` set up a fresh
# Debian machine themselves (run as root: they install packages and mount FUSE).

CARGO ?= cargo
RELEASE_BIN := target/release/modelpack-snapshotter

.PHONY: all build setup test fuzz demo bench soak lint clean

all: build

build:
	$(CARGO) build --release --locked

setup:
	./scripts/setup.sh

test: setup
	$(CARGO) test --locked

# The parser properties of tests/parsers.rs, all at once, for FUZZ_SECS seconds each
# (every round of cases from a fresh random seed); `make test` runs 10,000 cases of each.
FUZZ_SECS ?= 300

fuzz:
	FUZZ_SECS=$(FUZZ_SECS) $(CARGO) test --locked --test parsers -- --test-threads=64 --nocapture

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# Benchmarks against a local registry (not part of `make test`); see docs/benchmarks.md.
bench: setup
	$(CARGO) bench --locked --bench bench
	$(CARGO) bench --locked --bench cri_pull
	$(CARGO) bench --locked --bench podman_pull
	$(CARGO) bench --locked --bench csi_publish
	$(CARGO) bench --locked --bench many_models

# Reads under thousands of injected registry faults, every byte checked (not part of
# `make test`); SOAK_SECS (default 120) bounds it. Report: target/soak/report.md.
soak: setup
	$(CARGO) bench --locked --bench soak

demo: setup build
	./scripts/demo.sh $(RELEASE_BIN)

clean:
	$(CARGO) clean
