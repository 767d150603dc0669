#!/usr/bin/env python3
"""Loads tensors with the `safetensors` library and compares them with a reference copy.

usage: load_tensors.py MOUNTED_DIR [REFERENCE_DIR] [--one]
With --one, loads only the first tensor of the first shard (a lazy, partial read).
Prints one line: how many tensors and bytes were loaded (and compared).
"""

import glob
import os
import sys

import numpy as np
from safetensors import safe_open


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    one = "--one" in sys.argv
    mounted = args[0]
    reference = args[1] if len(args) > 1 else None
    count = nbytes = 0
    for shard in sorted(glob.glob(os.path.join(mounted, "*.safetensors"))):
        ref = None
        if reference:
            ref = safe_open(os.path.join(reference, os.path.basename(shard)), framework="numpy")
        with safe_open(shard, framework="numpy") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if ref is not None and not np.array_equal(tensor.view(np.uint8), ref.get_tensor(name).view(np.uint8)):
                    sys.exit(f"tensor {name} of {shard} differs from the reference")
                count += 1
                nbytes += tensor.nbytes
                if one:
                    break
        if one:
            break
    if count == 0:
        sys.exit(f"no tensors found under {mounted}")
    print(f"loaded {count} tensors, {nbytes} bytes" + (" (all equal to the reference)" if reference else ""))


if __name__ == "__main__":
    main()
