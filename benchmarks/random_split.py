"""Write a random Omniglot character split as class-list files, learn2learn's way.

learn2learn 0.2.0's Omniglot benchmark (``omniglot_tasksets``) does not use the
Vinyals split: it shuffles the 1,623 characters and takes the first 1,100 for
training, the next 100 for validation and the last 423 for testing, so test
characters come from the same alphabets as training ones, and it rotates each
class of a task by a random quarter turn. This script writes such a split
(each character with its four rotations as classes, the rotations of the
Vinyals split), so a fewshot run can be compared with learn2learn on its own
protocol:

    python benchmarks/random_split.py --out splits/random-seed0
    python benchmarks/reproduce.py protonet omniglot-5w1s \\
        --set data.train_split=splits/random-seed0/train.txt \\
        --set data.val_split=splits/random-seed0/val.txt \\
        --set data.test_split=splits/random-seed0/test.txt

The characters are read from the data root (``--data-root`` or ``FEWSHOT_DATA``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from fewshot.data.datasets import rotated_classes, source_for
from fewshot.errors import FewShotError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.txt, val.txt, test.txt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the character shuffle")
    parser.add_argument("--sizes", default="1100,100,423", help="train,val,test characters (learn2learn's)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    try:
        sizes = [int(n) for n in args.sizes.split(",")]
        if len(sizes) != 3 or min(sizes) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: give three positive counts train,val,test, e.g. 1100,100,423")
    try:
        characters = sorted(c.name for c in source_for("omniglot", args.data_root, download=False).classes())
    except FewShotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if sum(sizes) > len(characters):
        parser.error(f"--sizes add up to {sum(sizes)} characters; Omniglot has {len(characters)}")
    random.Random(args.seed).shuffle(characters)
    args.out.mkdir(parents=True, exist_ok=True)
    start = 0
    counts = {}
    for split, size in zip(("train", "val", "test"), sizes, strict=True):
        chosen = characters[start : start + size]
        start += size
        lines = rotated_classes(chosen)
        (args.out / f"{split}.txt").write_text("\n".join(lines) + "\n")
        counts[split] = {
            "characters": len(chosen),
            "classes": len(lines),
            "alphabets": len({c.split("/")[0] for c in chosen}),
        }
        alphabets = counts[split]["alphabets"]
        print(f"{split}: {len(chosen)} characters from {alphabets} alphabets -> {args.out / split}.txt")
    print(json.dumps({"seed": args.seed, **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
