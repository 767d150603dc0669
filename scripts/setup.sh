#!/bin/sh
# Installs what building, testing and the demo need on a Debian machine (run as root).
# Safe to run again: it installs only what is missing.
set -eu

need_apt=""
# podman (4.3, with conmon) and mmdebstrap (to build podman 5's root) are for the tests of the
# additional layer store; as root podman needs neither uidmap nor fuse-overlayfs. linux-perf is for
# `make bench` (the mount process's CPU and context switches).
for pkg in fuse3 docker-registry curl containerd runc busybox-static protobuf-compiler apache2-utils \
    podman mmdebstrap linux-perf; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt="$need_apt $pkg"
done
if [ -n "$need_apt" ]; then
    echo "setup: installing Debian packages:$need_apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need_apt >/dev/null
fi

if ! python3 -c 'import safetensors, numpy' >/dev/null 2>&1; then
    echo "setup: installing Python packages safetensors and numpy"
    python3 -m pip install -q safetensors numpy
fi

# containerd 2.x for the CRI tests, unpacked beside the system's 1.6.
"$(dirname "$0")/fetch-containerd2.sh"

# podman 5.x (TOC-digest lookups in the additional layer store) in a Debian trixie root.
"$(dirname "$0")/fetch-podman5.sh"

if [ ! -e /dev/fuse ]; then
    echo "setup: /dev/fuse is missing; FUSE mounts will not work on this machine" >&2
fi
