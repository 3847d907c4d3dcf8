"""Write a random-weight Qwen3 checkpoint in exact shapes: bf16, 3 shards with an index, the real tokenizer.

    python bench/make_checkpoint.py --shape 4b            # 8.05 GB, about a minute
    python bench/make_checkpoint.py --shape 0.6b --dest /tmp/q06

Without --dest it goes to the work folder, where the other bench scripts look for it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from _common import SHAPES, checkpoint, parser

from localqwen.synthetic import write_checkpoint


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dest", type=Path, help="write here instead of the work folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    started = time.perf_counter()
    if args.dest:
        folder = write_checkpoint(args.dest, SHAPES[args.shape], seed=args.seed, shards=3)
    else:
        folder = checkpoint(args.shape, args.workdir)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{folder}: {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s "
          f"({len(list(folder.glob('*.safetensors')))} shards; {shutil.disk_usage(folder).free / 1e9:.0f} GB free)")


if __name__ == "__main__":
    main()
