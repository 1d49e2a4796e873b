"""Matching Networks: classify a query by soft attention over the support set.

Adaptation embeds the support set once (optionally in the context of the
whole set, "full-context embeddings"); prediction attends from each query to
every support example and sums the attention per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data.episodes import EpisodeBatch
from fewshot.methods.base import Method
from fewshot.methods.episode_checks import check_batch, check_query, check_task
from fewshot.methods.protonet import (
    batchnorm_mode,
    classification_metrics,
    embed,
    embed_batch,
)


class MatchingPredictor:
    """Classifies queries by attention over one task's embedded support set."""

    def __init__(
        self,
        method: MatchingNetwork,
        support: torch.Tensor,
        labels: torch.Tensor,
        ways: int,
        example_shape: tuple[int, ...],
    ) -> None:
        self.method = method
        self.support = support  # (S, F), g(x_i, S)
        self.labels = labels  # (S,)
        self.ways = ways
        self.example_shape = example_shape

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        check_query(query, self.example_shape)
        g = self.support.unsqueeze(0)
        f = self.method.embed_query(embed(self.method.backbone, query).unsqueeze(0), g)
        return self.method.log_probs(f, g, self.labels.unsqueeze(0), self.ways)[0]


class MatchingNetwork(Method):
    """Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra,
    NeurIPS 2016, arXiv:1606.04080).

    The prediction for query x is P(y | x, S) = sum_i a(x, x_i) y_i, where
    a is a softmax over the cosine similarities between the query embedding
    f(x) and the support embeddings g(x_i), and y_i is a one-hot label. The
    logits returned are log P(y | x, S), so the softmax of the logits is P
    itself and cross-entropy on them is the paper's negative log-likelihood.

    With ``fce=True`` the embeddings are the paper's full-context embeddings
    (Appendix A.2): g(x_i, S) = g'(x_i) + forward and backward states of a
    bidirectional LSTM run over the support embeddings, and f(x, S) is an
    attention LSTM run for ``fce_steps`` processing steps whose state at each
    step reads (attends over) g(S). The paper feeds the read-out r_{k-1}
    concatenated with the hidden state h_{k-1}; feeding [f'(x), r_{k-1}] as
    the cell input with hidden state h_{k-1} computes the same gates.

    Args:
        backbone: embedding network mapping (B, C, H, W) to (B, F), e.g. Conv4().
        features: F; required when ``fce=True`` (it sizes the LSTMs).
        fce: use full-context embeddings.
        fce_steps: processing steps K of the attention LSTM.
        scale: multiplier of the cosine similarities before the softmax
            (1 in the paper; larger values sharpen the attention).

    BatchNorm in the backbone uses running statistics: batch statistics while
    meta-training (``train()``), running averages at test time (``eval()``).
    """

    name = "matching"

    def __init__(
        self,
        backbone: nn.Module,
        features: int | None = None,
        fce: bool = False,
        fce_steps: int = 5,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if fce and features is None:
            raise ValueError(
                "MatchingNetwork(fce=True) needs `features`, the backbone's embedding size, "
                "e.g. features=backbone.out_features(image_shape)"
            )
        if fce_steps < 1:
            raise ValueError(f"fce_steps must be at least 1, got {fce_steps}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.backbone = backbone
        self.features = features
        self.fce = fce
        self.fce_steps = fce_steps
        self.scale = scale
        if features is not None and fce:
            self.support_lstm = nn.LSTM(features, features, batch_first=True, bidirectional=True)
            self.query_cell = nn.LSTMCell(2 * features, features)

    # -- embeddings ---------------------------------------------------------

    def embed_support(self, g_prime: torch.Tensor) -> torch.Tensor:
        """g(x_i, S) for support embeddings (T, S, F): context from the whole set if fce."""
        if not self.fce:
            return g_prime
        self._check_features(g_prime)
        out, _ = self.support_lstm(g_prime)
        forward, backward = out.chunk(2, dim=-1)
        return g_prime + forward + backward

    def embed_query(self, f_prime: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """f(x, S) for query embeddings (T, M, F) given g(S) (T, S, F): attention LSTM if fce."""
        if not self.fce:
            return f_prime
        self._check_features(f_prime)
        t, m, d = f_prime.shape
        h = f_prime  # h_0 = f'(x): the LSTM output starts at zero, plus the skip
        c = f_prime.new_zeros(t * m, d)
        for _ in range(self.fce_steps):
            attention = torch.softmax(h @ support.transpose(-1, -2), dim=-1)  # (T, M, S)
            readout = attention @ support  # (T, M, F)
            cell_input = torch.cat([f_prime, readout], dim=-1).flatten(0, 1)
            h_hat, c = self.query_cell(cell_input, (h.flatten(0, 1), c))
            h = h_hat.unflatten(0, (t, m)) + f_prime
        return h

    def _check_features(self, z: torch.Tensor) -> None:
        if z.dim() != 3 or z.shape[-1] != self.features:
            raise ValueError(
                f"full-context embeddings expect backbone features of size {self.features}, "
                f"got embeddings of shape {tuple(z.shape[1:])}; pass the backbone's "
                "out_features(image_shape) as `features`"
            )

    # -- attention and output -------------------------------------------------

    def attention(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Attention a(x, x_i) (..., M, S): softmax over support of scaled cosine similarity."""
        return torch.softmax(self._similarity(queries, support), dim=-1)

    def _similarity(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        q = F.normalize(queries, dim=-1)
        s = F.normalize(support, dim=-1)
        return self.scale * (q @ s.transpose(-1, -2))

    def log_probs(
        self, queries: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """log P(y = c | x, S) (..., M, N) = log sum_{i: y_i = c} a(x, x_i), computed stably."""
        log_attention = torch.log_softmax(self._similarity(queries, support), dim=-1)
        member = F.one_hot(labels.long(), ways).bool()  # (..., S, N)
        log_y = torch.zeros(member.shape, dtype=log_attention.dtype, device=member.device)
        log_y = log_y.masked_fill(~member, float("-inf"))
        return torch.logsumexp(log_attention.unsqueeze(-1) + log_y.unsqueeze(-3), dim=-2)

    # -- Method interface -------------------------------------------------------

    def adapt(self, support: torch.Tensor, support_labels: torch.Tensor) -> MatchingPredictor:
        """Embed the support set once (with its full context if fce)."""
        ways = check_task(support, support_labels)
        g = self.embed_support(embed(self.backbone, support).unsqueeze(0))[0]
        return MatchingPredictor(self, g, support_labels, ways, tuple(support.shape[1:]))

    def query_logits(self, batch: EpisodeBatch) -> torch.Tensor:
        """Log-probabilities (T, M, N) for every task, from a single backbone call."""
        ways = check_batch(batch)
        g_prime, f_prime = embed_batch(self.backbone, batch)
        g = self.embed_support(g_prime)
        f = self.embed_query(f_prime, g)
        return self.log_probs(f, g, batch.support_labels, ways)

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Negative log-likelihood of the query labels under P(y | x, S)."""
        check_batch(batch, with_query_labels=True)
        return classification_metrics(self.query_logits(batch), batch.query_labels)

    def describe(self) -> dict[str, object]:
        return {
            "method": self.name,
            "distance": "cosine",
            "scale": self.scale,
            "fce": self.fce,
            "fce_steps": self.fce_steps if self.fce else None,
            "backbone": type(self.backbone).__name__,
            "features": self.features,
            "batchnorm": batchnorm_mode(self.backbone),
        }
