"""What the ``fewshot datasets`` commands do: list, prepare, verify, show.

Kept out of the CLI so that the same operations are callable from Python.
"""

from __future__ import annotations

from pathlib import Path

from fewshot.data import paths
from fewshot.data.datasets import DATASETS, OMNIGLOT_SPLITS, load_dataset, source_for
from fewshot.data.render import render_episode
from fewshot.data.sampler import EpisodeSampler
from fewshot.data.sources import miniimagenet, omniglot
from fewshot.data.store import load_store
from fewshot.errors import FewShotError


def splits_of(name: str) -> tuple[str, ...]:
    if name == "omniglot":
        return OMNIGLOT_SPLITS
    if name == "miniimagenet":
        return miniimagenet.SPLITS
    root = Path(name.removeprefix("folder:"))
    present = tuple(d for d in ("train", "val", "test") if (root / d).is_dir())
    return present or ("all",)


def list_datasets(data_root: str | None = None) -> list[str]:
    """One line per known dataset, and where data is looked for."""
    root = paths.data_root(data_root)
    lines = [f"{name:13s} {text}" for name, text in DATASETS.items()]
    lines.append(f"data root: {root if root else 'not set (use --data-root or FEWSHOT_DATA)'}")
    lines.append(f"cache:     {paths.cache_root()}")
    return lines


def prepare(
    name: str, data_root: str | None = None, image_size: int | None = None, download: bool = True
) -> list[str]:
    """Decode and cache every split of a dataset; report classes and images per split."""
    lines = []
    for split in splits_of(name):
        ds = load_dataset(name, split, data_root=data_root, image_size=image_size, download=download)
        lines.append(
            f"{name} {split}: {ds.num_classes} classes, {ds.num_images} images, "
            f"{'x'.join(map(str, ds.image_shape))} uint8"
        )
    return lines


def verify(
    name: str, data_root: str | None = None, image_size: int | None = None, download: bool = True
) -> list[str]:
    """Check a dataset's integrity (Omniglot: 50 alphabets, 1,623 characters, 20 drawings each)."""
    source = source_for(name, data_root, download=download)
    lines = omniglot.verify(source) if isinstance(source, omniglot.OmniglotSource) else []
    default = {"omniglot": 28}.get(name, 84)
    store = load_store(source, image_size or default, paths.cache_root())
    counts = store.counts
    if len(store) == 0 or counts.min() < 1:
        raise FewShotError(f"{name} has an empty class: {store.class_names[int(counts.argmin())]}")
    lines.append(
        f"decoded store: {len(store)} classes, {int(counts.sum())} images "
        f"({int(counts.min())}-{int(counts.max())} per class), cache {store.path}"
    )
    lines.append("ok")
    return lines


def show(
    name: str,
    out: str | Path,
    split: str | None = None,
    ways: int = 5,
    shots: int = 1,
    queries: int = 2,
    seed: int = 0,
    data_root: str | None = None,
    image_size: int | None = None,
    download: bool = True,
) -> Path:
    """Render one episode of a dataset split to a PNG."""
    split = split or splits_of(name)[0]
    ds = load_dataset(name, split, data_root=data_root, image_size=image_size, download=download)
    episode = EpisodeSampler(ds, ways, shots, queries, seed=seed).episode(0)
    title = f"{name} {split}: {ways}-way {shots}-shot {queries}-query (seed {seed})"
    return render_episode(episode, out, title, ds.mean, ds.std)
