#!/bin/sh
# Builds a Debian 13 (trixie) root holding podman 5.x into tools/podman5, for the tests
# of the additional layer store: podman 5 (containers/storage >= 1.54) looks layers up by
# their TOC digest, Debian 12's podman 4.3 by their blob digest, and the tests run both.
# The tests run it through chroot; nothing is installed on this machine itself. The
# root is built in a temporary directory and renamed into place only once it is whole.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/tools/podman5"
if [ -x "$DEST/usr/bin/podman" ]; then
    exit 0
fi
# trixie comes from the Debian mirror this machine's apt already uses.
MIRROR=$("$ROOT/scripts/debian-mirror.sh")
# mmdebstrap runs apt with a configuration of its own, not this machine's: pass on its date
# checks, which a machine pointed at a frozen mirror turns off.
set --
for opt in Acquire::Check-Valid-Until Acquire::Check-Date; do
    value=$(apt-config shell V "$opt" | sed -n "s/^V='\(.*\)'$/\1/p")
    if [ -n "$value" ]; then
        set -- "$@" "--aptopt=$opt \"$value\""
    fi
done
mkdir -p "$ROOT/tools"
WORK=$(mktemp -d "$ROOT/tools/podman5.tmp.XXXXXX")
chmod 755 "$WORK"
# --one-file-system: never follow a mount mmdebstrap might have left behind into the host.
trap 'rm -rf --one-file-system "$WORK"' EXIT
echo "setup: building a Debian trixie root with podman 5 into $DEST"
START=$(date +%s)
mmdebstrap --quiet --mode=root --variant=apt --include=podman,runc,ca-certificates "$@" trixie "$WORK" "$MIRROR"
rm -rf --one-file-system "$DEST"
mv "$WORK" "$DEST"
echo "setup: built $DEST in $(($(date +%s) - START)) s"
# (podman itself cannot run in the root without /proc; its package says which it is.)
dpkg-query --admindir="$DEST/var/lib/dpkg" -W -f 'podman ${Version}\n' podman
