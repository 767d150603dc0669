#!/bin/sh
# Builds the image contrib/kubernetes/ runs without any base image, on a machine that
# reaches Debian's package mirror but no container registry: a minimal Debian 12
# (bookworm) root made by mmdebstrap from the mirror this machine's apt already uses, with
# the release binary at /usr/local/bin/modelpack-snapshotter, imported into podman's
# storage with `podman import`. The Containerfile builds the same image from registry
# base images. Run as root: mmdebstrap builds the root in its root mode.
#
#   scripts/build-image.sh [--binary PATH] [--name NAME] [--oci-archive PATH]
#
#   --binary PATH       the binary to put in the image; by default `cargo build --release
#                       --locked` builds it. It must run on bookworm's glibc: build it
#                       on Debian 12 (the root is checked by running it there).
#   --name NAME         the image's name in podman's storage
#                       (localhost/modelpack-snapshotter:dev)
#   --oci-archive PATH  also write the image to PATH as an OCI archive (`podman save`),
#                       for `skopeo copy oci-archive:PATH docker://...` or a node's
#                       `ctr images import`
#   PODMAN, CARGO       the programs to run (podman, cargo)
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PODMAN=${PODMAN:-podman}
CARGO=${CARGO:-cargo}
# The release the binary is built on (the machines `make` runs on, the Containerfile's
# rust:1-bookworm), so that the image has the glibc it was linked against.
SUITE=bookworm
BINARY=""
NAME=localhost/modelpack-snapshotter:dev
ARCHIVE=""

usage() {
    echo "usage: $0 [--binary PATH] [--name NAME] [--oci-archive PATH]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || usage; BINARY=$2; shift 2 ;;
        --name) [ $# -ge 2 ] || usage; NAME=$2; shift 2 ;;
        --oci-archive) [ $# -ge 2 ] || usage; ARCHIVE=$2; shift 2 ;;
        *) usage ;;
    esac
done

if [ "$(id -u)" != 0 ]; then
    echo "image: run as root (mmdebstrap --mode=root)" >&2
    exit 1
fi
for tool in mmdebstrap "$PODMAN"; do
    if ! command -v "$tool" >/dev/null; then
        echo "image: $tool is not installed (Debian packages mmdebstrap and podman)" >&2
        exit 1
    fi
done

START=$(date +%s)
if [ -z "$BINARY" ]; then
    (cd "$ROOT" && "$CARGO" build --release --locked)
    BINARY="${CARGO_TARGET_DIR:-$ROOT/target}/release/modelpack-snapshotter"
fi
if [ ! -x "$BINARY" ]; then
    echo "image: $BINARY is not an executable file" >&2
    exit 1
fi
# Read by the customize hook below, which runs with mmdebstrap's environment.
IMAGE_BINARY=$(cd "$(dirname "$BINARY")" && pwd)/$(basename "$BINARY")
export IMAGE_BINARY

# The release's packages from the Debian archive this machine's apt uses, and its
# security and point-release updates where this machine's apt has them too (a machine
# running another release has not: the image then holds bookworm as released).
MIRROR=$("$ROOT/scripts/debian-mirror.sh")
SOURCES=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null |
    awk -v suite="$SUITE" '($2 == suite "-security" || $2 == suite "-updates") && !seen[$2]++ {
        print "deb " $1 " " $2 " main" }')

# Only what the packages depend on, as the Containerfile's --no-install-recommends.
set -- '--aptopt=APT::Install-Recommends "false"'
# mmdebstrap runs apt with a configuration of its own, not this machine's: pass on its date
# checks, which a machine pointed at a frozen mirror turns off.
for opt in Acquire::Check-Valid-Until Acquire::Check-Date; do
    value=$(apt-config shell V "$opt" | sed -n "s/^V='\(.*\)'$/\1/p")
    if [ -n "$value" ]; then
        set -- "$@" "--aptopt=$opt \"$value\""
    fi
done
set -- "$@" "$SUITE"

WORK=$(mktemp -d)
# --one-file-system: never follow a mount mmdebstrap might have left behind into the host.
trap 'rm -rf --one-file-system "$WORK"; [ -z "$ARCHIVE" ] || rm -f "$ARCHIVE.tmp"' EXIT
trap 'exit 130' INT TERM HUP

echo "image: building a Debian $SUITE root from $MIRROR${SOURCES:+ (with $(echo "$SOURCES" | awk '{ printf "%s%s", sep, $3; sep = ", " }'))}"
set -- "$@" "$WORK/root.tar" "$MIRROR"
if [ -n "$SOURCES" ]; then
    # The updates' archives, one sources.list line each, on standard input.
    set -- "$@" -
fi
# The essential set has what the DaemonSet's init container script runs: sh (dash),
# coreutils, cmp (diffutils), grep, sed and nsenter (util-linux); they are named anyway,
# so that they stay whatever the essential set becomes. fuse3 has fusermount3, which the
# daemon mounts FUSE with; ca-certificates the roots registries' certificates are checked
# against. The root is merged-/usr as debootstrap makes it (else apt would install
# usrmerge, and perl with it, to merge it).
# The hooks: the binary is run in the root once, to fail here rather than on a node when
# it needs a newer glibc than the root's; the build machine's resolv.conf and hostname,
# which mmdebstrap copies in for apt, are left to the container runtime; as in Debian's
# slim images, manual pages, translations and documentation (but copyright files) go.
echo "$SOURCES" | mmdebstrap --mode=root --variant=essential \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=fuse3,ca-certificates,dash,coreutils,diffutils,grep,sed,util-linux \
    --customize-hook='install -D -m 0755 "$IMAGE_BINARY" "$1/usr/local/bin/modelpack-snapshotter"' \
    --customize-hook='chroot "$1" /usr/local/bin/modelpack-snapshotter --version ||
        { echo "image: the binary does not run on Debian bookworm (built on a newer glibc?)" >&2; exit 1; }' \
    --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
    --customize-hook='rm -rf "$1"/usr/share/man/* "$1"/usr/share/info/* "$1"/usr/share/locale/* &&
        find "$1/usr/share/doc" ! -type d ! -name copyright -delete &&
        find "$1/usr/share/doc" -mindepth 1 -depth -type d -empty -delete' \
    "$@"

# ENTRYPOINT as in the Containerfile; PATH as Debian's images set it (no runtime has to
# supply one for the init container's `sh`).
"$PODMAN" import --quiet \
    --change 'ENTRYPOINT=["/usr/local/bin/modelpack-snapshotter"]' \
    --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$WORK/root.tar" "$NAME" >/dev/null
rm -f "$WORK/root.tar"
if [ -n "$ARCHIVE" ]; then
    # Written beside its destination, then renamed: never a half-written archive there.
    "$PODMAN" save --quiet --format oci-archive -o "$ARCHIVE.tmp" "$NAME"
    mv "$ARCHIVE.tmp" "$ARCHIVE"
fi
SIZE=$("$PODMAN" image inspect --format '{{.Size}}' "$NAME")
echo "image: built $NAME ($((SIZE / 1000000)) MB) in $(($(date +%s) - START)) s${ARCHIVE:+, saved to $ARCHIVE}"
