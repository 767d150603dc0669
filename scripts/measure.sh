#!/bin/sh
# Quick measurements of the lazy mount against a local registry, all in one run so that
# ratios compare like with like: mount-ready time, bytes fetched for one tensor, cold and
# warm sequential reads next to curl of the same blobs and a local copy.
# (The full benchmark suite with repetitions and a report is `make bench`, not built yet.)
#
# usage: scripts/measure.sh [BINARY] [SIZE_BYTES]   (as root)
set -eu

BIN=$(realpath "${1:-target/release/modelpack-snapshotter}")
SIZE=${2:-1073741824}
PORT=${MEASURE_PORT:-5056}
HERE=$(dirname "$(realpath "$0")")
WORK=$(mktemp -d /var/tmp/modelpack-measure.XXXXXX)
REF=127.0.0.1:$PORT/models/measure:v1
REGISTRY_PID=""
MOUNT_PID=""

cleanup() {
    [ -n "$MOUNT_PID" ] && kill -TERM "$MOUNT_PID" 2>/dev/null && wait "$MOUNT_PID" 2>/dev/null || true
    mountpoint -q "$WORK/mnt" 2>/dev/null && umount -l "$WORK/mnt" || true
    [ -n "$REGISTRY_PID" ] && kill "$REGISTRY_PID" 2>/dev/null && wait "$REGISTRY_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

now_ns() { date +%s%N; }
mbps() { echo "$1 $2" | awk '{ printf "%.0f", $1 / ($2 / 1e9) / 1e6 }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

cat > "$WORK/registry.yml" <<YML
version: 0.1
log: { level: warn }
storage: { filesystem: { rootdirectory: $WORK/registry } }
http: { addr: 127.0.0.1:$PORT }
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
until curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null; do sleep 0.05; done

python3 "$HERE/make_model.py" "$WORK/model" --size "$SIZE" --shards 2 >/dev/null
"$BIN" push "$WORK/model" "$REF" 2>/dev/null >/dev/null
SHARDS=$(ls "$WORK/model"/*.safetensors)
BYTES=$(cat $SHARDS | wc -c)

start_mount() { # $1 = cache dir, rest = flags; sets MOUNT_PID and READY_MS
    mkdir -p "$WORK/mnt"
    t0=$(now_ns)
    "$BIN" mount "$REF" "$WORK/mnt" --cache-dir "$1" --log-level warn >"$WORK/mount.out" &
    MOUNT_PID=$!
    first=$(basename "$(echo "$SHARDS" | head -n 1)")
    until stat "$WORK/mnt/$first" >/dev/null 2>&1; do sleep 0.001; done
    READY_MS=$(( ($(now_ns) - t0) / 1000000 ))
}
stop_mount() {
    kill -TERM "$MOUNT_PID"; wait "$MOUNT_PID" || true; MOUNT_PID=""
    tail -n 1 "$WORK/mount.out"
}

echo "model: $BYTES bytes of weights in $(echo "$SHARDS" | wc -l) shards"

# curl of the same blobs: one stream per blob, then 4 parallel 1/4 ranges per blob.
drop_caches; cat $SHARDS >/dev/null   # the registry's files are in page cache for both
t0=$(now_ns)
for d in $(cd "$WORK/model" && sha256sum *.safetensors | cut -d' ' -f1); do
    curl -fs "http://127.0.0.1:$PORT/v2/models/measure/blobs/sha256:$d" -o /dev/null
done
CURL1=$(( $(now_ns) - t0 ))
t0=$(now_ns)
for f in $SHARDS; do
    d=$(sha256sum "$f" | cut -d' ' -f1); n=$(stat -c %s "$f"); q=$(( n / 4 ))
    pids=""
    for i in 0 1 2 3; do
        s=$(( i * q )); e=$(( i == 3 ? n - 1 : (i + 1) * q - 1 ))
        curl -fs -r "$s-$e" "http://127.0.0.1:$PORT/v2/models/measure/blobs/sha256:$d" -o /dev/null &
        pids="$pids $!"
    done
    for p in $pids; do wait "$p"; done
done
CURL4=$(( $(now_ns) - t0 ))

# Mount ready, then one tensor.
start_mount "$WORK/cache-one"
echo "mount ready (command start -> first stat): ${READY_MS} ms"
python3 "$HERE/load_tensors.py" "$WORK/mnt" --one >/dev/null
printf "one tensor: "; stop_mount

# Cold sequential read of all weights.
start_mount "$WORK/cache"
t0=$(now_ns); cat "$WORK/mnt"/*.safetensors >/dev/null; COLD=$(( $(now_ns) - t0 ))
printf "cold read: "; stop_mount

# Warm read: every chunk cached, page cache dropped, versus a local copy.
start_mount "$WORK/cache"
drop_caches
t0=$(now_ns); cat "$WORK/mnt"/*.safetensors >/dev/null; WARM=$(( $(now_ns) - t0 ))
stop_mount >/dev/null
drop_caches
t0=$(now_ns); cat $SHARDS >/dev/null; LOCAL=$(( $(now_ns) - t0 ))

echo "curl, 1 stream per blob:        $(mbps "$BYTES" "$CURL1") MB/s"
echo "curl, 4 parallel ranges:        $(mbps "$BYTES" "$CURL4") MB/s"
echo "cold sequential read via mount: $(mbps "$BYTES" "$COLD") MB/s"
echo "warm read via mount:            $(mbps "$BYTES" "$WARM") MB/s"
echo "local file read:                $(mbps "$BYTES" "$LOCAL") MB/s"
