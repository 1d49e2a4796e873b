"""Property tests of the episode sampler, and its bad-input messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import image_folder
from hypothesis import given, settings
from hypothesis import strategies as st

from fewshot.data.datasets import FewShotDataset, load_dataset
from fewshot.data.sampler import EpisodeSampler, fixed_episodes
from fewshot.data.store import Store
from fewshot.errors import EpisodeError


def synthetic_dataset(counts: list[int], rotations: bool = False) -> FewShotDataset:
    """A dataset whose every image is unique: pixel (0,0,0) and (0,0,1) encode its store row."""
    total = sum(counts)
    images = torch.zeros(total, 1, 4, 4, dtype=torch.uint8)
    rows = torch.arange(total)
    images[:, 0, 0, 0] = (rows % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (rows // 256).to(torch.uint8)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    store = Store(images, offsets, [f"c{i}" for i in range(len(counts))], key="test")
    ds = FewShotDataset(
        "synthetic", "all", store, np.arange(len(counts)), np.zeros(len(counts), int), list(store.class_names)
    )
    return ds.with_rotations() if rotations else ds


def _ids(x: torch.Tensor) -> np.ndarray:
    """Store rows of float images made by ``synthetic_dataset`` (unrotated)."""
    px = (x[..., 0, 0, :2] * 255).round().long()
    return (px[..., 0] + 256 * px[..., 1]).numpy().reshape(-1)


shapes = st.tuples(
    st.lists(st.integers(4, 9), min_size=2, max_size=12),  # images per class
    st.integers(1, 6),  # ways
    st.integers(1, 2),  # shots
    st.integers(1, 2),  # queries
    st.integers(0, 2**31),  # seed
    st.integers(1, 4),  # tasks
)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_episodes_have_exact_shape_and_disjoint_sets(args):
    counts, ways, shots, queries, seed, tasks = args
    ways = min(ways, len(counts))
    ds = synthetic_dataset(counts)
    batch = EpisodeSampler(ds, ways, shots, queries, tasks=tasks, seed=seed)[3]
    assert batch.support.shape == (tasks, ways * shots, 1, 4, 4)
    assert batch.query.shape == (tasks, ways * queries, 1, 4, 4)
    offsets = ds.store.offsets
    for t, episode in enumerate(batch):
        s_ids, q_ids = _ids(episode.support), _ids(episode.query)
        assert not set(s_ids) & set(q_ids), "support and query share an image"
        assert len(set(s_ids)) == len(s_ids) and len(set(q_ids)) == len(q_ids)
        assert sorted(np.bincount(episode.support_labels, minlength=ways)) == [shots] * ways
        assert sorted(np.bincount(episode.query_labels, minlength=ways)) == [queries] * ways
        assert episode.support_labels.min() == 0 and episode.support_labels.max() == ways - 1
        # every image of label l comes from the one class named for l
        for label in range(ways):
            cls = int(batch.class_names[t][label][1:])
            s_mask = (episode.support_labels == label).numpy()
            q_mask = (episode.query_labels == label).numpy()
            for ids in (s_ids[s_mask], q_ids[q_mask]):
                assert all(offsets[cls] <= i < offsets[cls + 1] for i in ids)


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_same_seed_same_episodes_whatever_the_chunking(args):
    counts, ways, shots, queries, seed, tasks = args
    ways = min(ways, len(counts))
    ds = synthetic_dataset(counts)
    a = EpisodeSampler(ds, ways, shots, queries, tasks=tasks, seed=seed)
    b = EpisodeSampler(ds, ways, shots, queries, tasks=1, seed=seed)
    batch = a[2]
    for t in range(tasks):
        single = b[2 * tasks + t]
        assert torch.equal(batch.support[t], single.support[0])
        assert torch.equal(batch.query[t], single.query[0])
    if len(counts) > ways or min(counts) > shots + queries:
        # Another seed gives other episodes. One batch can coincide by chance (two classes of
        # four images, one shot, one query: about 1 in 1,700), so compare sixteen.
        other = EpisodeSampler(ds, ways, shots, queries, tasks=tasks, seed=seed + 1)
        same = [
            torch.equal(x.query, y.query) and torch.equal(x.support, y.support)
            for x, y in ((a[i], other[i]) for i in range(16))
        ]
        assert not all(same)


def test_all_classes_and_images_reachable():
    counts = [5, 7, 3, 9, 4]
    ds = synthetic_dataset(counts)
    sampler = EpisodeSampler(ds, ways=2, shots=1, queries=1, tasks=8, seed=0)
    seen_classes, seen_support, seen_query = set(), set(), set()
    for i in range(100):
        batch = sampler[i]
        seen_classes.update(n for names in batch.class_names for n in names)
        seen_support.update(_ids(batch.support))
        seen_query.update(_ids(batch.query))
    assert seen_classes == set(ds.class_names)
    assert seen_support == seen_query == set(range(sum(counts)))


def test_rotated_classes_hold_rotated_images():
    ds = synthetic_dataset([4, 4, 4], rotations=True)
    sampler = EpisodeSampler(ds, ways=12, shots=2, queries=2, seed=5)
    episode = sampler.episode(0)
    for label, name in enumerate(episode.class_names):
        k = int(name.rsplit("rot", 1)[1]) // 90
        for x in episode.support[episode.support_labels == label]:
            unrotated = torch.rot90(x, -k, dims=(-2, -1))
            assert _ids(unrotated)[0] in range(
                ds.store.offsets[int(name[1])], ds.store.offsets[int(name[1]) + 1]
            )


def test_fixed_episodes_are_identical_for_every_caller():
    ds = synthetic_dataset([6] * 10)
    a = fixed_episodes(ds, 5, 1, 3, episodes=50, seed=7, chunk=16)
    b = fixed_episodes(ds, 5, 1, 3, episodes=50, seed=7, chunk=50)
    assert sum(x.tasks for x in a) == 50 and len(b) == 1
    assert torch.equal(torch.cat([x.query for x in a]), b[0].query)


def test_dataloader_workers_give_the_same_batches():
    ds = synthetic_dataset([6] * 10)
    sampler = EpisodeSampler(ds, 3, 1, 2, tasks=4, seed=3, batches=6)
    loader = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=2)
    for i, batch in enumerate(loader):
        assert torch.equal(batch.support, sampler[i].support)
    assert i == 5


def test_class_too_small_names_class_and_numbers():
    ds = synthetic_dataset([10, 10, 3, 10])
    with pytest.raises(
        EpisodeError, match=r"Class 'c2' .* has 3 images, fewer than shots \+ queries = 1 \+ 5 = 6"
    ):
        EpisodeSampler(ds, 2, 1, 5)


def test_ways_above_classes():
    ds = synthetic_dataset([5, 5, 5])
    with pytest.raises(EpisodeError, match="5-way episodes need 5 classes, but .* has only 3"):
        EpisodeSampler(ds, 5, 1, 1)


@pytest.mark.parametrize(
    ("ways", "shots", "queries", "what"),
    [(0, 1, 1, "ways"), (2, 0, 1, "shots"), (2, 1, 0, "queries"), (2, -1, 1, "shots")],
)
def test_shapes_below_one(ways, shots, queries, what):
    ds = synthetic_dataset([5, 5, 5])
    with pytest.raises(EpisodeError, match=f"{what} must be a whole number of at least 1"):
        EpisodeSampler(ds, ways, shots, queries)


def test_normalisation_follows_the_dataset(tmp_path):
    root = image_folder(tmp_path / "mine", {"a": 3, "b": 3})
    ds = load_dataset(str(root), "all", image_size=6, progress=False)
    batch = EpisodeSampler(ds, 2, 1, 1, seed=0)[0]
    raw = ds.store.images.float() / 255
    mean = torch.tensor(ds.mean).view(3, 1, 1)
    std = torch.tensor(ds.std).view(3, 1, 1)
    normalised = (raw - mean) / std
    for x in batch.support[0]:
        assert any(torch.allclose(x, n, atol=1e-6) for n in normalised)
