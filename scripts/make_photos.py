"""Write synthetic camera-sized JPEGs (default: 8 of 12 MP, 4000x3000) to measure the input pipeline on.

    python scripts/make_photos.py /tmp/photos12mp && greenmim-bench --loader /tmp/photos12mp --out results/loader_12mp
"""
import argparse

from greenmim.bench.loader import write_photos

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("folder")
p.add_argument("--count", type=int, default=8)
p.add_argument("--height", type=int, default=3000)
p.add_argument("--width", type=int, default=4000)
args = p.parse_args()
print("\n".join(write_photos(args.folder, args.count, (args.height, args.width))))
