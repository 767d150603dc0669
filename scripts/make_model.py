#!/usr/bin/env python3
"""Writes a deterministic safetensors model directory for demos, tests and benchmarks.

The tensors are pseudo-random float16/float32 data from a seeded generator, so the same
arguments always give the same bytes. Shards are streamed to disk tensor by tensor,
so a multi-gigabyte model needs little memory.

usage: make_model.py DIR --size BYTES [--shards N] [--tensor-bytes BYTES] [--seed N]
                     [--middle-tensor BYTES ...]

With --middle-tensor (repeatable), each shard also holds tensors of those sizes, one after
the other, starting at the first tensor boundary at or past the middle of its data; they are
named `middle.<shard>.<bytes>` (for benchmarks that read one tensor from a shard's middle).
"""

import argparse
import json
import os
import struct

import numpy as np


def write_shard(path, tensors, rng):
    """tensors: list of (name, dtype, shape). Writes header, then data in order."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": {"float16": "F16", "float32": "F32"}[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in tensors:
            n = int(np.prod(shape))
            if dtype == "float16":
                data = rng.integers(0, 2**16, size=n, dtype=np.uint16)
                # Keep values finite: clear the exponent's top bit.
                data &= np.uint16(0xBFFF)
            else:
                data = rng.standard_normal(n, dtype=np.float32)
            f.write(data.tobytes())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--size", type=int, required=True, help="total bytes of weights")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--tensor-bytes", type=int, default=16 << 20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--middle-tensor", type=int, action="append", default=[])
    a = p.parse_args()

    os.makedirs(a.dir, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    per_shard = a.size // a.shards
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for s in range(a.shards):
        name = f"model-{s + 1:05d}-of-{a.shards:05d}.safetensors"
        tensors, left, t = [], per_shard, 0
        middle = list(a.middle_tensor)
        if sum(middle) > per_shard // 2 or any(n < 2 or n % 2 for n in middle):
            p.error("--middle-tensor sizes must be even and fit in half a shard")
        while left > 0:
            if middle and per_shard - left >= per_shard // 2:
                for nbytes in middle:
                    cols = 1024 if nbytes % 2048 == 0 else 1
                    tensors.append((f"middle.{s}.{nbytes}", "float16", (nbytes // 2 // cols, cols)))
                    left -= nbytes
                middle = []
                continue
            nbytes = min(a.tensor_bytes, left)
            if t % 4 == 3 and nbytes % 4 == 0:
                tensors.append((f"layers.{s}.{t}.bias", "float32", (nbytes // 4,)))
            else:
                cols = 1024 if nbytes % 2048 == 0 else 1
                tensors.append((f"layers.{s}.{t}.weight", "float16", (nbytes // 2 // cols, cols)))
            left -= nbytes - nbytes % 2 if nbytes > 1 else nbytes
            if nbytes < 2:
                break
            t += 1
        write_shard(os.path.join(a.dir, name), tensors, rng)
        for tname, _, _ in tensors:
            index["weight_map"][tname] = name
        index["metadata"]["total_size"] += sum(
            int(np.prod(sh)) * np.dtype(dt).itemsize for _, dt, sh in tensors
        )
    with open(os.path.join(a.dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    with open(os.path.join(a.dir, "config.json"), "w") as f:
        json.dump({"architectures": ["DemoForCausalLM"], "model_type": "demo", "torch_dtype": "float16"}, f, indent=1)
    with open(os.path.join(a.dir, "README.md"), "w") as f:
        f.write("# demo model\n\nDeterministic pseudo-random weights for modelpack-snapshotter demos.\n")


if __name__ == "__main__":
    main()
