"""What the ``fewshot datasets`` commands do: list, prepare, verify, show.

Kept out of the CLI so that the same operations are callable from Python.
"""

from __future__ import annotations

from pathlib import Path

from fewshot.data import paths
from fewshot.data.datasets import DATASETS, OMNIGLOT_SPLITS, folder_splits, load_dataset, source_for
from fewshot.data.render import render_episode
from fewshot.data.sampler import EpisodeSampler
from fewshot.data.sources import miniimagenet, omniglot
from fewshot.data.sources.folder import FolderSource
from fewshot.data.store import Store, load_store
from fewshot.errors import FewShotError


def splits_of(name: str) -> tuple[str, ...]:
    if name == "omniglot":
        return OMNIGLOT_SPLITS
    if name == "miniimagenet":
        return miniimagenet.SPLITS
    return folder_splits(Path(name.removeprefix("folder:")))


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
    """Check a dataset's integrity (Omniglot: 50 alphabets, 1,623 characters, 20 drawings each).

    A folder is checked split by split through ``load_dataset``, as ``prepare``
    and training read it, so a train/val/test layout is verified as such.
    """
    source = source_for(name, data_root, download=download)
    if isinstance(source, FolderSource):
        lines = []
        for split in splits_of(name):
            ds = load_dataset(name, split, data_root=data_root, image_size=image_size, download=download)
            lines.append(_store_line(ds.store, name, split))
    else:
        lines = omniglot.verify(source) if isinstance(source, omniglot.OmniglotSource) else []
        default = {"omniglot": 28}.get(name, 84)
        lines.append(_store_line(load_store(source, image_size or default, paths.cache_root()), name))
    lines.append("ok")
    return lines


def _store_line(store: Store, what: str, split: str = "") -> str:
    """One line on the decoded store of ``what`` (and ``split``); raises if a class has no image."""
    where = f"{what} split {split!r}" if split else what
    if len(store) == 0:
        raise FewShotError(f"{where} has no classes; check that its files are where they are looked for.")
    counts = store.counts
    if counts.min() < 1:
        raise FewShotError(
            f"{where} has an empty class: {store.class_names[int(counts.argmin())]}; add images to it."
        )
    return (
        f"decoded store{f' ({split} split)' if split else ''}: {len(store)} classes, "
        f"{int(counts.sum())} images ({int(counts.min())}-{int(counts.max())} per class), cache {store.path}"
    )


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
