#!/usr/bin/env python3
"""Loads tensors with the `safetensors` library and compares them with a reference copy.

usage: load_tensors.py MOUNTED_DIR [REFERENCE_DIR] [--one | --tensor NAME] [--file-order]
With --one, loads only the first tensor of the first shard (a lazy, partial read); with
--tensor NAME, only the header of the shard holding NAME (found through
model.safetensors.index.json when there is one) and that tensor. By default each
shard's tensors are loaded in the library's key order (sorted by name, as
`safetensors.numpy.load_file` does); with --file-order, in the order of their offsets in
the file, as a loader streaming a shard would.
Prints one line: how many tensors and bytes were loaded (and compared), and the seconds
the loading took (from opening the first shard, after Python and its imports started).
"""

import glob
import json
import os
import sys
import time

import numpy as np
from safetensors import safe_open


def main():
    argv = sys.argv[1:]
    wanted = None
    if "--tensor" in argv:
        at = argv.index("--tensor")
        if at + 1 >= len(argv):
            sys.exit("--tensor needs a tensor name")
        wanted = argv[at + 1]
        del argv[at : at + 2]
    args = [a for a in argv if not a.startswith("--")]
    one = "--one" in argv
    file_order = "--file-order" in argv
    mounted = args[0]
    reference = args[1] if len(args) > 1 else None
    count = nbytes = 0
    start = time.monotonic()
    shards = sorted(glob.glob(os.path.join(mounted, "*.safetensors")))
    index = os.path.join(mounted, "model.safetensors.index.json")
    if wanted is not None and os.path.exists(index):
        with open(index) as f:
            shard = json.load(f).get("weight_map", {}).get(wanted)
        shards = [os.path.join(mounted, os.path.basename(shard))] if shard else []
    for shard in shards:
        ref = None
        if reference:
            ref = safe_open(os.path.join(reference, os.path.basename(shard)), framework="numpy")
        with safe_open(shard, framework="numpy") as f:
            names = f.offset_keys() if file_order else f.keys()
            if wanted is not None:
                names = [wanted] if wanted in names else []
            for name in names:
                tensor = f.get_tensor(name)
                if ref is not None and not np.array_equal(tensor.view(np.uint8), ref.get_tensor(name).view(np.uint8)):
                    sys.exit(f"tensor {name} of {shard} differs from the reference")
                count += 1
                nbytes += tensor.nbytes
                if one:
                    break
        if one or (wanted is not None and count):
            break
    seconds = time.monotonic() - start
    if count == 0:
        sys.exit(f"no tensors found under {mounted}" + (f" named {wanted}" if wanted else ""))
    print(
        f"loaded {count} tensors, {nbytes} bytes in {seconds:.3f} s"
        + (" (all equal to the reference)" if reference else "")
    )


if __name__ == "__main__":
    main()
