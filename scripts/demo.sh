#!/bin/sh
# The self-contained demo: a local registry on loopback, a generated ~1 GiB safetensors
# model pushed to it, mounted lazily, one tensor loaded with the `safetensors` library,
# and the bytes fetched reported. Stops and unmounts everything it started.
#
# usage: scripts/demo.sh [BINARY]   (environment: DEMO_SIZE bytes, DEMO_PORT)
set -eu

BIN=$(realpath "${1:-target/release/modelpack-snapshotter}")
SIZE=${DEMO_SIZE:-1073741824}
PORT=${DEMO_PORT:-5055}
WORK=$(mktemp -d /tmp/modelpack-demo.XXXXXX)
REF=127.0.0.1:$PORT/models/demo:v1
REGISTRY_PID=""
MOUNT_PID=""

cleanup() {
    [ -n "$MOUNT_PID" ] && kill -TERM "$MOUNT_PID" 2>/dev/null && wait "$MOUNT_PID" 2>/dev/null || true
    mountpoint -q "$WORK/mnt" 2>/dev/null && umount -l "$WORK/mnt" || true
    [ -n "$REGISTRY_PID" ] && kill "$REGISTRY_PID" 2>/dev/null && wait "$REGISTRY_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "== starting a registry on 127.0.0.1:$PORT"
cat > "$WORK/registry.yml" <<YML
version: 0.1
log: { level: warn }
storage: { filesystem: { rootdirectory: $WORK/registry } }
http: { addr: 127.0.0.1:$PORT }
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
i=0
until curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null; do
    i=$((i + 1)); [ $i -gt 200 ] && { echo "registry did not start" >&2; cat "$WORK/registry.log" >&2; exit 1; }
    sleep 0.05
done

echo "== generating a $SIZE-byte safetensors model"
python3 "$(dirname "$0")/make_model.py" "$WORK/model" --size "$SIZE" --shards 2

echo "== push"
"$BIN" push "$WORK/model" "$REF"

echo "== inspect"
"$BIN" inspect "$REF" --cache-dir "$WORK/cache-inspect"

echo "== mount"
mkdir -p "$WORK/mnt"
"$BIN" mount "$REF" "$WORK/mnt" --cache-dir "$WORK/cache" >"$WORK/mount.out" &
MOUNT_PID=$!
i=0
until grep -q '^ready:' "$WORK/mount.out" 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 600 ] && { echo "mount did not become ready" >&2; exit 1; }
    kill -0 "$MOUNT_PID" 2>/dev/null || { echo "mount exited" >&2; exit 1; }
    sleep 0.05
done
cat "$WORK/mount.out"
ls -l "$WORK/mnt"

echo "== loading one tensor with the safetensors library"
python3 "$(dirname "$0")/load_tensors.py" "$WORK/mnt" --one

echo "== unmount"
kill -TERM "$MOUNT_PID"
wait "$MOUNT_PID" || true
MOUNT_PID=""
tail -n 1 "$WORK/mount.out"
