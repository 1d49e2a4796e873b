"""The ``fewshot`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import logging
import sys

from fewshot import __version__
from fewshot.errors import FewShotError


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="folder holding the datasets (default: $FEWSHOT_DATA)")
    p.add_argument(
        "--image-size", type=int, help="side of the square images (default: 28 Omniglot, 84 others)"
    )
    p.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="never download; fail if the data is not on disk",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot", description="Meta-learning for few-shot recognition.")
    parser.add_argument("--version", action="version", version=f"fewshot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    datasets = commands.add_parser("datasets", help="list, prepare, verify or show datasets")
    actions = datasets.add_subparsers(dest="action", required=True)
    p = actions.add_parser("list", help="the datasets fewshot knows and where it looks for them")
    p.add_argument("--data-root")
    for action, text in (
        ("prepare", "decode and cache every split"),
        ("verify", "check the dataset's integrity"),
    ):
        p = actions.add_parser(action, help=text)
        p.add_argument("name", help="omniglot, miniimagenet or folder:DIR")
        _data_options(p)
    p = actions.add_parser("show", help="render one episode to a PNG")
    p.add_argument("name")
    p.add_argument("--split")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="episode.png", help="PNG file to write (default: episode.png)")
    _data_options(p)
    return parser


def _datasets(args: argparse.Namespace) -> None:
    from fewshot.data import catalog

    if args.action == "list":
        lines = catalog.list_datasets(args.data_root)
    elif args.action == "prepare":
        lines = catalog.prepare(args.name, args.data_root, args.image_size, args.download)
    elif args.action == "verify":
        lines = catalog.verify(args.name, args.data_root, args.image_size, args.download)
    else:
        path = catalog.show(
            args.name,
            args.out,
            args.split,
            args.ways,
            args.shots,
            args.queries,
            args.seed,
            args.data_root,
            args.image_size,
            args.download,
        )
        lines = [f"wrote {path}"]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point; a FewShotError becomes one readable line and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="fewshot: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "datasets":
            _datasets(args)
    except FewShotError as exc:
        print(f"fewshot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewshot: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
