#!/bin/sh
# Prints the Debian archive this machine's apt is already configured with (the one
# serving its release itself, not the security, updates or backports archives), for the
# scripts that take other Debian releases' packages from the same mirror.
set -eu
MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null |
    awk '$2 !~ /-(security|updates|backports)$/ { print $1; exit }')
if [ -z "$MIRROR" ]; then
    echo "setup: no Debian archive found in this machine's apt sources (run apt-get update first)" >&2
    exit 1
fi
echo "$MIRROR"
