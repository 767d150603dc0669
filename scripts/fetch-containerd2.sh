#!/bin/sh
# Unpacks containerd 2.x from Debian unstable's package into tools/containerd2, for the
# tests that need it. Uses a private apt source list and state dir, leaving the system's
# apt configuration and installed packages alone. Only the containerd package is taken:
# unstable's runc needs a newer glibc, so containers keep using the system's runc.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/tools/containerd2"
if [ -x "$DEST/usr/bin/containerd" ]; then
    exit 0
fi
# unstable comes from the Debian mirror this machine's apt already uses.
MIRROR=$("$ROOT/scripts/debian-mirror.sh")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/parts" "$WORK/lists/partial" "$WORK/cache/archives/partial"
cat > "$WORK/parts/unstable.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: unstable
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
APT="-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$WORK/parts -o Dir::State::Lists=$WORK/lists -o Dir::Cache=$WORK/cache -o Debug::NoLocking=1 -o APT::Sandbox::User=root"
echo "setup: fetching containerd 2.x from Debian unstable into $DEST"
# shellcheck disable=SC2086
apt-get $APT -qq update
cd "$WORK"
# shellcheck disable=SC2086
apt-get $APT -qq download containerd
mkdir -p "$DEST.tmp"
dpkg -x "$WORK"/containerd_*.deb "$DEST.tmp"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
"$DEST/usr/bin/containerd" --version
