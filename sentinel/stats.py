"""Tensor summaries and the distances between a summary and the EMA baseline.

A checked tensor ``x`` has shape ``[..., D]`` (an activation ``[B, T, D]`` or the gradient of one); its leading dims
are flattened into ``N`` tokens. The summary keeps what the distances need and nothing more:

* ``mean`` and ``std``: per-feature first and second moments over tokens, shape ``[D]``;
* ``quantiles``: for each of the validator's private random unit directions, sorted quantiles of the tokens'
  projections, shape ``[K, Q]`` (the 1-D quantile functions that the sliced Wasserstein distance compares);
* optionally, when the validator also sees a *reference* tensor of the same shape (the stage's input for a forward
  check, the gradient the sender received for a backward check): ``cosine``, the mean per-token cosine similarity
  between ``x`` and the reference, and ``gain``, the log ratio of their norms.

Why a reference: distribution statistics alone cannot see a stale replay (A8) or a sign flip of a symmetric
distribution, because the replayed tensor *is* a perfectly typical activation. The residual stream ties a stage's
output to its input token by token, so the coupling between the two is stable for honest stages and breaks when the
output is not computed from the input. This is the content-aware check the architecture asks the interface to allow.

Every distance is scale-free (relative to the baseline's own scale), so one fence setting serves all boundaries.

Gradients are heavy-tailed per token (a few honest tokens at 10-60x the median norm), so the monitor summarises a
gradient through ``clip_tokens``: each token counts with its norm capped at a multiple of the median token norm
(``SentinelConfig.token_clip_backward``), and one token cannot decide the whole tensor's statistics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

_EPS = 1e-12
_MIN_STABLE = 4


@dataclass
class Summary:
    """Statistics of one tensor (or, for a baseline, their EMA), as float32 numpy arrays on the host.

    The checked tensor may live on a GPU: ``summarize`` reduces it there and copies only these few numbers back (one
    transfer). Everything after that (distances, the EMA, the fences) works on arrays of a few hundred values, where
    numpy's per-call cost is a fraction of torch's: on the 2-core CPU machine the distances took 88 us in torch and
    24 us in numpy for a [256, 128] tensor."""

    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]
    quantiles: np.ndarray  # [K, Q]
    cosine: float | None = None
    gain: float | None = None
    residual: np.ndarray | None = None  # [D] per-feature mean of (x - reference), when a reference was given
    fit: float | None = None  # unexplained fraction of x's projected variance under the monitor's linear predictor
    # from the reference (when it has one): see ``summarize``
    # the reference's own per-feature mean and std ([D] each), for the monitor's input baseline (``input_excess``).
    # Of this one tensor only: an EMA, a clone and a saved state leave them out
    ref_mean: np.ndarray | None = None
    ref_std: np.ndarray | None = None
    tokens: int | None = None  # how many tokens (rows of ``[N, D]``) this summary was measured on; None for an EMA

    def lerp_(self, other: Summary, weight: float) -> None:
        """EMA update in place: ``self = (1 - weight) * self + weight * other``."""
        for name in ("mean", "std", "quantiles"):
            mine = getattr(self, name)
            mine += np.float32(weight) * (getattr(other, name) - mine)
        if other.residual is not None:
            if self.residual is None:
                self.residual = other.residual.copy()
            else:
                self.residual += np.float32(weight) * (other.residual - self.residual)
        if other.cosine is not None:
            self.cosine = other.cosine if self.cosine is None else self.cosine + weight * (other.cosine - self.cosine)
        if other.gain is not None:
            self.gain = other.gain if self.gain is None else self.gain + weight * (other.gain - self.gain)
        if other.fit is not None:
            self.fit = other.fit if self.fit is None else self.fit + weight * (other.fit - self.fit)

    def finite(self) -> bool:
        """Whether every statistic is finite: false for any tensor holding a NaN or an infinity, and for a finite
        one whose statistics overflow float32 (values beyond ~1e19), which no honest stage sends either."""
        arrays = (self.mean, self.std, self.quantiles) + (() if self.residual is None else (self.residual,))
        scalars = tuple(v for v in (self.cosine, self.gain, self.fit) if v is not None)
        return all(np.isfinite(a).all() for a in arrays) and all(math.isfinite(v) for v in scalars)

    def clone(self) -> Summary:
        return Summary(self.mean.copy(), self.std.copy(), self.quantiles.copy(), self.cosine, self.gain,
                       None if self.residual is None else self.residual.copy(), self.fit)  # fmt: skip

    def state_dict(self) -> dict:
        """CPU tensors (loadable with ``torch.load(..., weights_only=True)``)."""
        return {
            "mean": torch.from_numpy(self.mean.copy()),
            "std": torch.from_numpy(self.std.copy()),
            "quantiles": torch.from_numpy(self.quantiles.copy()),
            "cosine": self.cosine,
            "gain": self.gain,
            "residual": None if self.residual is None else torch.from_numpy(self.residual.copy()),
            "fit": self.fit,
            "tokens": self.tokens,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> Summary:
        """Tensors (on any device) or arrays; a state saved before ``residual`` (or ``tokens``) existed loads with
        none."""
        residual, tokens = d.get("residual"), d.get("tokens")
        return cls(host_array(d["mean"]), host_array(d["std"]), host_array(d["quantiles"]), d["cosine"], d["gain"],
                   None if residual is None else host_array(residual), d.get("fit"),
                   tokens=None if tokens is None else int(tokens))  # fmt: skip


def host_array(x) -> np.ndarray:
    """A float32 numpy copy of a tensor (any device) or array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float32)


def make_projections(dim: int, n_projections: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random unit directions ``[D, K]`` for the sliced Wasserstein distance.

    They are private to a validator (derived from its own seed): an attacker who does not know them cannot shape
    its tensor to match the baseline along exactly the directions that are checked.
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(dim, n_projections, generator=g)
    p /= p.norm(dim=0, keepdim=True).clamp_min(_EPS)
    return p.to(device)


@functools.lru_cache(maxsize=64)
def quantile_positions(n_tokens: int, n_quantiles: int) -> np.ndarray:
    """Indices into a sorted column of ``n_tokens`` values at the mid-points of ``n_quantiles`` equal bins."""
    levels = (np.arange(n_quantiles, dtype=np.float64) + 0.5) / n_quantiles
    positions = np.round(levels * (n_tokens - 1)).astype(np.int64)
    positions.flags.writeable = False  # cached and shared
    return positions


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite. Fast path: a finite sum proves it (a NaN or an infinity always makes
    the sum non-finite); only when the sum is not finite (which finite values can also cause, by overflow) is every
    element tested. On a [256, 128] tensor this is ~17 us against ~160 us for ``isfinite(x).all()``."""
    if x.numel() == 0:
        return True
    if not (x.is_floating_point() or x.is_complex()):
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


@functools.lru_cache(maxsize=64)
def _device_positions(n_tokens: int, n_quantiles: int, device: torch.device) -> torch.Tensor:
    """``quantile_positions`` on ``device``, copied there once."""
    return torch.tensor(quantile_positions(n_tokens, n_quantiles), device=device)


def _device_quantiles(proj: torch.Tensor, n_quantiles: int) -> torch.Tensor:
    """``[K, Q]`` float32 on ``proj``'s device: each column of ``proj`` (``[N, K]``) at ``quantile_positions`` once
    sorted (torch sorts on the device; only ``K * Q`` values travel)."""
    index = _device_positions(proj.shape[0], n_quantiles, proj.device)
    return proj.sort(dim=0).values.index_select(0, index).T.float()


def summarize(
    x: torch.Tensor,
    projections: torch.Tensor,
    n_quantiles: int,
    reference: torch.Tensor | None = None,
    predictor: torch.Tensor | None = None,
) -> Summary:
    """Summarise ``x`` (shape ``[..., D]``); ``reference`` must have the same shape when given.

    ``predictor`` (``[D + 1, K]``, with a reference) maps each reference token (and a constant 1) to the projections
    of its ``x`` token (``LinearPredictor``); ``fit`` is then the fraction of the projections' variance it leaves
    unexplained.

    The std is one-pass (``E[x^2] - E[x]^2``, finished in float64): exact enough unless a feature's mean exceeds its
    std ~1000-fold, far from what a residual stream or its gradient shows. A non-finite ``x`` gives a non-finite
    summary (see ``Summary.finite``).

    Two implementations with the same results (tested against each other): on CPU sums and projections are torch
    products and the rest numpy on zero-copy views (cheaper than all-torch, whose per-call cost dominates at a few
    hundred tokens); on a GPU the reductions run on the device and only their few hundred results come to the host,
    in one copy."""
    if x.device.type == "cpu":
        return _summarize_host(x, projections, n_quantiles, reference, predictor)
    return _summarize_device(x, projections, n_quantiles, reference, predictor)


def clip_tokens(
    x: torch.Tensor, reference: torch.Tensor | None, ratio: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` with every token whose norm exceeds ``ratio`` x the median token norm (the lower median, for an even
    count) scaled down to that norm, and the reference's same tokens scaled by the same factors (so that what ``x``
    does to its reference, token by token, is kept). Returns the inputs themselves when no token exceeds it. What the
    summaries see, never what is passed on.

    A non-finite ``x`` stays non-finite (an infinite token becomes NaN, a NaN median clips nothing), so
    ``Summary.finite`` still rejects it; so does a finite ``x`` with a token whose squared norm overflows float32
    (an element above ~1.8e19): it is returned unclipped, and its summaries overflow. Clipped, such a token's factor
    was sqrt(limit / inf) = 0: it and its reference token vanished from the summaries, and a gradient carrying values
    up to 3.4e38 was accepted and passed on (a security review; in the mesh it banned the honest replicas upstream).
    On CPU the per-token arithmetic runs in numpy (~2x cheaper than torch's per-call cost at a few hundred tokens),
    on a GPU on the device."""
    rows = _rows(x)
    if rows.device.type == "cpu":
        flat = rows.numpy()
        sq = np.einsum("ij,ij->i", flat, flat)
        mid = (sq.shape[0] - 1) // 2
        limit = ratio * ratio * float(np.partition(sq, mid)[mid])
        if not sq.max() > limit or np.isinf(sq).any():  # not above: also when the median or the maximum is NaN
            return x, reference
        # sq >= 0 and the limit is finite here: no division warnings (a NaN token's factor is NaN, its token too)
        factors = np.minimum(np.sqrt(limit / np.maximum(sq, _EPS)), 1.0).astype(np.float32)
        scale = torch.from_numpy(factors)[:, None]
    else:
        sq = torch.linalg.vecdot(rows, rows)
        limit = ratio * ratio * sq.median()
        over = sq > limit  # all False when the median is NaN or infinite
        if not bool(over.any()) or bool(torch.isinf(sq).any()):
            return x, reference
        scale = torch.where(over, (limit / sq.clamp_min(_EPS)).sqrt(), torch.ones_like(sq))[:, None]
    clipped = (rows * scale).reshape(x.shape)
    if reference is None:
        return clipped, None
    return clipped, (_rows(reference) * scale).reshape(reference.shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a ``[N, D]`` float32 tensor on its device (a view when it already is one)."""
    return x.detach().reshape(-1, x.shape[-1]).float()


@functools.lru_cache(maxsize=64)
def _ones(n: int, column: bool) -> torch.Tensor:
    """A ``[1, n]`` (or ``[n, 1]``) float32 CPU tensor of ones: sums as products, ~2x cheaper than reductions here."""
    return torch.ones((n, 1) if column else (1, n))


def _summarize_host(x, projections, n_quantiles, reference, predictor) -> Summary:
    # sums are products against a vector of ones and run, like the projections, in torch (which honours
    # torch.set_num_threads and keeps products this small on one thread); the rest is numpy on zero-copy views. Not
    # numpy's BLAS: it runs even these products on every core, and beside other busy processes (a mesh benchmark's
    # pool, a node's other roles) that made the check 3x slower
    xt = _rows(x)
    n_tokens, dim = xt.shape
    ones = _ones(n_tokens, False)
    squares = xt * xt
    with np.errstate(all="ignore"):  # a non-finite or overflowing x gives inf/nan here: Summary.finite() says so
        mean = torch.mm(ones, xt).numpy()[0] / np.float32(n_tokens)
        sq_mean = torch.mm(ones, squares).numpy()[0].astype(np.float64) / n_tokens
        proj_t = torch.mm(projections.T, xt.T).numpy()  # [K, N]: each projection's values as a row, for the sort
        if reference is None:
            return _assemble(mean, sq_mean, _sorted_quantiles(proj_t, n_quantiles), tokens=n_tokens)
        rt = _rows(reference)
        xs, rs = xt.numpy(), rt.numpy()
        ref_mean = torch.mm(ones, rt).numpy()[0] / np.float32(n_tokens)
        ref_sq_mean = torch.mm(ones, rt * rt).numpy()[0].astype(np.float64) / n_tokens
        sq_x = torch.mm(squares, _ones(dim, True)).numpy()[:, 0]
        sq_r = np.einsum("ij,ij->i", rs, rs)
        dots = np.einsum("ij,ij->i", xs, rs)
        fit_sums = None
        if predictor is not None:
            miss = proj_t - torch.mm(predictor[:-1].T, rt.T).numpy()
            miss -= predictor[-1].numpy()[:, None]
            centred = proj_t - proj_t.mean(axis=1, keepdims=True)
            fit_sums = float(np.einsum("ij,ij->", miss, miss)), float(np.einsum("ij,ij->", centred, centred))
        coupling = (ref_mean, ref_sq_mean, sq_x, sq_r, dots, fit_sums)
        return _assemble(mean, sq_mean, _sorted_quantiles(proj_t, n_quantiles), coupling, n_tokens)


def _assemble(
    mean: np.ndarray,
    sq_mean: np.ndarray,
    quantiles: np.ndarray,
    coupling: tuple | None = None,
    tokens: int | None = None,
) -> Summary:
    """The summary from the reductions that both implementations compute: per-feature ``mean`` and mean square
    (``sq_mean``, float64: the variance is one-pass), the projections' ``quantiles`` and, with a reference,
    ``coupling`` = (the reference's per-feature mean and mean square, per-token squared norms of x and of the
    reference, per-token dot products, and (missed, total) projected variance under the predictor, or None), and the
    token count the reductions ran over (``tokens``)."""
    with np.errstate(all="ignore"):  # a non-finite or overflowing x gives inf/nan here: Summary.finite() says so
        std = _std(mean, sq_mean)
        if coupling is None:
            return Summary(mean=mean, std=std, quantiles=quantiles, tokens=tokens)
        ref_mean, ref_sq_mean, sq_x, sq_r, dots, fit_sums = coupling
        ref_std = _std(ref_mean, ref_sq_mean)
        cosine = float((dots / np.sqrt(np.maximum(sq_x * sq_r, _EPS * _EPS))).sum()) / dots.shape[0]
        gain = math.log((float(sq_x.sum()) + _EPS) / (float(sq_r.sum()) + _EPS)) / 2
        fit = None if fit_sums is None else fit_sums[0] / max(fit_sums[1], _EPS)
        return Summary(mean=mean, std=std, quantiles=quantiles, cosine=cosine, gain=gain, residual=mean - ref_mean,
                       fit=fit, ref_mean=ref_mean, ref_std=ref_std, tokens=tokens)  # fmt: skip


def _std(mean: np.ndarray, sq_mean: np.ndarray) -> np.ndarray:
    """Per-feature std (float32) from the mean and the mean square (float64): one-pass, clipped at 0."""
    return np.sqrt(np.maximum(sq_mean - np.square(mean, dtype=np.float64), 0.0)).astype(np.float32)


def _sorted_quantiles(rows: np.ndarray, n_quantiles: int) -> np.ndarray:
    """``[K, Q]``: each row of ``rows`` (sorted in place) at ``quantile_positions``."""
    rows.sort(axis=1)
    return rows[:, quantile_positions(rows.shape[1], n_quantiles)]


def _summarize_device(x, projections, n_quantiles, reference, predictor) -> Summary:
    flat = _rows(x)
    n_tokens, dim = flat.shape
    squares = flat * flat
    parts = [flat.mean(dim=0), squares.mean(dim=0)]
    proj = flat @ projections.to(flat.device)
    if reference is not None:
        ref = _rows(reference)
        parts += [ref.mean(dim=0), (ref * ref).mean(dim=0), squares.sum(dim=1), torch.linalg.vecdot(ref, ref),
                  torch.linalg.vecdot(flat, ref)]  # fmt: skip
        if predictor is not None:
            miss = proj - torch.addmm(predictor[-1], ref, predictor[:-1])
            centred = proj - proj.mean(dim=0)
            parts.append(torch.stack([torch.linalg.vecdot(miss.reshape(-1), miss.reshape(-1)),
                                      torch.linalg.vecdot(centred.reshape(-1), centred.reshape(-1))]))  # fmt: skip
    k = projections.shape[1]
    parts.append(_device_quantiles(proj, n_quantiles).reshape(-1))
    host = torch.cat(parts).cpu().numpy()  # the one copy to the host, and the one wait for the device
    quantiles, host = host[-k * n_quantiles :].reshape(k, n_quantiles), host[: -k * n_quantiles]
    mean, sq_mean = host[:dim], host[dim : 2 * dim].astype(np.float64)
    if reference is None:
        return _assemble(mean, sq_mean, quantiles, tokens=n_tokens)
    sq_x, sq_r, dots = (host[4 * dim + i * n_tokens : 4 * dim + (i + 1) * n_tokens] for i in range(3))
    fit_sums = tuple(host[-2:].tolist()) if predictor is not None else None
    ref_mean, ref_sq_mean = host[2 * dim : 3 * dim], host[3 * dim : 4 * dim].astype(np.float64)
    return _assemble(mean, sq_mean, quantiles, (ref_mean, ref_sq_mean, sq_x, sq_r, dots, fit_sums), n_tokens)


def _joint(gram: torch.Tensor, cross: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The moment matrix ``[[G, C], [C^T, S]]`` of ``[X, y]`` from its blocks (``LinearPredictor``'s older format)."""
    return torch.cat([torch.cat([gram, cross], dim=1), torch.cat([cross.T, second], dim=1)])


class LinearPredictor:
    """A ridge regression, learnt from accepted traffic, of a monitor's checked tensor (its K private projections)
    from its reference, token by token: ``x @ P ~ [reference, 1] @ M``.

    Why: statistics of ``x`` alone, and its cosine with the reference, miss attacks that leave both in range, and the
    first stage is where they miss most (its output is least like its input). A linear map explains most of what an
    honest stage does to the residual stream (measured on ``small`` after 30 steps: 93% of the first stage's projected
    output variance, 99% deeper), while flipping the signs of a random 10% of the output raises the unexplained part
    from ~0.07 to ~0.38 at the first stage (~0.01 to ~0.45 deeper); added noise of 0.1 std moves it by 0.01.

    Every ``every``-th accepted tensor adds the second moments of ``A = [reference, 1, x P]`` over a strided subsample
    of ``tokens`` of its tokens (one ``A^T A`` product, kept on the tensors' device: its blocks are ``X^T X``,
    ``X^T (x P)`` and ``(x P)^T (x P)`` with ``X = [reference, 1]``); every ``refit`` such updates the sums are folded
    into an exponentially decayed mean (``decay`` per update, a CPU float64 tensor: torch's solver honours
    ``torch.set_num_threads`` and took 0.3 ms where numpy's took 1.2-1.9 ms, its BLAS threads fighting the other
    processes) and ``(G + ridge * mean(diag G) * I) M = C`` is solved again. Amortised, a check pays a fraction of one
    small matrix product for it."""

    def __init__(self, every: int, refit: int, decay: float, tokens: int, ridge: float):
        self.every, self.refit, self.decay, self.tokens, self.ridge = every, refit, decay, tokens, ridge
        self.moments: torch.Tensor | None = None  # [D + 1 + K] ** 2 float64 CPU, decayed mean of A^T A / rows
        self._split = 0  # D + 1: where the reference's block of ``moments`` ends
        self.offered = 0  # accepted tensors offered to ``update``
        self.weights: torch.Tensor | None = None  # [D + 1, K] float64 CPU, the solved M
        self.expected: float | None = None  # the unexplained fraction M leaves of the traffic it was fitted on
        self.solves = 0
        self._device_weights: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None  # A^T A since the last fold, on the tensors' device
        self._rows = 0
        self._pending = 0  # updates in ``_sums``

    @property
    def gram(self) -> torch.Tensor | None:
        """``X^T X / rows`` (decayed), ``[D + 1, D + 1]``."""
        return None if self.moments is None else self.moments[: self._split, : self._split]

    @property
    def cross(self) -> torch.Tensor | None:
        """``X^T (x P) / rows`` (decayed), ``[D + 1, K]``."""
        return None if self.moments is None else self.moments[: self._split, self._split :]

    @property
    def second(self) -> torch.Tensor | None:
        """``(x P)^T (x P) / rows`` (decayed), ``[K, K]``."""
        return None if self.moments is None else self.moments[self._split :, self._split :]

    def matrix(self, device: torch.device) -> torch.Tensor | None:
        """``M`` on ``device`` (None until the first solve)."""
        if self.weights is None:
            return None
        if self._device_weights is None or self._device_weights.device != device:
            self._device_weights = self.weights.float().to(device)
        return self._device_weights

    def update(self, x: torch.Tensor, reference: torch.Tensor, projections: torch.Tensor) -> None:
        """Fold an accepted tensor in (every ``every``-th one; a strided subsample of ``tokens`` of its tokens)."""
        self.offered += 1
        if (self.offered - 1) % self.every:
            return
        dim = x.shape[-1]
        flat = x.detach().reshape(-1, dim)
        stride = max(1, flat.shape[0] // self.tokens)
        rows_r = reference.detach().reshape(-1, dim)[::stride].float()
        target = flat[::stride].float() @ projections.to(rows_r.device)
        ones = torch.ones(rows_r.shape[0], 1, device=rows_r.device)
        aug = torch.cat([rows_r, ones, target], dim=1)
        if self._sums is not None and self._sums.device != aug.device:
            self._sums = self._sums.to(aug.device)
        if self._sums is None or self._sums.shape[0] != aug.shape[1] or self._split != dim + 1:
            self._sums, self._rows, self._pending = aug.T @ aug, 0, 0
            if self.moments is not None and self.moments.shape[0] != aug.shape[1]:
                self.moments = None  # another width: start over
            self._split = dim + 1
        else:
            self._sums.addmm_(aug.T, aug)
        self._rows += aug.shape[0]
        self._pending += 1
        if self.weights is None or self._pending >= self.refit:
            self._fold()

    def _fold(self) -> None:
        fresh = self._sums.double().cpu() / self._rows
        if self.moments is None:
            self.moments = fresh
        else:
            self.moments.lerp_(fresh, 1.0 - self.decay**self._pending)
        self._sums, self._rows, self._pending = None, 0, 0
        self.solve()

    def solve(self) -> None:
        if self.moments is None:
            return
        gram, cross, second = self.gram, self.cross, self.second
        ridge = self.ridge * max(float(gram.diagonal().mean()), _EPS)
        regularised = gram.clone()
        regularised.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(regularised)
        if int(info) != 0:
            return  # keep the previous solution
        weights = torch.cholesky_solve(cross, factor)
        if not bool(torch.isfinite(weights).all()):
            return
        self.weights = weights
        # what this M leaves unexplained of the traffic it was fitted on: E|y - X M|^2 / E|y - mean y|^2, from the
        # moments (X's last column is 1, so the last row of C is the mean of y). E|y - X M|^2 = tr(S) - 2 <M, C> +
        # <M, G M>, and G M = C - ridge * M, so it is tr(S) - <M, C> - ridge * |M|^2.
        missed = torch.trace(second) - torch.sum(weights * cross) - ridge * torch.sum(weights * weights)
        total = torch.trace(second) - torch.sum(cross[-1] ** 2)
        self.expected = float(missed / total.clamp_min(_EPS)) if float(total) > 0 else None
        self.solves += 1
        self._device_weights = None

    def state_dict(self) -> dict:
        """The decayed moments, the solution and the sums since the last fold (CPU tensors)."""
        return {
            "moments": None if self.moments is None else self.moments.clone(),
            "split": self._split,
            "weights": None if self.weights is None else self.weights.clone(),
            "expected": self.expected,
            "solves": self.solves,
            "offered": self.offered,
            "sums": None if self._sums is None else self._sums.detach().cpu().clone(),
            "rows": self._rows,
            "pending": self._pending,
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a ``state_dict``; one saved with separate ``gram``, ``cross``, ``second`` (and ``sums`` as their
        tuple) loads too."""
        if "moments" in d:
            self.moments = None if d["moments"] is None else d["moments"].double().cpu().clone()
            self._split = int(d["split"])
            self._sums = None if d.get("sums") is None else d["sums"].clone()  # moved to the data's device on use
        else:
            self._split = 0 if d["gram"] is None else d["gram"].shape[0]
            has_moments = d["gram"] is not None and d.get("second") is not None
            self.moments = _joint(d["gram"], d["cross"], d["second"]).double().cpu() if has_moments else None
            self._sums = None if d.get("sums") is None else _joint(*d["sums"])
        self.expected, self.solves = d.get("expected"), int(d.get("solves", 0))
        self.offered = int(d["offered"])
        self._rows, self._pending, self._device_weights = int(d.get("rows", 0)), int(d.get("pending", 0)), None
        self.weights = None if d.get("weights") is None else d["weights"].double().cpu().clone()
        if self.weights is None:
            self.solve()


# --- distances: each takes (summary, baseline) and returns a non-negative float; larger = more anomalous ---------


def l1_distance(s: Summary, b: Summary) -> float:
    """Mean absolute difference of the per-feature means, in units of the baseline's mean feature std.

    Sees shifts of location: zeros, constants, biases, replays of another distribution.
    """
    return mean_shift(s.mean - b.mean, b.std)


def mean_shift(shift: np.ndarray, std: np.ndarray) -> float:
    """``l1_distance`` from the difference of the means, ``shift``, and the baseline's ``std`` (for callers that
    keep the difference: the monitor's input stream updates its EMA with it)."""
    return float(np.abs(shift).sum()) / max(float(std.sum()), _EPS)  # the 1/D of both means cancels


def l2_distance(s: Summary, b: Summary) -> float:
    """Normalised Euclidean distance between the per-feature std profiles: ||s.std - b.std|| / ||b.std||.

    Sees changes of spread: added noise, rescaling, random values, constants and zeros (spread 0). Kept apart from
    the means on purpose: in a residual stream the feature means are large and vary from batch to batch, and
    folding them into one vector would drown a doubling of the variance.
    """
    return spread_shift(s.std - b.std, b.std)


def spread_shift(spread: np.ndarray, std: np.ndarray) -> float:
    """``l2_distance`` from the difference of the stds, ``spread``, and the baseline's ``std``."""
    return math.sqrt(float(spread @ spread) / max(float(std @ std), _EPS))


def sign_flip_ratio(s: Summary, b: Summary) -> float:
    """Fraction of the baseline's sign-stable features whose per-feature mean has the opposite sign (or is zero).

    Only features whose baseline mean is at least half their baseline std count: the sign of a feature whose mean
    is near zero is sampling noise, while a feature with a large consistent mean flips only if someone flips it
    (scaling by -1, random signs, a bias pattern, zeros). 0.0 when fewer than 4 features are sign-stable.
    """
    stable = np.abs(b.mean) >= 0.5 * b.std
    n_stable = int(np.count_nonzero(stable))
    if n_stable < _MIN_STABLE:  # one or two features are no evidence
        return 0.0
    flipped = (np.sign(s.mean) != np.sign(b.mean)) & stable
    return int(np.count_nonzero(flipped)) / n_stable


def sliced_wasserstein(s: Summary, b: Summary) -> float:
    """Mean 1-D Wasserstein-1 distance between projected token distributions, over the baseline's spread."""
    w1 = float(np.abs(s.quantiles - b.quantiles).sum()) / b.quantiles.size  # (ndarray.mean costs 4x a sum here)
    spread = float(np.abs(b.quantiles[:, -1] - b.quantiles[:, 0]).sum()) / b.quantiles.shape[0]
    return w1 / max(spread, _EPS)


def cosine_shift(s: Summary, b: Summary) -> float:
    """How far the mean token cosine between tensor and reference moved from its baseline (0 if no reference)."""
    if s.cosine is None or b.cosine is None:
        return 0.0
    return abs(s.cosine - b.cosine)


def fit_shift(s: Summary, b: Summary) -> float:
    """How far the part of x's projected variance that the linear predictor misses moved from its baseline (a
    fraction: 0 = fully explained). Only measured once the monitor has a predictor (see ``applicable``)."""
    if s.fit is None or b.fit is None:
        return 0.0
    return abs(s.fit - b.fit)


def gain_shift(s: Summary, b: Summary) -> float:
    """How far log(||x|| / ||reference||) moved from its baseline (0 if no reference). Sees pure rescaling."""
    if s.gain is None or b.gain is None:
        return 0.0
    return abs(s.gain - b.gain)


DISTANCES = {
    "l1": l1_distance,
    "l2": l2_distance,
    "sign_flip": sign_flip_ratio,
    "wasserstein": sliced_wasserstein,
    "cosine": cosine_shift,
    "gain": gain_shift,
    "fit": fit_shift,
}


def applicable(name: str, s: Summary, b: Summary) -> bool:
    """Whether distance ``name`` is measured between ``s`` and ``b``: ``fit`` only once both carry one (a monitor's
    first tensors come before its predictor); every other distance always (0 where it has nothing to compare)."""
    return name != "fit" or (s.fit is not None and b.fit is not None)


def distances(s: Summary, b: Summary, metrics: tuple[str, ...]) -> dict[str, float]:
    """The selected distances of ``s`` from the baseline ``b`` that apply (see ``applicable``)."""
    return {name: DISTANCES[name](s, b) for name in metrics if applicable(name, s, b)}


def mann_whitney_greater(x, y) -> float:
    """One-sided p-value that ``x`` tends to exceed ``y`` (Mann-Whitney U, normal approximation with tie and
    continuity corrections; sound from about 8 values a side). NaN counts as the largest value."""
    a = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=np.inf)
    b = np.nan_to_num(np.asarray(y, dtype=np.float64), nan=np.inf)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_greater needs values on both sides")
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # average rank of each distinct value (ties share it)
    u = float(mean_rank[inverse[:n1]].sum()) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    ties = float((counts.astype(np.float64) ** 3 - counts).sum())
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return 1.0  # every value equal
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2.0))
