"""Tests of the gradient-based meta-learners (MAML, FOMAML, ANIL, Meta-SGD, Reptile).

Exactness is checked in float64 against references written here with stock
PyTorch (``nn.BatchNorm2d``, ``functional_call``, ``torch.autograd.grad`` in a
loop over tasks) and against finite differences; the vectorised path is
checked against the loop path for every method, batch-norm mode and order
(second-order gradients through F.batch_norm under vmap can be
silently wrong). Short training runs on synthetic tasks check that every
method learns and generalises to held-out classes.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import class_templates, synthetic_batch
from torch import nn
from torch.func import functional_call

from fewshot.data.episodes import EpisodeBatch
from fewshot.errors import EpisodeError
from fewshot.methods.inner_loop import TaskRunner
from fewshot.methods.maml import ANIL, MAML
from fewshot.methods.metasgd import MetaSGD
from fewshot.methods.reptile import Reptile
from fewshot.models.backbones import MLP, Classifier, Conv4, Pool
from fewshot.models.norm import TaskBatchNorm, statistics_from

WAYS = 3
IMAGE = (1, 8, 8)


def tiny_classifier(seed: int = 0, hidden: int = 4, depth: int = 2, pool: Pool = "max") -> Classifier:
    """Conv-4 style net with BatchNorm on 8x8 images, float64."""
    torch.manual_seed(seed)
    backbone = Conv4(1, hidden, depth, track_running_stats=False, pool=pool)
    model = Classifier(backbone, backbone.out_features(IMAGE), WAYS).double()
    with torch.no_grad():  # non-trivial affine parameters, so their gradients matter
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model


def tiny_batch(tasks: int = 3, shots: int = 2, queries: int = 2, seed: int = 1) -> EpisodeBatch:
    templates = class_templates(12, IMAGE, seed=0)
    batch = synthetic_batch(templates, tasks=tasks, ways=WAYS, shots=shots, queries=queries, seed=seed)
    batch.support = batch.support.double()
    batch.query = batch.query.double()
    return batch


def meta_grads(method: nn.Module, batch: EpisodeBatch) -> tuple[float, torch.Tensor]:
    """(loss value, flattened gradient of the returned loss w.r.t. method.parameters())."""
    method.zero_grad()
    loss, _ = method.loss(batch)
    loss.backward()
    flat = torch.cat([p.grad.flatten() for p in method.parameters()])
    return float(loss.detach()), flat


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def reference_maml(
    model: nn.Module,
    batch: EpisodeBatch,
    lr: float,
    steps: int,
    first_order: bool,
    adapt_batchnorm: bool = True,
) -> tuple[float, torch.Tensor]:
    """MAML in its plainest form: stock BatchNorm (batch statistics), one task at a time.

    ``first_order`` detaches the inner gradients after computing them with a graph;
    ``adapt_batchnorm=False`` steps on every parameter but the BatchNorm ones.
    """
    params = dict(model.named_parameters())
    norms = {
        f"{m}.{n}"
        for m, mod in model.named_modules()
        if isinstance(mod, nn.BatchNorm2d)
        for n in ("weight", "bias")
    }
    inner = [k for k in params if adapt_batchnorm or k not in norms]
    total = torch.zeros((), dtype=torch.float64)
    for episode in batch:
        fast = dict(params)
        for _ in range(steps):
            out = functional_call(model, fast, (episode.support,))
            loss = F.cross_entropy(out, episode.support_labels)
            grads = torch.autograd.grad(loss, [fast[k] for k in inner], create_graph=True)
            if first_order:
                grads = [g.detach() for g in grads]
            fast = {**fast, **{k: fast[k] - lr * g for k, g in zip(inner, grads, strict=True)}}
        out = functional_call(model, fast, (episode.query,))
        total = total + F.cross_entropy(out, episode.query_labels) / batch.tasks
    grads = torch.autograd.grad(total, list(params.values()))
    return float(total.detach()), torch.cat([g.flatten() for g in grads])


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("pool", ["max", "stride"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_maml_matches_stock_pytorch_reference(first_order: bool, path: str, pool: Pool) -> None:
    """Both paths equal a plain loop over tasks with nn.BatchNorm2d (transductive), either Conv-4."""
    model = tiny_classifier(pool=pool)
    ref_loss, ref_grad = reference_maml(copy.deepcopy(model), tiny_batch(), 0.3, 2, first_order)
    method = MAML(model, inner_lr=0.3, inner_steps=2, first_order=first_order, path=path)
    loss, grad = meta_grads(method, tiny_batch())
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    assert rel_err(grad, ref_grad) < 1e-8


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_maml_without_batchnorm_adaptation_matches_reference(first_order: bool, path: str) -> None:
    """adapt_batchnorm=False: the inner loop skips the BatchNorm parameters, which are still meta-learned."""
    model = tiny_classifier()
    ref_loss, ref_grad = reference_maml(copy.deepcopy(model), tiny_batch(), 0.3, 2, first_order, False)
    method = MAML(
        model, inner_lr=0.3, inner_steps=2, first_order=first_order, path=path, adapt_batchnorm=False
    )
    loss, grad = meta_grads(method, tiny_batch())
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    assert rel_err(grad, ref_grad) < 1e-8
    _, adapting_all = meta_grads(
        MAML(tiny_classifier(), inner_lr=0.3, inner_steps=2, first_order=first_order), tiny_batch()
    )
    assert rel_err(grad, adapting_all) > 1e-3  # the option changes the meta-gradient
    norms = [p for m in method.model.modules() if isinstance(m, TaskBatchNorm) for p in m.parameters()]
    assert len(norms) == 4 and all(p.grad.abs().max() > 0 for p in norms)
    episode = tiny_batch()[0]
    adapted = method.adapt(episode.support, episode.support_labels).params
    for name, value in method.model.named_parameters():
        same = torch.equal(adapted[name], value.detach())
        if name.endswith((".1.weight", ".1.bias")):  # blocks.i.1 is block i's batch norm
            assert same, name
        elif not name.endswith(".0.bias"):  # conv biases feeding batch norm get zero gradients
            assert not same, name
    assert method.describe()["adapt_batchnorm"] is False


def test_nothing_to_adapt_raises() -> None:
    with pytest.raises(ValueError, match="no parameter to adapt"):
        MAML(nn.Sequential(nn.BatchNorm1d(3)), adapt_batchnorm=False, task="regression")


def test_first_order_differs_from_second_order() -> None:
    """First order is an approximation: on this problem its meta-gradient is visibly different."""
    model = tiny_classifier()
    _, so = meta_grads(MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2), tiny_batch())
    _, fo = meta_grads(MAML(model, inner_lr=0.3, inner_steps=2, first_order=True), tiny_batch())
    assert rel_err(fo, so) > 1e-3


@pytest.mark.parametrize("pool", ["max", "stride"])
def test_second_order_meta_gradient_matches_finite_differences(pool: Pool) -> None:
    """Directional derivatives of the meta-loss equal central finite differences, either Conv-4."""
    method = MAML(
        tiny_classifier(pool=pool), inner_lr=0.3, inner_steps=2, batchnorm="non-transductive", path="vmap"
    )
    batch = tiny_batch(tasks=2)
    _, grad = meta_grads(method, batch)
    params = list(method.parameters())
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6  # the loss has kinks (max-pool, ReLU): keep the step small
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(eps * d)
            plus = float(method.loss(batch)[0].detach())
            for p, d in zip(params, direction, strict=True):
                p.sub_(2 * eps * d)
            minus = float(method.loss(batch)[0].detach())
            for p, d in zip(params, direction, strict=True):
                p.add_(eps * d)
        numeric = (plus - minus) / (2 * eps)
        analytic = float(grad @ torch.cat([d.flatten() for d in direction]))
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


METHODS = {
    "maml": lambda m, **kw: MAML(m, inner_lr=0.3, **kw),
    "maml-per-step-lr": lambda m, **kw: MAML(m, inner_lr=[0.3, 0.2, 0.1], per_step_lr=True, **kw),
    "maml-fixed-batchnorm": lambda m, **kw: MAML(m, inner_lr=0.3, adapt_batchnorm=False, **kw),
    "metasgd": lambda m, **kw: MetaSGD(m, inner_lr=0.3, **kw),
    "metasgd-fixed-batchnorm": lambda m, **kw: MetaSGD(m, inner_lr=0.3, adapt_batchnorm=False, **kw),
    "anil": lambda m, **kw: ANIL(m, inner_lr=0.3, **kw),
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("batchnorm", ["transductive", "non-transductive"])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_path_equals_loop_path(name: str, batchnorm: str, first_order: bool) -> None:
    """Loss, meta-gradient and evaluation logits agree between the two paths (float64)."""
    model = tiny_classifier()
    kw = {"inner_steps": 3, "first_order": first_order, "batchnorm": batchnorm}
    vec = METHODS[name](copy.deepcopy(model), path="vmap", **kw)
    loop = METHODS[name](model, path="loop", **kw)
    batch = tiny_batch()
    loss_v, grad_v = meta_grads(vec, batch)
    loss_l, grad_l = meta_grads(loop, batch)
    assert loss_v == pytest.approx(loss_l, rel=1e-5)
    assert rel_err(grad_v, grad_l) < 1e-5
    torch.testing.assert_close(vec.query_logits(batch), loop.query_logits(batch), rtol=1e-5, atol=1e-8)
    assert vec.describe()["path"] == "vmap" and loop.describe()["path"] == "loop"


def test_chunked_vmap_equals_whole_batch() -> None:
    """Splitting the meta-batch into vmapped chunks changes nothing but memory and speed."""
    model = tiny_classifier()
    batch = tiny_batch(tasks=5)
    whole = meta_grads(MAML(copy.deepcopy(model), inner_steps=2, path="vmap", chunk_size=5), batch)
    chunked = meta_grads(MAML(model, inner_steps=2, path="vmap", chunk_size=2), batch)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-10)
    assert rel_err(chunked[1], whole[1]) < 1e-10


def test_query_logits_match_adapt_predictor() -> None:
    method = MAML(tiny_classifier(), inner_steps=1, inner_steps_test=3, batchnorm="non-transductive")
    batch = tiny_batch()
    logits = method.query_logits(batch)
    for t, episode in enumerate(batch):
        predictor = method.adapt(episode.support, episode.support_labels)
        torch.testing.assert_close(predictor(episode.query), logits[t], rtol=1e-8, atol=1e-10)


def test_non_transductive_queries_use_support_statistics() -> None:
    """A query's prediction does not depend on the other queries, unlike transductive mode."""
    batch = tiny_batch()
    episode = batch[0]
    for mode, independent in [("non-transductive", True), ("transductive", False)]:
        method = MAML(tiny_classifier(), batchnorm=mode)
        predictor = method.adapt(episode.support, episode.support_labels)
        first = episode.query[:1]
        with_some = predictor(torch.cat([first, episode.query[1:2]]))[:1]
        with_others = predictor(torch.cat([first, episode.query[3:]]))[:1]
        assert torch.allclose(with_some, with_others) == independent


def test_task_batchnorm_statistics_from_support_rows() -> None:
    layer = TaskBatchNorm(3).double()
    x = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    with statistics_from(4):
        out = layer(x)
    support = x[:4]
    mean = support.mean(dim=(0, 2, 3), keepdim=True)
    var = support.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + layer.eps))
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True))


# ---------------------------------------------------------------- method-specific behaviour


def test_metasgd_learning_rates_are_meta_learned() -> None:
    method = MetaSGD(tiny_classifier(), inner_lr=0.3)
    before = {k: v.detach().clone() for k, v in method.step_lrs.items()}
    assert all(torch.all(v == 0.3) for v in before.values())
    optimiser = torch.optim.SGD(method.parameters(), lr=0.1)
    meta_grads(method, tiny_batch())
    for key, alpha in method.step_lrs.items():
        assert (
            alpha.grad is not None
            and alpha.shape == dict(method.model.named_parameters())[key.replace("__", ".")].shape
        )
    assert any(alpha.grad.abs().max() > 0 for alpha in method.step_lrs.values())
    optimiser.step()
    assert any(not torch.equal(before[k], v) for k, v in method.step_lrs.items())


def test_metasgd_without_batchnorm_adaptation_learns_no_batchnorm_rates() -> None:
    """adapt_batchnorm=False: no step sizes for batch norm, whose parameters the inner loop leaves alone."""
    method = MetaSGD(tiny_classifier(), inner_lr=0.3, adapt_batchnorm=False)
    norms = set(method._norm_names)
    assert len(norms) == 4  # two blocks' batch-norm weights and offsets
    keys = {key.replace("__", ".") for key in method.step_lrs}
    assert keys == {n for n, _ in method.model.named_parameters()} - norms
    meta_grads(method, tiny_batch())
    assert any(alpha.grad.abs().max() > 0 for alpha in method.step_lrs.values())
    episode = tiny_batch()[0]
    adapted = method.adapt(episode.support, episode.support_labels).params
    for name, value in method.model.named_parameters():
        same = torch.equal(adapted[name], value.detach())
        if name in norms:
            assert same, name
        elif not name.endswith(".0.bias"):  # conv biases feeding batch norm get (near) zero gradients
            assert not same, name
    assert method.describe()["adapt_batchnorm"] is False


def test_per_step_learning_rates_get_gradients() -> None:
    method = MAML(tiny_classifier(), inner_lr=0.3, inner_steps=2, per_step_lr=True)
    meta_grads(method, tiny_batch())
    lrs = dict(method.step_lrs.items())
    assert len(lrs) == len(list(method.model.parameters()))
    assert all(v.shape == (2,) and v.grad is not None for v in lrs.values())
    # Conv biases feeding batch norm cancel out (zero gradient), so their step sizes may not move.
    learnable = {k: v for k, v in lrs.items() if not (k.startswith("backbone") and k.endswith("0__bias"))}
    assert learnable and all(torch.all(v.grad != 0) for v in learnable.values())


def test_anil_adapts_only_the_head() -> None:
    method = ANIL(tiny_classifier(), inner_lr=0.5, inner_steps=2)
    episode = tiny_batch()[0]
    predictor = method.adapt(episode.support, episode.support_labels)
    for name, value in method.model.named_parameters():
        adapted = predictor.params[name]
        if name.startswith("backbone."):
            assert torch.equal(adapted, value.detach()), name
        else:
            assert not torch.equal(adapted, value.detach()), name
    # The backbone is still meta-learned through the query loss.
    meta_grads(method, tiny_batch())
    assert method.model.backbone.blocks[0][0].weight.grad.abs().max() > 0


def test_anil_from_backbone_and_head() -> None:
    torch.manual_seed(0)
    backbone = Conv4(1, 4, 2, track_running_stats=False).double()
    head = nn.Linear(backbone.out_features(IMAGE), WAYS).double()
    method = ANIL(backbone, head)
    loss, metrics = method.loss(tiny_batch())
    assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0


def test_anil_on_sinusoid_mlp_adapts_only_its_head() -> None:
    """The MLP's body is ANIL's backbone: same tensors, so training moves the user's model."""
    torch.manual_seed(0)
    mlp = MLP().double()
    method = ANIL(mlp, inner_lr=0.01, task="regression")
    x = torch.linspace(-5, 5, 10, dtype=torch.float64).view(10, 1)
    predictor = method.adapt(x, torch.sin(x))
    assert torch.equal(predictor.params["backbone.0.weight"], mlp.body[0].weight.detach())
    assert not torch.equal(predictor.params["head.weight"], mlp.head.weight.detach())
    assert method.model.backbone[0].weight is mlp.body[0].weight


def test_reptile_update_matches_its_definition() -> None:
    """On linear regression, one outer SGD step is theta + eps * (mean adapted theta - theta)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    ys = torch.randn(4, 6, 1, generator=gen, dtype=torch.float64)
    batch = EpisodeBatch(xs, ys, xs[:, :2], ys[:, :2])
    lr, steps, eps = 0.05, 4, 0.3
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    adapted_w, adapted_b = [], []
    for t in range(4):  # hand-written SGD on the MSE of a linear model
        w, b = w0.clone(), b0.clone()
        x, y = xs[t], ys[t]
        for _ in range(steps):
            residual = x @ w.t() + b - y  # (6, 1)
            grad_w = 2 * residual.t() @ x / residual.numel()
            grad_b = 2 * residual.sum(0) / residual.numel()
            w, b = w - lr * grad_w, b - lr * grad_b
        adapted_w.append(w)
        adapted_b.append(b)
    expected_w = w0 + eps * (torch.stack(adapted_w).mean(0) - w0)
    expected_b = b0 + eps * (torch.stack(adapted_b).mean(0) - b0)
    for path in ("vmap", "loop"):
        method = Reptile(copy.deepcopy(model), inner_lr=lr, inner_steps=steps, task="regression", path=path)
        optimiser = torch.optim.SGD(method.parameters(), lr=eps)
        loss, metrics = method.loss(batch)
        loss.backward()
        optimiser.step()
        torch.testing.assert_close(method.model.weight.detach(), expected_w)
        torch.testing.assert_close(method.model.bias.detach(), expected_b)
        assert float(loss.detach()) == pytest.approx(metrics["loss"])


def test_reptile_adam_minibatch_inner_loop_matches_the_reference_code() -> None:
    """Inner Adam with beta1 = 0 on shuffled minibatches, its second moment kept across tasks and
    meta-batches (openai/supervised-reptile), written out by hand on linear regression.

    Every task of a meta-batch starts from the kept state; after the meta-batch the state takes in
    the tasks' squared gradients with the decay of all their steps.
    """
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    gen = torch.Generator().manual_seed(1)
    tasks, examples, size, steps = 4, 6, 4, 3
    xs = torch.randn(2, tasks, examples, 3, generator=gen, dtype=torch.float64)
    ys = torch.randn(2, tasks, examples, 1, generator=gen, dtype=torch.float64)
    lr, eps, beta2, tiny = 0.01, 0.5, 0.999, 1e-8
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    v_w, v_b, count = torch.zeros_like(w), torch.zeros_like(b), 0
    expected = []
    for k in range(2):  # two meta-batches
        torch.manual_seed(10 + k)  # the minibatch order: a fresh shuffle for each pass over a task
        orders = [
            torch.cat([torch.randperm(examples) for _ in range(2)])[: steps * size] for _ in range(tasks)
        ]
        adapted_w, adapted_b, ends_w, ends_b = [], [], [], []
        for t in range(tasks):
            aw, ab, mw, mb = w.clone(), b.clone(), v_w.clone(), v_b.clone()
            for s in range(steps):
                rows = orders[t][s * size : (s + 1) * size]
                x, y = xs[k, t, rows], ys[k, t, rows]
                residual = x @ aw.t() + ab - y
                grad_w = 2 * residual.t() @ x / residual.numel()
                grad_b = 2 * residual.sum(0) / residual.numel()
                mw = beta2 * mw + (1 - beta2) * grad_w**2
                mb = beta2 * mb + (1 - beta2) * grad_b**2
                correction = math.sqrt(1 - beta2 ** (count + s + 1))
                aw = aw - lr * correction * grad_w / (mw.sqrt() + tiny)
                ab = ab - lr * correction * grad_b / (mb.sqrt() + tiny)
            adapted_w.append(aw)
            adapted_b.append(ab)
            ends_w.append(mw)
            ends_b.append(mb)
        w = w + eps * (torch.stack(adapted_w).mean(0) - w)
        b = b + eps * (torch.stack(adapted_b).mean(0) - b)
        d, big_d = beta2**steps, beta2 ** (steps * tasks)
        v_w = big_d * v_w + (1 - big_d) * (torch.stack(ends_w).mean(0) - d * v_w) / (1 - d)
        v_b = big_d * v_b + (1 - big_d) * (torch.stack(ends_b).mean(0) - d * v_b) / (1 - d)
        count += tasks * steps
        expected.append((w, b, v_w, v_b))
    for path in ("vmap", "loop"):
        method = Reptile(
            copy.deepcopy(model),
            inner_lr=lr,
            inner_steps=steps,
            inner_batch=size,
            inner_optimizer="adam",
            task="regression",
            path=path,
        )
        optimiser = torch.optim.SGD(method.parameters(), lr=eps)
        for k in range(2):
            torch.manual_seed(10 + k)
            optimiser.zero_grad()
            method.loss(EpisodeBatch(xs[k], ys[k], xs[k, :, :2], ys[k, :, :2]))[0].backward()
            optimiser.step()
            w, b, v_w, v_b = expected[k]
            torch.testing.assert_close(method.model.weight.detach(), w)
            torch.testing.assert_close(method.model.bias.detach(), b)
            torch.testing.assert_close(method.moments.get_buffer("weight"), v_w)
            torch.testing.assert_close(method.moments.get_buffer("bias"), v_b)
        assert int(method.inner_adam_steps) == 2 * tasks * steps
        assert "inner_adam_steps" in method.state_dict()  # checkpointed with the method
        # Evaluation adapts on the whole support set from the kept state and leaves it alone.
        kept = method.moments.get_buffer("weight").clone()
        method.query_logits(EpisodeBatch(xs[0], ys[0], xs[0, :, :2], ys[0, :, :2]))
        assert torch.equal(method.moments.get_buffer("weight"), kept)


def test_reptile_evaluation_minibatches_are_fixed_by_each_episode() -> None:
    """``inner_batch_test``: evaluation adapts on shuffled minibatches of the support set whose order
    depends on the episode alone (not on batching, path or the global generator), as written out here.
    """
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    gen = torch.Generator().manual_seed(2)
    tasks, examples, size, steps, lr = 5, 7, 3, 4, 0.05
    support = torch.randn(tasks, examples, 3, generator=gen, dtype=torch.float64)
    targets = torch.randn(tasks, examples, 1, generator=gen, dtype=torch.float64)
    query = torch.randn(tasks, 4, 3, generator=gen, dtype=torch.float64)
    batch = EpisodeBatch(support, targets, query, torch.zeros(tasks, 4, 1, dtype=torch.float64))

    def reptile(path: str, batch_test: int | None = size) -> Reptile:
        return Reptile(
            copy.deepcopy(model),
            inner_lr=lr,
            inner_steps_test=steps,
            inner_batch_test=batch_test,
            task="regression",
            path=path,
        )

    method = reptile("vmap")
    rng = torch.get_rng_state()
    outputs = method.query_logits(batch)
    assert torch.equal(torch.get_rng_state(), rng)  # training's generator is not drawn from
    order = method._eval_order(support)
    assert order.shape == (tasks, steps * size)
    for t in range(tasks):  # by hand: SGD on the rows of each step, then predict the queries
        w, b = model.weight.detach().clone(), model.bias.detach().clone()
        assert sorted(order[t, :examples].tolist()) == list(range(examples))  # a shuffled pass
        for s in range(steps):
            rows = order[t, s * size : (s + 1) * size]
            residual = support[t, rows] @ w.t() + b - targets[t, rows]
            w = w - lr * 2 * residual.t() @ support[t, rows] / residual.numel()
            b = b - lr * 2 * residual.sum(0) / residual.numel()
        torch.testing.assert_close(outputs[t], query[t] @ w.t() + b)
        torch.testing.assert_close(method.adapt(support[t], targets[t])(query[t]), outputs[t])
    # The same episodes, batched otherwise or on the loop path, adapt the same way.
    parts = [
        EpisodeBatch(*(d[i:j] for d in (support, targets, query, batch.query_labels)))
        for i, j in ((0, 2), (2, 5))
    ]
    torch.testing.assert_close(torch.cat([method.query_logits(p) for p in parts]), outputs)
    torch.testing.assert_close(reptile("loop").query_logits(batch), outputs)
    assert not torch.allclose(reptile("vmap", None).query_logits(batch), outputs)  # minibatches matter
    assert reptile("vmap", examples)._eval_order(support) is None  # a batch as large as the set: full batch
    other = support.clone()
    other[0, 0, 0] += 1.0
    assert not torch.equal(method._eval_order(other)[0], order[0])  # another episode, another order
    assert torch.equal(method._eval_order(other)[1:], order[1:])


@settings(max_examples=50, deadline=None)
@given(
    tasks=st.integers(1, 4),
    examples=st.integers(1, 30),
    size=st.integers(1, 40),
    steps=st.integers(1, 12),
)
def test_reptile_minibatches_walk_through_shuffled_passes(
    tasks: int, examples: int, size: int, steps: int
) -> None:
    """Each task's minibatch rows are consecutive slices of shuffled passes over its examples."""
    method = Reptile(nn.Linear(2, 1), inner_steps=steps, inner_batch=size, task="regression")
    order = method._minibatch_order(tasks, examples, torch.device("cpu"))
    if size >= examples:
        assert order is None  # the whole set every step
        return
    assert order.shape == (tasks, steps * size)
    for rows in order:
        for start in range(0, rows.numel() - examples + 1, examples):
            assert sorted(rows[start : start + examples].tolist()) == list(range(examples))
        tail = rows[rows.numel() - rows.numel() % examples :].tolist()
        assert len(set(tail)) == len(tail) and all(0 <= r < examples for r in tail)


def test_vmap_failure_falls_back_to_loop_with_warning() -> None:
    class Fussy(nn.Module):
        """Data-dependent Python control flow: vmap cannot batch ``.item()``."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, WAYS).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = 1.0 if x.abs().max().item() > 0 else 2.0
            return self.net(x) * scale

    torch.manual_seed(0)
    model = Fussy()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    labels = torch.arange(WAYS).repeat(2).expand(2, -1).clone()
    batch = EpisodeBatch(x, labels, x + 0.1, labels)
    auto = MAML(copy.deepcopy(model), path="auto")
    with pytest.warns(RuntimeWarning, match="loop-over-tasks path"):
        loss_a, grad_a = meta_grads(auto, batch)
    assert auto.describe()["path"] == "loop (vmap fallback)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning
        meta_grads(auto, batch)
    loss_l, grad_l = meta_grads(MAML(model, path="loop"), batch)
    assert loss_a == pytest.approx(loss_l, rel=1e-12)
    assert rel_err(grad_a, grad_l) < 1e-10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inner_steps": -1}, "inner_steps"),
        ({"inner_steps_test": -2}, "inner_steps_test"),
        ({"batchnorm": "running"}, "batchnorm"),
        ({"task": "ranking"}, "task"),
        ({"path": "gpu"}, "path"),
        ({"forward": "fast"}, "forward"),
        ({"inner_lr": -0.1}, "inner_lr"),
        ({"inner_lr": [0.1], "inner_steps": 3}, "inner_lr"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MAML(tiny_classifier(), **kwargs)


def test_fused_forward_needs_conv4() -> None:
    with pytest.raises(ValueError, match="forward='fused'"):
        MAML(MLP(), forward="fused", task="regression")


def test_describe_records_settings() -> None:
    info = MAML(tiny_classifier(), inner_lr=0.4, inner_steps=2, first_order=True).describe()
    assert info["method"] == "maml (first order)" and info["inner_steps"] == 2 and info["inner_lr"] == 0.4
    assert MAML(tiny_classifier()).describe()["method"] == "maml"
    assert Reptile(tiny_classifier(), inner_lr=0.4).describe()["method"] == "reptile"  # first order by name
    assert info["first_order"] is True and info["batchnorm"] == "transductive"
    assert info["path"] in ("auto (not run yet)", "vmap") and info["forward"] == "fused-conv4"


# ---------------------------------------------------------------- learning


def _accuracy(method: nn.Module, batch: EpisodeBatch) -> float:
    logits = method.query_logits(batch)
    return float((logits.argmax(-1) == batch.query_labels).float().mean())


LEARNERS = {
    "maml": lambda m: MAML(m, inner_lr=0.4, inner_steps=1),
    "fomaml": lambda m: MAML(m, inner_lr=0.4, inner_steps=2, first_order=True),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.4),
    "anil": lambda m: ANIL(m, inner_lr=0.4, inner_steps=2),
    "reptile": lambda m: Reptile(m, inner_lr=0.4, inner_steps=3),
    "reptile-adam": lambda m: Reptile(m, inner_lr=0.01, inner_steps=3, inner_batch=3, inner_optimizer="adam"),
}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_method_learns_and_generalises(name: str) -> None:
    """A short run lowers the meta-loss, and held-out classes are classified above chance."""
    torch.manual_seed(0)
    ways, shape = 5, (1, 16, 16)
    backbone = Conv4(1, 16, 4, track_running_stats=False)
    method = LEARNERS[name](Classifier(backbone, backbone.out_features(shape), ways))
    train_pool = class_templates(40, shape, seed=0)
    test_pool = class_templates(20, shape, seed=123)
    held_out = synthetic_batch(test_pool, tasks=20, ways=ways, shots=1, queries=3, seed=7)
    before = _accuracy(method, held_out)
    optimiser = torch.optim.Adam(method.parameters(), lr=3e-3)
    probe = synthetic_batch(train_pool, tasks=16, ways=ways, shots=1, queries=3, seed=999)
    start = float(method.loss(probe)[0].detach())
    for step in range(30):
        batch = synthetic_batch(train_pool, tasks=8, ways=ways, shots=1, queries=3, seed=step)
        optimiser.zero_grad()
        loss, _ = method.loss(batch)
        loss.backward()
        optimiser.step()
    end = float(method.loss(probe)[0].detach())
    assert end < start, (start, end)
    after = _accuracy(method, held_out)
    assert after > max(1.0 / ways + 0.2, before + 0.1), (before, after)


def test_maml_learns_sinusoid_regression() -> None:
    """The MAML paper's sinusoid task: the post-adaptation MSE drops well below its start."""
    torch.manual_seed(0)
    method = MAML(MLP(), inner_lr=0.01, inner_steps=1, task="regression")
    optimiser = torch.optim.Adam(method.parameters(), lr=1e-2)

    def sinusoids(tasks: int, seed: int) -> EpisodeBatch:
        gen = torch.Generator().manual_seed(seed)
        amp = torch.rand(tasks, 1, 1, generator=gen) * 4.9 + 0.1
        phase = torch.rand(tasks, 1, 1, generator=gen) * math.pi
        x = torch.rand(tasks, 20, 1, generator=gen) * 10 - 5
        y = amp * torch.sin(x - phase)
        return EpisodeBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])

    probe = sinusoids(50, seed=10_000)
    start = float(method.loss(probe)[0].detach())
    for step in range(400):
        optimiser.zero_grad()
        loss, metrics = method.loss(sinusoids(10, seed=step))
        loss.backward()
        optimiser.step()
    assert math.isnan(metrics["accuracy"]) and metrics["mse"] >= 0
    assert float(method.loss(probe)[0].detach()) < 0.5 * start


# ---------------------------------------------------------------- user errors, other norms, inference mode

GRADIENT_METHODS = {
    "maml": lambda m, **kw: MAML(m, inner_lr=0.3, inner_steps=2, **kw),
    "anil": lambda m, **kw: ANIL(m, inner_lr=0.3, inner_steps=2, **kw),
    "metasgd": lambda m, **kw: MetaSGD(m, inner_lr=0.3, **kw),
    "reptile": lambda m, **kw: Reptile(m, inner_lr=0.1, inner_steps=2, inner_batch_test=3, **kw),
}


def test_task_runner_remembers_a_fallback_only_when_the_loop_succeeds() -> None:
    """vmap failing means nothing if the loop fails too: the input is at fault; the loop's error is raised."""

    def vectorised() -> object:
        raise RuntimeError("vmap cannot do this")

    def broken_loop() -> object:
        raise ValueError("the loop's own error")

    runner = TaskRunner("auto", "Test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="the loop's own error"):
            runner.run("train", vectorised, broken_loop)
    assert runner.fallback_reason is None and runner.path_for("train") == "auto"
    with pytest.warns(RuntimeWarning, match="vmap cannot do this"):
        assert runner.run("train", vectorised, lambda: 7) == 7
    assert runner.path_for("eval") == "loop" and runner.used() == "loop (vmap fallback)"


def test_auto_path_keeps_vmap_after_a_user_error() -> None:
    """A float32 batch on a float64 model fails on both paths: an error, no warning, and still vmap."""
    method = MAML(tiny_classifier(), inner_lr=0.3, path="auto")
    batch = tiny_batch()
    wrong_dtype = EpisodeBatch(
        batch.support.float(), batch.support_labels, batch.query.float(), batch.query_labels
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in (method.loss, method.query_logits):
            with pytest.raises(RuntimeError):
                call(wrong_dtype)
    assert method.runner.fallback_reason is None and method.describe()["path"] == "auto (not run yet)"
    method.loss(batch)
    method.query_logits(batch)
    assert method.describe()["path"] == "vmap"


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_gradient_methods_refuse_labels_outside_0_to_n_minus_1(name: str) -> None:
    """The metric methods' EpisodeError, not an index error from the loss or a false vmap fallback."""
    method = GRADIENT_METHODS[name](tiny_classifier())
    batch = tiny_batch()
    shifted = EpisodeBatch(batch.support, batch.support_labels + 1, batch.query, batch.query_labels + 1)
    bad_query = EpisodeBatch(batch.support, batch.support_labels, batch.query, batch.query_labels + WAYS)
    support, labels = batch.support[0], batch.support_labels[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in (method.loss, method.query_logits):
            with pytest.raises(EpisodeError, match="cover every class"):
                call(shifted)
            with pytest.raises(EpisodeError, match="query labels must lie in 0..2"):
                call(bad_query)
        with pytest.raises(EpisodeError, match="cover every class"):
            method.adapt(support, labels + 1)
        with pytest.raises(EpisodeError, match="0..N-1, found -1"):
            method.adapt(support, labels - 1)
        with pytest.raises(ValueError, match="integer"):
            method.adapt(support, labels.double())
    assert method.runner.fallback_reason is None
    method.loss(batch)
    assert method.describe()["path"] == "vmap"


def norm_classifier(norm: str, seed: int = 0) -> Classifier:
    """conv -> norm -> ReLU -> linear head on 8x8 images (a parameter-dependent op before the norm),
    float64, with non-trivial affine parameters; "head-LayerNorm" puts the norm in the head instead."""
    torch.manual_seed(seed)
    layers = {
        "LayerNorm": lambda: nn.LayerNorm([4, *IMAGE[1:]]),
        "InstanceNorm2d": lambda: nn.InstanceNorm2d(4, affine=True),
        "GroupNorm": lambda: nn.GroupNorm(2, 4),
        "head-LayerNorm": nn.Identity,
    }
    features = 4 * IMAGE[1] * IMAGE[2]
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layers[norm](), nn.ReLU(), nn.Flatten())
    model = Classifier(backbone, features, WAYS)
    if norm == "head-LayerNorm":
        model.head = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, WAYS))
    model = model.double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "backbone.1." in name or "head.0." in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize(
    ("name", "norm", "layer"),
    [
        ("maml", "LayerNorm", "LayerNorm"),
        ("maml", "InstanceNorm2d", "InstanceNorm2d"),
        ("metasgd", "InstanceNorm2d", "InstanceNorm2d"),
        ("anil", "head-LayerNorm", "LayerNorm"),
    ],
)
def test_second_order_through_affine_layer_or_instance_norm_takes_the_loop(
    name: str, norm: str, layer: str
) -> None:
    """vmap gets these meta-gradients wrong (functorch #534): "auto" loops, with one warning saying
    why, and gives the loop's meta-gradient; "vmap" is refused."""
    make = GRADIENT_METHODS[name]
    batch = tiny_batch()
    _, reference = meta_grads(make(norm_classifier(norm), path="loop"), batch)
    with pytest.warns(RuntimeWarning, match=rf"second-order.*affine {layer}.*vmap") as record:
        method = make(norm_classifier(norm))
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, grad = meta_grads(method, batch)
        method.query_logits(batch)
    assert rel_err(grad, reference) < 1e-10
    assert method.describe()["path"] == "loop (vmap fallback)"
    with pytest.raises(ValueError, match=rf"path='vmap'.*affine {layer}.*Use path='loop'"):
        make(norm_classifier(norm), path="vmap")


@pytest.mark.parametrize(
    ("name", "norm", "kwargs"),
    [
        ("maml", "LayerNorm", {"first_order": True}),
        ("maml", "InstanceNorm2d", {"first_order": True}),
        ("reptile", "LayerNorm", {}),
        ("maml", "GroupNorm", {}),
        ("anil", "LayerNorm", {}),  # the backbone is differentiated once: exact under vmap
    ],
)
def test_norms_vmap_gets_right_stay_on_vmap(name: str, norm: str, kwargs: dict) -> None:
    make = GRADIENT_METHODS[name]
    batch = tiny_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method = make(norm_classifier(norm), **kwargs)
        _, grad = meta_grads(method, batch)
    assert method.describe()["path"] == "vmap"
    _, reference = meta_grads(make(norm_classifier(norm), path="loop", **kwargs), batch)
    assert rel_err(grad, reference) < 1e-10


@pytest.mark.parametrize("path", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_adaptation_under_inference_mode_equals_no_grad(name: str, path: str) -> None:
    """torch.enable_grad() does not lift inference mode: the inner gradients must still be taken there."""
    method = GRADIENT_METHODS[name](tiny_classifier(), path=path)
    batch = tiny_batch()
    episode = batch[1]
    with torch.no_grad():
        expected_logits = method.query_logits(batch)
        expected = method.adapt(episode.support, episode.support_labels)(episode.query)
    with torch.inference_mode():
        logits = method.query_logits(batch)
        predictor = method.adapt(episode.support, episode.support_labels)
        out = predictor(episode.query)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(predictor(episode.query), expected, rtol=1e-10, atol=1e-12)  # outside it too
    assert method.describe()["path"] == path
