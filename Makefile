# Build, test and demo modelpack-snapshotter. `make test` and `make demo` set up a fresh
# Debian machine themselves (run as root: they install packages and mount FUSE).

CARGO ?= cargo
RELEASE_BIN := target/release/modelpack-snapshotter

.PHONY: all build setup test fuzz demo bench soak lint image image-debian clean

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

# The image contrib/kubernetes/ runs, built from Containerfile with podman or docker
# (not part of `make test`): `make image IMAGE=registry.example.com/modelpack-snapshotter:v1`;
# `make image-debian` takes the same IMAGE.
IMAGE ?= modelpack-snapshotter:latest
CONTAINER_ENGINE ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)

image:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image: neither podman nor docker is installed" >&2; exit 1; }
	$(CONTAINER_ENGINE) build -f Containerfile -t $(IMAGE) .

# The same image without base images or a container registry (scripts/build-image.sh):
# a Debian 12 root from this machine's Debian mirror, the release binary, `podman import`.
# OCI_ARCHIVE=image.tar also saves it as an OCI archive (for skopeo or `ctr images import`).
OCI_ARCHIVE ?=

image-debian:
	CARGO=$(CARGO) ./scripts/build-image.sh --name $(IMAGE) $(if $(OCI_ARCHIVE),--oci-archive $(OCI_ARCHIVE))

demo: setup build
	./scripts/demo.sh $(RELEASE_BIN)

clean:
	$(CARGO) clean
