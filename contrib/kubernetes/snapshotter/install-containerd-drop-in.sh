#!/bin/sh
# Installs containerd-drop-in.toml on this node for modelpack-snapshotter, and restarts
# containerd only when asked (RESTART_CONTAINERD=true) and only when the file changed.
# Run by the DaemonSet's init container, which mounts the host's /etc/containerd at
# $HOST_ROOT/etc/containerd. It fails the pod only when it cannot write the file; for
# the rest it says what it did and why in the init container's log.
#
#   HOST_ROOT           where the host's files are seen (/host)
#   CONTAINERD_CONFIG   containerd's main config, a host path (/etc/containerd/config.toml)
#   DROP_IN_DIR         a directory the main config imports, a host path under
#                       /etc/containerd (/etc/containerd/conf.d)
#   RESTART_CONTAINERD  true: restart containerd (systemd unit CONTAINERD_UNIT, default
#                       containerd) in the host's namespaces; needs hostPID
set -eu

host="${HOST_ROOT:-/host}"
main="${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"
dir="${DROP_IN_DIR:-/etc/containerd/conf.d}"
unit="${CONTAINERD_UNIT:-containerd}"
restart="${RESTART_CONTAINERD:-false}"
src="$(dirname "$0")/containerd-drop-in.toml"
target="$dir/modelpack-snapshotter.toml"

case "$dir" in
    /etc/containerd/*) ;;
    *)
        echo "DROP_IN_DIR=$dir is not under /etc/containerd, the only host directory this container sees; nothing installed"
        exit 0
        ;;
esac

if [ ! -f "$host$main" ]; then
    echo "$main does not exist: containerd runs on its built-in defaults, which import no drop-ins; nothing installed"
    echo "write a main config with imports = [\"$dir/*.toml\"], or merge $target's contents into it (README)"
    exit 0
fi

version="$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$host$main" | head -n 1)"
if [ "$version" != 3 ]; then
    echo "$main is config version ${version:-1}, not 3; nothing installed"
    echo "containerd 1.x replaces a whole plugin section of the main config with an imported one, and runs no image volumes (use CSI volumes, docs/csi.md)"
    echo "containerd 2.x reading an older version: 'containerd config migrate' writes it as version 3"
    exit 0
fi

mkdir -p "$host$dir"
if cmp -s "$src" "$host$target"; then
    echo "$target is up to date"
    exit 0
fi
cp "$src" "$host$target.tmp"
mv "$host$target.tmp" "$host$target"
echo "installed $target"

if ! grep -qF "$dir/" "$host$main"; then
    echo "$main does not import $dir: containerd will not read $target"
    echo "add imports = [\"$dir/*.toml\"] at its top, then restart containerd"
    exit 0
fi
if [ "$restart" != true ]; then
    echo "containerd reads $target when it next starts (RESTART_CONTAINERD=true restarts it now)"
    exit 0
fi
echo "restarting $unit"
if nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart "$unit"; then
    echo "restarted $unit"
else
    echo "restarting $unit failed: restart containerd on this node by hand"
fi
