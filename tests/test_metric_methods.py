"""Metric meta-learners: closed forms, batched-vs-per-task agreement, validation, learning.

Prototypical, Matching and Relation Networks are checked against explicit
hand-written loops, against their own per-task ``adapt`` path, and by short
meta-training runs on the synthetic template tasks of ``tests/synthetic.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from synthetic import class_templates, synthetic_batch
from torch import nn

from fewshot.data.episodes import EpisodeBatch
from fewshot.errors import EpisodeError
from fewshot.methods import protonet
from fewshot.methods import relation as relation_module
from fewshot.methods.base import Method
from fewshot.methods.matching import MatchingNetwork
from fewshot.methods.protonet import PrototypicalNetwork, class_aggregate, embed_batch
from fewshot.methods.relation import RelationNetwork, relation_embedding
from fewshot.models.backbones import Conv4
from fewshot.models.norm import convert_batchnorm

IMAGE = (1, 28, 28)


def make_method(kind: str) -> Method:
    """Small instances of every method variant, on 1x28x28 images."""
    torch.manual_seed(0)
    if kind == "protonet":
        return PrototypicalNetwork(Conv4(hidden=16), features=16)
    if kind == "protonet-cosine":
        return PrototypicalNetwork(Conv4(hidden=16), 16, distance="cosine", learn_scale=True)
    if kind == "matching":
        return MatchingNetwork(Conv4(hidden=16), features=16)
    if kind == "matching-fce":
        return MatchingNetwork(Conv4(hidden=16), features=16, fce=True, fce_steps=2)
    if kind == "relation":
        return RelationNetwork(IMAGE, hidden=16)
    if kind == "relation-ce":
        return RelationNetwork(IMAGE, hidden=16, loss="ce", aggregate="mean")
    raise ValueError(kind)


KINDS = ["protonet", "protonet-cosine", "matching", "matching-fce", "relation", "relation-ce"]


def shuffled_batch(batch: EpisodeBatch, seed: int = 0) -> EpisodeBatch:
    """The same batch with every task's support order permuted differently."""
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(batch.support.shape[1], generator=g) for _ in batch])
    idx = torch.arange(batch.tasks).unsqueeze(1)
    return EpisodeBatch(
        support=batch.support[idx, perms],
        support_labels=batch.support_labels[idx, perms],
        query=batch.query,
        query_labels=batch.query_labels,
    )


@pytest.fixture(scope="module")
def templates() -> torch.Tensor:
    return class_templates(30, IMAGE, seed=0)


@pytest.fixture
def batch(templates) -> EpisodeBatch:
    return shuffled_batch(synthetic_batch(templates, tasks=3, ways=4, shots=2, queries=3, seed=7))


# --------------------------------------------------------------------------
# Prototypical Networks
# --------------------------------------------------------------------------


@contextlib.contextmanager
def counting_calls(module: nn.Module) -> Iterator[list[int]]:
    """A list that grows by one at every forward call of ``module`` inside the block."""
    calls: list[int] = []
    hook = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def embed_calls(backbone: nn.Module, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``embed_batch``'s support and query embeddings, and how many backbone calls made them."""
    with counting_calls(backbone) as calls:
        support, query = embed_batch(backbone, batch)
    return support, query, len(calls)


def test_embed_batch_eval_blocks_equal_one_call(batch, monkeypatch):
    """On running statistics the test-time backbone runs in blocks, with one call's numbers;
    a backbone that normalises by its batch (TaskBatchNorm) gets each episode whole, one call each."""
    torch.manual_seed(0)
    backbone = Conv4(hidden=8).double().eval()
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):  # running statistics that are not the identity
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    batch = dataclasses.replace(batch, support=batch.support.double(), query=batch.query.double())
    images = batch.tasks * (batch.support.shape[1] + batch.query.shape[1])  # 60

    monkeypatch.setattr(protonet, "EVAL_BLOCK_ELEMENTS", 1 << 62)
    whole_support, whole_query, calls = embed_calls(backbone, batch)
    assert calls == 1
    monkeypatch.setattr(protonet, "EVAL_BLOCK_ELEMENTS", 7 * math.prod(IMAGE))  # blocks of 7 images
    support, query, calls = embed_calls(backbone, batch)
    assert calls == math.ceil(images / 7)
    torch.testing.assert_close(support, whole_support, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(query, whole_query, rtol=1e-12, atol=1e-12)

    convert_batchnorm(backbone)
    support, query, calls = embed_calls(backbone, batch)
    assert calls == batch.tasks
    monkeypatch.setattr(protonet, "EVAL_BLOCK_ELEMENTS", 1 << 62)
    whole_support, whole_query, _ = embed_calls(backbone, batch)
    torch.testing.assert_close(support, whole_support, rtol=0, atol=0)
    torch.testing.assert_close(query, whole_query, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["protonet", "matching-fce", "relation"])
def test_predictors_embed_in_blocks_at_test_time(kind, batch, monkeypatch):
    """adapt and the predictor embed through the same blocks as the test episodes, same numbers."""
    method = make_method(kind).double().eval()
    backbone = method.embedding if kind == "relation" else method.backbone
    episode = batch[0]
    support, labels, query = episode.support.double(), episode.support_labels, episode.query.double()

    monkeypatch.setattr(protonet, "EVAL_BLOCK_ELEMENTS", 1 << 62)
    whole = method.adapt(support, labels)(query)
    monkeypatch.setattr(protonet, "EVAL_BLOCK_ELEMENTS", 5 * math.prod(IMAGE))  # blocks of 5 images
    with counting_calls(backbone) as calls:
        blocked = method.adapt(support, labels)(query)
    assert len(calls) == math.ceil(len(support) / 5) + math.ceil(len(query) / 5)
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_predictors_take_an_empty_query_set(kind):
    """No queries give no rows of logits, (0, ways), not an error from deep inside torch."""
    method = make_method(kind).eval()
    predictor = method.adapt(torch.rand(6, *IMAGE), torch.arange(3).repeat(2))
    assert predictor(torch.rand(0, *IMAGE)).shape == (0, 3)


def test_protonet_logits_equal_closed_form():
    """-||f(q) - mean_k f(s_k)||^2, computed with explicit loops, on shuffled support."""
    torch.manual_seed(0)
    method = PrototypicalNetwork(nn.Flatten())  # embedding = raw pixels: exact reference
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2])
    support = torch.randn(9, 1, 2, 3)
    query = torch.randn(5, 1, 2, 3)
    expected = torch.empty(5, 3)
    for i in range(5):
        for c in range(3):
            members = [support[j].flatten() for j in range(9) if labels[j] == c]
            proto = sum(members) / len(members)
            expected[i, c] = -sum((query[i].flatten()[d] - proto[d]) ** 2 for d in range(6))
    logits = method.adapt(support, labels)(query)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_protonet_conv4_matches_explicit_loops(batch):
    method = make_method("protonet").eval()
    with torch.no_grad():
        logits = method.query_logits(batch)
        for t, episode in enumerate(batch):
            s = method.backbone(episode.support)
            q = method.backbone(episode.query)
            for c in range(batch.ways):
                proto = s[episode.support_labels == c].mean(0)
                want = -((q - proto) ** 2).sum(-1)
                torch.testing.assert_close(logits[t, :, c], want, rtol=1e-4, atol=1e-3)


def test_prototypes_independent_of_support_order(templates):
    batch = synthetic_batch(templates, tasks=2, ways=5, shots=3, queries=2, seed=3)
    method = make_method("protonet").eval()
    with torch.no_grad():
        ordered = method.query_logits(batch)
        shuffled = method.query_logits(shuffled_batch(batch, seed=1))
    torch.testing.assert_close(ordered, shuffled, rtol=1e-5, atol=1e-4)


def test_class_aggregate_uneven_shots_and_feature_maps():
    emb = torch.arange(12.0).view(4, 3)  # four examples, three features
    labels = torch.tensor([1, 0, 1, 1])
    means = class_aggregate(emb, labels, 2, "mean")
    torch.testing.assert_close(means[0], emb[1])
    torch.testing.assert_close(means[1], emb[[0, 2, 3]].mean(0))
    maps = torch.randn(2, 4, 3, 2, 2)  # (T, S, C, h, w)
    lab = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    sums = class_aggregate(maps, lab, 2, "sum")
    assert sums.shape == (2, 2, 3, 2, 2)
    torch.testing.assert_close(sums[1, 1], maps[1, 0] + maps[1, 1])


def test_protonet_cosine_logits():
    torch.manual_seed(0)
    method = PrototypicalNetwork(nn.Flatten(), distance="cosine", scale=5.0)
    labels = torch.tensor([0, 1, 1, 0])
    support = torch.randn(4, 1, 2, 2)
    query = torch.randn(3, 1, 2, 2)
    logits = method.adapt(support, labels)(query)
    for c in range(2):
        proto = support[labels == c].flatten(1).mean(0)
        for i in range(3):
            cos = torch.nn.functional.cosine_similarity(query[i].flatten(), proto, dim=0)
            assert logits[i, c].item() == pytest.approx(5.0 * cos.item(), abs=1e-5)
    assert method.describe()["distance"] == "cosine"
    assert "log_scale" not in dict(method.named_parameters())


def test_protonet_learnable_scale_gets_gradient(batch):
    method = make_method("protonet-cosine")
    assert method.scale.item() == pytest.approx(10.0)
    loss, _ = method.loss(batch)
    loss.backward()
    assert method.log_scale.grad is not None and method.log_scale.grad.abs() > 0


# --------------------------------------------------------------------------
# Matching Networks
# --------------------------------------------------------------------------


def test_matching_attention_and_probabilities_sum_to_one(batch):
    method = make_method("matching").eval()
    with torch.no_grad():
        s = method.backbone(batch.support.flatten(0, 1)).unflatten(0, batch.support.shape[:2])
        q = method.backbone(batch.query.flatten(0, 1)).unflatten(0, batch.query.shape[:2])
        attention = method.attention(q, s)
        log_p = method.query_logits(batch)
    assert attention.shape == (batch.tasks, q.shape[1], s.shape[1])
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(log_p.shape[:-1]))
    # P(y | x, S) = sum_i a(x, x_i) y_i, with y_i one-hot
    one_hot = torch.nn.functional.one_hot(batch.support_labels, batch.ways).float()
    torch.testing.assert_close(log_p.exp(), attention @ one_hot, rtol=1e-5, atol=1e-6)


def test_matching_attention_uses_cosine_similarity():
    method = MatchingNetwork(nn.Flatten())
    support = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).view(2, 1, 1, 2)
    query = torch.tensor([[2.0, 0.0]]).view(1, 1, 1, 2)
    log_p = method.adapt(support, torch.tensor([1, 0]))(query)
    # cosines: 1 (class 1) and 0 (class 0); softmax -> e / (e + 1) for class 1
    assert log_p.exp()[0, 1].item() == pytest.approx(math.e / (math.e + 1), abs=1e-6)


def test_matching_fce_shapes_and_gradients(batch):
    method = make_method("matching-fce")
    log_p = method.query_logits(batch)
    assert log_p.shape == (batch.tasks, batch.query.shape[1], batch.ways)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(log_p.shape[:-1]))
    loss, metrics = method.loss(batch)
    loss.backward()
    for name in ["support_lstm.weight_ih_l0", "support_lstm.weight_hh_l0_reverse"]:
        assert dict(method.named_parameters())[name].grad.abs().sum() > 0, name
    assert method.query_cell.weight_ih.grad.abs().sum() > 0
    assert method.describe()["fce"] is True
    assert isinstance(metrics["loss"], float)


def test_matching_fce_changes_embeddings(batch):
    """Full-context embeddings must actually depend on the rest of the support set."""
    method = make_method("matching-fce").eval()
    g = torch.randn(1, 4, 16)
    with torch.no_grad():
        full = method.embed_support(g)
        alone = method.embed_support(g[:, :1])
    assert not torch.allclose(full[:, 0], alone[:, 0])


def test_matching_fce_requires_features():
    with pytest.raises(ValueError, match="features"):
        MatchingNetwork(Conv4(), fce=True)


# --------------------------------------------------------------------------
# Relation Networks
# --------------------------------------------------------------------------


def test_relation_shapes_and_scores_in_unit_interval(batch):
    method = make_method("relation")
    assert method.feature_shape == (16, 7, 7)  # only the first two blocks pool
    scores = method.query_logits(batch)
    assert scores.shape == (batch.tasks, batch.query.shape[1], batch.ways)
    assert ((scores >= 0) & (scores <= 1)).all()
    predictor = method.adapt(batch[0].support, batch[0].support_labels)
    assert predictor(batch[0].query).shape == (batch.query.shape[1], batch.ways)
    assert method.describe()["loss"] == "mse"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_relation_compare_equals_concatenated_pairs(training, lead):
    """The split first convolution gives the concatenated pairs' relations and gradients.

    Float64, batch statistics over all pairs (training) or running ones
    (eval), one task or several at once; the pairs are built here by hand in
    the paper's order (class channels first, then query), query-major.
    """
    torch.manual_seed(0)
    module = RelationNetwork(IMAGE, hidden=8).relation.double().train(training)
    if not training:  # running statistics that are not the identity
        for bn in (module.convs[0][1], module.convs[1][1]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    m, n, c = 6, 4, 8
    classes = torch.randn(*lead, n, c, 7, 7, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(*lead, m, c, 7, 7, dtype=torch.float64, requires_grad=True)
    reference = copy.deepcopy(module)

    got = module.compare(classes, queries)
    q = queries.unsqueeze(-4).expand(*lead, m, n, c, 7, 7)
    p = classes.unsqueeze(-5).expand(*lead, m, n, c, 7, 7)
    want = reference(torch.cat([p, q], dim=-3).reshape(-1, 2 * c, 7, 7)).view(*lead, m, n)
    assert got.shape == (*lead, m, n)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(  # the benchmark's reference builds the same pairs
        copy.deepcopy(reference).compare_concatenated(classes, queries), want, rtol=0, atol=0
    )

    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), [classes, queries, *module.parameters()])
    wants = torch.autograd.grad((want * weights).sum(), [classes, queries, *reference.parameters()])
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    if training:  # the running statistics took in the same batch statistics
        for a, b in zip(module.buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("lead", "block"), [((), "queries"), ((3,), "queries"), ((3,), "tasks")])
def test_relation_test_time_pairs_in_blocks_equal_one_call(lead, block, monkeypatch):
    """At test time the pairs are scored in blocks (whole tasks, or a task's queries), with
    one call's numbers; with batch statistics in the relation module, in one call."""
    torch.manual_seed(0)
    method = RelationNetwork(IMAGE, hidden=8).double().eval()
    for bn in (method.relation.convs[0][1], method.relation.convs[1][1]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    m, n, c = 7, 4, 8
    classes = torch.randn(*lead, n, c, 7, 7, dtype=torch.float64)
    queries = torch.randn(*lead, m, c, 7, 7, dtype=torch.float64)
    whole = method.relation.compare(classes, queries)

    pair = 8 * 7 * 7  # first relation layer: 8 channels of 7x7
    if block == "queries":  # 3 queries a call
        monkeypatch.setattr(relation_module, "PAIR_BLOCK_ELEMENTS", 3 * n * pair)
        expected_calls = math.prod(lead) * math.ceil(m / 3)
    else:  # 2 tasks a call
        monkeypatch.setattr(relation_module, "PAIR_BLOCK_ELEMENTS", 2 * m * n * pair)
        expected_calls = math.ceil(math.prod(lead) / 2)
    with counting_calls(method.relation.fc) as calls:
        blocked = method.relations(queries, classes)
    assert len(calls) == expected_calls
    assert blocked.shape == (*lead, m, n)
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12)

    convert_batchnorm(method.relation)  # relations normalised by their batch: never cut
    with counting_calls(method.relation.fc) as calls:
        together = method.relations(queries, classes)
    assert len(calls) == 1
    torch.testing.assert_close(together, method.relation.compare(classes, queries), rtol=0, atol=0)


def test_relation_miniimagenet_shape():
    torch.manual_seed(0)
    method = RelationNetwork((3, 84, 84), hidden=8)
    assert method.feature_shape == (8, 21, 21)
    support = torch.randn(6, 3, 84, 84)
    scores = method.adapt(support, torch.tensor([0, 1, 2, 0, 1, 2]))(torch.randn(4, 3, 84, 84))
    assert scores.shape == (4, 3)


def test_relation_class_feature_is_sum_of_shots():
    """With aggregate="sum", a class's relation depends on the sum of its support maps."""
    torch.manual_seed(0)
    method = RelationNetwork(IMAGE, hidden=8).eval()
    support = torch.randn(4, *IMAGE)
    predictor = method.adapt(support, torch.tensor([0, 1, 0, 1]))
    with torch.no_grad():
        maps = method.embedding(support)
    torch.testing.assert_close(predictor.class_maps[0], maps[0] + maps[2])


def test_relation_mse_loss_value(batch):
    method = make_method("relation").eval()  # eval: both calls see the same BatchNorm stats
    with torch.no_grad():
        loss_eval, _ = method.loss(batch)
        scores = method.query_logits(batch)
    target = torch.nn.functional.one_hot(batch.query_labels, batch.ways).float()
    assert loss_eval.item() == pytest.approx(((scores - target) ** 2).mean().item(), rel=1e-5)


def test_relation_rejects_flat_embedding_and_wrong_images(batch):
    with pytest.raises(ValueError, match="feature maps"):
        RelationNetwork(IMAGE, embedding=Conv4(hidden=8))
    method = RelationNetwork((1, 32, 32), hidden=8)
    with pytest.raises(ValueError, match="image_shape"):
        method.query_logits(batch)


# --------------------------------------------------------------------------
# All methods: one interface
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_batched_query_logits_equal_per_task_adapt(kind, batch):
    method = make_method(kind).eval()
    with torch.no_grad():
        batched = method.query_logits(batch)
        looped = torch.stack([method.adapt(e.support, e.support_labels)(e.query) for e in batch])
    assert batched.shape == (batch.tasks, batch.query.shape[1], batch.ways)
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_batchnorm_statistics_never_mix_episodes(kind, batch):
    """Training: one backbone call per episode, so a meta-batch's loss and gradient are the means of
    its episodes' (what makes a meta-batch split across processes exact); eval: one call in all."""
    method = make_method(kind).double()
    backbone = method.embedding if isinstance(method, RelationNetwork) else method.backbone
    calls: list[int] = []
    backbone.register_forward_hook(lambda _m, inputs, _out: calls.append(inputs[0].shape[0]))
    batch = dataclasses.replace(batch, support=batch.support.double(), query=batch.query.double())
    per_episode = batch.support.shape[1] + batch.query.shape[1]
    start = copy.deepcopy(method.state_dict())
    loss, _ = method.loss(batch)
    assert calls == [per_episode] * batch.tasks
    after_batch = copy.deepcopy(method.state_dict())
    grads = torch.autograd.grad(loss, list(method.parameters()), allow_unused=True)
    parts, running = [], []
    for part in batch.split([1] * batch.tasks):
        for name, module in method.named_modules():  # fresh tensors: autograd holds the used ones
            for key in module._buffers:
                module._buffers[key] = start[f"{name}.{key}" if name else key].clone()
        parts.append(method.loss(part)[0])
        running.append(copy.deepcopy(method.state_dict()))
    mean = torch.stack(parts).mean()
    # running statistics: one update per meta-batch, with the mean of the episodes' statistics
    buffers = [k for k, v in after_batch.items() if "running" in k]
    assert buffers or kind == "matching-fce"
    for key in buffers:
        torch.testing.assert_close(after_batch[key], torch.stack([r[key] for r in running]).mean(0))
        assert not torch.equal(after_batch[key], start[key])
    torch.testing.assert_close(loss, mean)
    expected = torch.autograd.grad(mean, list(method.parameters()), allow_unused=True)
    for g, h in zip(grads, expected, strict=True):
        if g is not None:
            torch.testing.assert_close(g, h)
    method.eval()
    calls.clear()
    with torch.no_grad():
        method.query_logits(batch)
    assert calls == [batch.tasks * per_episode]


@pytest.mark.parametrize("kind", KINDS)
def test_describe_and_metrics(kind, batch):
    method = make_method(kind)
    info = method.describe()
    assert info["method"] == method.name
    assert info["batchnorm"] == "running-stats"
    assert "distance" in info
    loss, metrics = method.loss(batch)
    assert loss.dim() == 0 and loss.requires_grad
    assert isinstance(metrics["loss"], float) and isinstance(metrics["accuracy"], float)
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("kind", ["protonet", "matching", "relation"])
def test_validation_errors(kind, batch):
    method = make_method(kind)
    episode = batch[0]
    missing = episode.support_labels.clone()
    missing[missing == 1] = 0  # class 1 has no support example
    with pytest.raises(EpisodeError, match=r"class\(es\) \[1\]"):
        method.adapt(episode.support, missing)
    with pytest.raises(EpisodeError, match="0..N-1"):
        method.adapt(episode.support, episode.support_labels - 1)
    with pytest.raises(ValueError, match="integer"):
        method.adapt(episode.support, episode.support_labels.float())
    with pytest.raises(ValueError, match="labels"):
        method.adapt(episode.support, episode.support_labels[:-1])
    predictor = method.adapt(episode.support, episode.support_labels)
    with pytest.raises(ValueError, match="query must have shape"):
        predictor(torch.zeros(2, 1, 14, 14))
    bad_query = EpisodeBatch(
        batch.support, batch.support_labels, batch.query, batch.query_labels + batch.ways
    )
    with pytest.raises(EpisodeError, match="query labels"):
        method.loss(bad_query)
    uneven = batch.support_labels.clone()
    uneven[1][uneven[1] == 2] = 0  # task 1 lacks class 2
    with pytest.raises(EpisodeError, match="cover every class"):
        method.query_logits(EpisodeBatch(batch.support, uneven, batch.query, batch.query_labels))


def test_constructor_validation():
    with pytest.raises(ValueError, match="distance"):
        PrototypicalNetwork(Conv4(), distance="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        PrototypicalNetwork(Conv4(), scale=0.0)
    with pytest.raises(ValueError, match="loss"):
        RelationNetwork(IMAGE, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        RelationNetwork((1, 8, 8))


# --------------------------------------------------------------------------
# Learning: lower loss on training tasks, above chance on held-out classes
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_meta_training_learns_and_generalises(kind):
    train_pool = class_templates(40, IMAGE, seed=0)
    held_out_pool = class_templates(40, IMAGE, seed=1)  # classes never seen in training
    fixed = synthetic_batch(train_pool, tasks=4, ways=5, shots=1, queries=4, seed=1000)
    held_out = synthetic_batch(held_out_pool, tasks=8, ways=5, shots=1, queries=4, seed=2000)
    method = make_method(kind)
    optimiser = torch.optim.Adam(method.parameters(), lr=2e-3)
    with torch.no_grad():
        before, _ = method.loss(fixed)
    for step in range(30):
        loss, _ = method.loss(synthetic_batch(train_pool, 2, 5, 1, 3, seed=step))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after, _ = method.loss(fixed)
        method.eval()
        _, metrics = method.loss(held_out)
    assert after.item() < 0.9 * before.item()
    assert metrics["accuracy"] > 0.5  # chance is 0.2


# --------------------------------------------------------------------------
# Test time on batch statistics: an episode's logits are its own
# --------------------------------------------------------------------------


def batch_statistics(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm normalising by its batch, in eval mode too ("batch-stats")."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return module


def batch_stats_method(kind: str) -> Method:
    torch.manual_seed(0)
    if kind == "protonet":
        return PrototypicalNetwork(Conv4(hidden=8, track_running_stats=False))
    if kind == "matching":
        return MatchingNetwork(Conv4(hidden=8, track_running_stats=False), features=8)
    if kind == "relation-embedding":
        return RelationNetwork(IMAGE, hidden=8, embedding=batch_statistics(relation_embedding(1, 8)))
    if kind == "relation-module":  # embedding on running statistics, relation module on batch statistics
        method = RelationNetwork(IMAGE, hidden=8)
        batch_statistics(method.relation)
        return method
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["protonet", "matching", "relation-embedding", "relation-module"])
def test_eval_on_batch_statistics_never_mixes_episodes(kind, batch):
    """In eval mode a batch-stats network normalises each episode by its own statistics: the logits
    of a chunk of episodes are each episode's logits alone, whatever its chunk-mates."""
    method = batch_stats_method(kind).double().eval()
    batch = dataclasses.replace(batch, support=batch.support.double(), query=batch.query.double())
    assert method.describe()["batchnorm"] == ("mixed" if kind.startswith("relation") else "batch-stats")
    with torch.no_grad():
        batched = method.query_logits(batch)
        alone = torch.cat([method.query_logits(episode) for episode in batch.split([1] * batch.tasks)])
        later = method.query_logits(batch.split([1, batch.tasks - 1])[1])
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched[1:], later, rtol=1e-10, atol=1e-12)
