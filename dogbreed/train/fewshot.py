"""Few-shot breed heads from a handful of photos per breed: calibrated cosine prototypes beside the ImageNet head.

The fit is closed-form prototypes plus six calibration numbers, on cached pooled features (the eval crop of every
photo and a few augmented views), so it takes well under a second once the features exist:

- z = normalise(f - mu), mu the mean of every training view;
- a breed ImageNet has, with photos: a * l_c + s_k * cos(z, q_c), q_c = normalise(sum of its views' z + kappa*v*r_c),
  where l_c is the 1000-way log-probability of its ImageNet class and r_c that class's row direction (the ImageNet
  row counts as kappa photos' worth of evidence);
- a breed ImageNet has, without photos: a * l_c + s_0 * cos(z, r_c) + t_0 (it stays as good as zero-shot);
- a breed ImageNet lacks, with photos: s_n * cos(z, q_c) + t_n.

(a, s_k, s_n, t_n) minimise the cross-entropy of the training photos scored against leave-one-photo-out prototypes
(L-BFGS); (s_0, t_0) are then fitted by class dropout (known breeds with photos scored as if they had none). The two
kinds of rows are thus calibrated against each other instead of swamping each other (see README, "New breeds").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dogbreed.breeds.taxonomy import DOG_RANGE

NEG = -1e9
START = torch.tensor([1.0, 10.0, 10.0, 0.0, 10.0, 0.0])  # a, s_k, s_n, t_n, s_0, t_0


@dataclass
class PrototypeFit:
    """What a PrototypeHead holds (dogbreed.vision.models), and the calibration behind it."""

    mu: np.ndarray  # (d,)
    rows: np.ndarray  # (C, d): unit prototypes times their scale
    bias: np.ndarray  # (C,)
    imagenet_index: np.ndarray  # (C,) ImageNet class or -1
    imagenet_weight: float  # a
    calibration: dict[str, float]
    loo_top1: float  # leave-one-photo-out top-1 of the training photos under the fitted numbers

    def load_into(self, head) -> None:
        with torch.no_grad():
            head.mu.copy_(torch.from_numpy(self.mu))
            head.rows.copy_(torch.from_numpy(self.rows))
            head.bias.copy_(torch.from_numpy(self.bias))
            head.imagenet_index.copy_(torch.from_numpy(self.imagenet_index))
            head.imagenet_weight.fill_(self.imagenet_weight)


def fit_prototypes(X: np.ndarray, views: np.ndarray | None, y: np.ndarray, imagenet_index: np.ndarray,
                   W: np.ndarray, b: np.ndarray, kappa: float = 4.0, ridge: float = 1e-3, groups: int = 5,
                   seed: int = 0) -> PrototypeFit:
    """Fit the head on X (n, d) eval-crop features, views (n, V, d) augmented ones (V may be 0), labels y (n,) in
    0..C-1, the classes' ImageNet indices (C,) (-1: none) and the ImageNet classifier W (1000, d), b (1000,)."""
    X, W, b = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b)
    y = torch.as_tensor(y, dtype=torch.long)
    C, n = len(imagenet_index), len(X)
    known = torch.as_tensor(np.asarray(imagenet_index) >= 0)
    idx = torch.as_tensor(np.where(imagenet_index >= 0, imagenet_index, 0))
    V = torch.cat([X[:, None], torch.as_tensor(views, dtype=torch.float32)], 1) if views is not None and len(views[0]) \
        else X[:, None]
    v = V.shape[1]
    flat, owner = V.reshape(n * v, -1), torch.arange(n).repeat_interleave(v)
    mu = flat.mean(0)
    Z = F.normalize(flat - mu, dim=1)
    S = torch.zeros(C, Z.shape[1]).index_add_(0, y[owner], Z)
    count = torch.zeros(C).index_add_(0, y[owner], torch.ones(len(owner)))
    R = torch.zeros(C, Z.shape[1])
    R[known] = F.normalize(W[idx[known]] - W[list(DOG_RANGE)].mean(0), dim=1)
    prior = kappa * v * R
    Q = F.normalize(S + prior, dim=1)
    has = count > 0
    # Each training photo against prototypes without its own views (leave one photo out).
    own = torch.zeros(n, Z.shape[1]).index_add_(0, owner, Z)
    rest = count[y] - v
    Zx = F.normalize(X - mu, dim=1)
    L = torch.log_softmax(X @ W.T + b, 1)[:, idx] * known.float()
    cos = Zx @ Q.T
    ar = torch.arange(n)
    cos[ar, y] = (Zx * F.normalize(S[y] + prior[y] - own, dim=1)).sum(1)
    has_loo = has[None].repeat(n, 1)
    has_loo[ar, y] = rest > 0
    cos_row = Zx @ R.T

    def scores(p, h, k0, c):
        a, sk, sn, tn, s0, t0 = p
        kp, nw = (known[None] & h).float(), ((~known[None]) & h).float()
        s = a * L + sk * c * kp + (s0 * c + t0) * k0.float() + (sn * c + tn) * nw
        return s.masked_fill(~(known[None] | h), NEG)

    def fit(p0, free, terms):
        p = p0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([p], lr=1, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            q = p0 + (p - p0) * free
            loss = sum(F.cross_entropy(scores(q, h, k0, c)[ok], y[ok]) for h, k0, c, ok in terms) / len(terms)
            loss = loss + ridge * ((q - START) ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return (p0 + (p - p0) * free).detach()

    answerable = known[y] | (rest > 0)  # a new breed's only photo cannot be scored against its own prototype
    none = torch.zeros(n, C, dtype=torch.bool)
    p = fit(START, torch.tensor([1.0, 1, 1, 1, 0, 0]), [(has_loo, none, cos, answerable)])
    loo_top1 = float((scores(p, has_loo, none, cos).argmax(1) == y)[answerable].float().mean()) if answerable.any() else 0.0
    with_photos = torch.nonzero(known & has).flatten()
    if len(with_photos):
        order = with_photos[torch.randperm(len(with_photos), generator=torch.Generator().manual_seed(seed))]
        terms = []
        for group in order.chunk(min(groups, len(order))):
            drop = torch.zeros(C, dtype=torch.bool)
            drop[group] = True
            terms.append((has_loo & ~drop[None], drop[None].expand(n, C), torch.where(drop[None], cos_row, cos),
                          answerable))
        p = fit(p, torch.tensor([0.0, 0, 0, 0, 1, 1]), terms)
    a, sk, sn, tn, s0, t0 = p.tolist()
    kp, k0, nw = known & has, known & ~has, ~known & has
    rows = Q * (sk * kp + sn * nw).float()[:, None] + R * (s0 * k0.float())[:, None]
    bias = tn * nw.float() + t0 * k0.float()
    bias = bias.masked_fill(~(known | has), NEG)  # neither: never answered (refused or dropped before fitting)
    return PrototypeFit(mu.numpy(), rows.numpy().astype(np.float32), bias.numpy().astype(np.float32),
                        np.asarray(imagenet_index, dtype=np.int64), float(a),
                        dict(zip(("a", "s_k", "s_n", "t_n", "s_0", "t_0"), map(float, (a, sk, sn, tn, s0, t0)))), loo_top1)
