"""Scores: how bad a candidate quantization of a row is. Spec: shared/spec/logart-reference.md §3.1, §4.5.

A score maps row errors `dW = Q - W` (rows view, [..., R, C]) to one number per row ([..., R]); the leading
dimensions are candidates, so a whole batch of candidates is scored by one matmul.

* `WeightSSE`: sum of dW^2 (data-free; the CNN/ViT `tensor_wise` objective).
* `LayerOutputScore`: the squared error, per output channel, of the layer's output (after the activation that
  follows it) on a few calibration inputs, against the full-precision network's output of that layer: the
  original CNN pipeline's `layer_wise` search (spec §3.1). One forward of the layer per candidate; its proxy is
  the Gram/Hessian score's, so the fast strategy screens candidates by H and scores its best few by forward.
* `HessianScore(H)`: dW H dW^T per row, H = (2/N) sum x x^T over the layer's inputs, already damped by the
  caller. Grouped rows (C < C_in) use the diagonal block of H of their group: row r of a weight with
  G = C_in / C groups per output channel is group r % G. Per-tensor rows (C a multiple of C_in) sum the form
  over their output channels.

Every score also offers a `proxy`: a separable-plus-low-rank approximation

    score(dW) ~= sum_j d_j dW_j^2 + sum_t (u_t . dW)^2

that the fast search (`fpcs.py`) evaluates from sorted prefix sums without forming dW. For WeightSSE it is
exact; for H it keeps H's diagonal exactly and its top eigen-directions (the mean / massive-activation
directions of LLM inputs, which the diagonal alone misses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logart.errors import LogartError


@dataclass(frozen=True)
class Proxy:
    """score(dW) ~= sum_j diag[g, j] dW_j^2 + sum_t (lowrank[t, g] . dW)^2 for a row of group g = r % G.

    diag: float32 [G, C], non-negative. lowrank: float32 [r, G, C] (directions scaled by sqrt(eigenvalue))
    or None. exact: the proxy equals the score (up to rounding)."""

    diag: torch.Tensor
    lowrank: torch.Tensor | None = None
    exact: bool = False


class WeightSSE:
    """sum_j dW_j^2 per row."""

    name = "weight_sse"

    def __call__(self, dw: torch.Tensor) -> torch.Tensor:
        return dw.pow(2).sum(-1)

    def proxy(self, cols: int, rank: int = 0) -> Proxy:
        return Proxy(diag=torch.ones(1, cols), exact=True)


class HessianScore:
    """dW H dW^T per row (H [C_in, C_in], damped by the caller)."""

    name = "hessian"

    def __init__(self, H: torch.Tensor):
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise LogartError(f"the Hessian must be a square [C_in, C_in] matrix, got shape {tuple(H.shape)}.",
                              "pass H = (2/N) sum x x^T of the layer's inputs.")
        self.H = H.to(torch.float32)
        self._blocks: dict[int, torch.Tensor] = {}

    @property
    def cols_in(self) -> int:
        return self.H.shape[0]

    def blocks(self, cols: int) -> torch.Tensor:
        """The diagonal blocks [G, cols, cols] of H for rows of `cols` inputs (G = C_in / cols)."""
        if cols not in self._blocks:
            cin = self.cols_in
            if cols > cin or cin % cols:
                raise LogartError(f"rows of {cols} weights do not tile the {cin} inputs of H.",
                                  "use a group size that divides the layer's input size.")
            G = cin // cols
            g = torch.arange(G, device=self.H.device)
            self._blocks[cols] = self.H.view(G, cols, G, cols)[g, :, g, :]
        return self._blocks[cols]

    def __call__(self, dw: torch.Tensor) -> torch.Tensor:
        cols, cin = dw.shape[-1], self.cols_in
        if cols == cin:
            return ((dw @ self.H) * dw).sum(-1)
        if cols > cin:  # per-tensor rows: one quadratic form per output channel inside the row
            if cols % cin:
                raise LogartError(f"rows of {cols} weights do not tile the {cin} inputs of H.",
                                  "use per-channel or group rows for a Hessian score.")
            seg = dw.reshape(*dw.shape[:-1], cols // cin, cin)
            return ((seg @ self.H) * seg).sum((-1, -2))
        hb = self.blocks(cols)
        G = hb.shape[0]
        if dw.shape[-2] % G:
            raise LogartError(f"{dw.shape[-2]} rows are not a whole number of output channels of {G} groups.",
                              "pass the full rows view of the weight.")
        d = dw.reshape(-1, G, cols).transpose(0, 1)                    # [G, rows / G, cols]
        return (torch.bmm(d, hb) * d).sum(-1).transpose(0, 1).reshape(dw.shape[:-1])

    def proxy(self, cols: int, rank: int = 8) -> Proxy:
        """Diagonal plus the top `rank` eigen-directions of each block (the residual's diagonal is kept exact)."""
        cin = self.cols_in
        if cols > cin:  # per-tensor rows: keep the diagonal only
            return Proxy(diag=torch.diagonal(self.H).repeat(cols // cin)[None].clamp(min=0))
        hb = self.blocks(cols)                                          # [G, cols, cols]
        diag = torch.diagonal(hb, dim1=1, dim2=2)
        r = min(rank, cols)
        if r <= 0:
            return Proxy(diag=diag.clamp(min=0))
        lam, vec = top_eigen(hb, r)                                     # [G, r], [G, cols, r]
        lam = lam.clamp(min=0)
        lowrank = (vec * lam.sqrt()[:, None, :]).permute(2, 0, 1)      # [r, G, cols]
        resid = diag - lowrank.pow(2).sum(0)
        return Proxy(diag=resid.clamp(min=0), lowrank=lowrank.contiguous())


def top_eigen(h: torch.Tensor, r: int, iters: int = 4, oversample: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of symmetric PSD matrices h [G, C, C] by randomized subspace iteration (fixed seed, so
    deterministic): about 10 ms for C = 1536 where a full eigh takes 0.5 s. Returns ([G, r], [G, C, r])."""
    G, C, _ = h.shape
    p = min(C, r + oversample)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(C, p, generator=gen).to(h.device).expand(G, C, p)
    for _ in range(iters):
        q, _ = torch.linalg.qr(h @ q)
    t = q.transpose(1, 2) @ h @ q
    lam, v = torch.linalg.eigh(0.5 * (t + t.transpose(1, 2)))        # ascending
    lam, v = lam.flip(-1)[:, :r], v.flip(-1)[:, :, :r]
    return lam, q @ v


class LayerOutputScore:
    """Σ over samples and positions of (act(layer(x; W + dW)) - target)² per output channel (spec §3.1, CNN
    `layer_wise`). `forward(W_hat)` runs the layer with the weight matrix W_hat [O, C] on the search inputs and
    returns its output after the activation, channels on `channel_dim`; `target` is the full-precision
    network's. `fallback`: the score whose proxy screens candidates (HessianScore of the layer's inputs, or
    WeightSSE). Rows must be whole output channels: the error of one channel depends on its whole row only."""

    name = "output"
    whole_layer = True    # the search must pass every row at once (each call is a forward of the whole layer)

    def __init__(self, forward, W: torch.Tensor, target: torch.Tensor, channel_dim: int = 1, fallback=None):
        self.forward, self.W, self.target, self.channel_dim = forward, W, target, channel_dim
        self.fallback = fallback if fallback is not None else WeightSSE()

    @torch.no_grad()
    def __call__(self, dw: torch.Tensor) -> torch.Tensor:
        if tuple(dw.shape[-2:]) != tuple(self.W.shape):
            raise LogartError(f"the layer-output score needs whole output channels as rows ({tuple(self.W.shape)}), "
                              f"got rows of shape {tuple(dw.shape[-2:])}.",
                              "use per-channel quantization (group size -1) with --score output.")
        flat = dw.reshape(-1, *self.W.shape)
        out = torch.empty(flat.shape[0], self.W.shape[0], dtype=torch.float32, device=dw.device)
        for i in range(flat.shape[0]):    # one forward per candidate bounds the memory by one layer output
            err = (self.forward(self.W + flat[i]) - self.target).movedim(self.channel_dim, 0)
            out[i] = err.reshape(err.shape[0], -1).pow(2).sum(1)
        return out.view(dw.shape[:-1])

    def proxy(self, cols: int, rank: int = 8) -> Proxy:
        """The fallback's proxy, never exact for this score (so the fast search scores its best few exactly)."""
        p = self.fallback.proxy(cols, rank) if hasattr(self.fallback, "proxy") else Proxy(torch.ones(1, cols))
        return Proxy(diag=p.diag, lowrank=p.lowrank, exact=False)
