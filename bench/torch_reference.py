"""PyTorch eager reference for `flowlab bench`: the same architectures, timed the same way.

Models (the architectures of flowlab's experiment files, written independently for this
benchmark; the parameter counts equal flowlab's):
  coupling    one checkerboard affine coupling, GatedConvNet(1→32→2, 3 gated blocks)
              (flowlab: bench/tutorial_coupling.yaml)
  simple      uniform dequantization + logit + 8 checkerboard couplings (556,312 params)
              (flowlab: experiments/uva_tutorial11.yaml --variant simple)
  vardeq      simple with variational dequantization (4 image-conditioned couplings,
              c_hidden 16): 628,388 params (uva_tutorial11.yaml --variant vardeq)
  multiscale  vardeq → 2 checkerboard couplings → squeeze → 2 channel couplings (48) →
              split → squeeze → 4 channel couplings (64): 1,711,818 params
              (uva_tutorial11.yaml --variant multiscale)
  realnvp     3 checkerboard, squeeze, 3 channel, split, 3 checkerboard, squeeze,
              3 channel, split, 4 checkerboard couplings (GatedConvNet 32): 1,177,559
              params (experiments/glow_vs_realnvp.yaml --variant realnvp)
  glow        2 levels × 12 [ActNorm, LU 1×1 conv, affine coupling (sigmoid scale,
              conv3×3-ReLU-conv1×1-ReLU-conv3×3 net, 192 hidden)], learned prior at the
              split: 1,269,772 params (glow_vs_realnvp.yaml --variant glow)
  affine14    MNIST at 14×14: 2 checkerboard, squeeze, 2 channel, split, 2 checkerboard
              affine couplings (GatedConvNet 24, 1 gated block): 92,058 params
              (experiments/spline_vs_affine.yaml --variant affine)
  spline      the same graph with rational-quadratic spline couplings (8 bins on
              [−13, 13], linear tails, GatedConvNet 12, 1 block): 90,826 params
              (spline_vs_affine.yaml --variant spline). The spline is written the way
              nflows writes it (softmax/cumsum knots, bin search by comparison, gather).
  unconditional  affine14 with Glow's learned priors (split: zero-initialised conv3×3 of
              the kept half; top: per-element mean/log-scale tables): 92,330 params
              (experiments/conditional_mnist.yaml --variant unconditional)
  conditional    the same, class-conditional: one-hot label planes join every coupling
              network's and the split prior's input, one top table pair per digit:
              107,414 params (conditional_mnist.yaml --variant conditional)

Timing matches flowlab bench: random pixel batches, 2 warm-up steps, then the median of
N steps of forward (bpd loss), backward, and Adam with global-norm clipping at 1.0.

    python bench/torch_reference.py --model simple --batch 64 --steps 5 --threads 2
prints one JSON line with variant, batch, fwd_ms, bwd_ms, opt_ms, step_ms, imgs_per_s,
params, torch version and threads.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConcatELU(nn.Module):
    def forward(self, x):
        return torch.cat([F.elu(x), F.elu(-x)], dim=1)


class LayerNormChannels(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedConv(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.net = nn.Sequential(
            ConcatELU(),
            nn.Conv2d(2 * c, h, 3, padding=1),
            ConcatELU(),
            nn.Conv2d(2 * h, 2 * c, 1),
        )

    def forward(self, x):
        val, gate = self.net(x).chunk(2, dim=1)
        return x + val * torch.sigmoid(gate)


class GatedConvNet(nn.Module):
    def __init__(self, c_in, c_hidden=32, c_out=-1, layers=3):
        super().__init__()
        c_out = c_out if c_out > 0 else 2 * c_in
        mods = [nn.Conv2d(c_in, c_hidden, 3, padding=1)]
        for _ in range(layers):
            mods += [GatedConv(c_hidden, c_hidden), LayerNormChannels(c_hidden)]
        mods += [ConcatELU(), nn.Conv2d(2 * c_hidden, c_out, 3, padding=1)]
        self.net = nn.Sequential(*mods)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x)


def checkerboard(h, w, invert):
    m = ((torch.arange(h).view(-1, 1) + torch.arange(w).view(1, -1)) % 2).float()
    m = m.view(1, 1, h, w)
    return 1 - m if invert else m


def channel_mask(c, invert=False):
    m = torch.cat([torch.ones(c // 2), torch.zeros(c - c // 2)]).view(1, c, 1, 1)
    return 1 - m if invert else m


class Coupling(nn.Module):
    def __init__(self, net, mask, c_in):
        super().__init__()
        self.net = net
        self.scaling_factor = nn.Parameter(torch.zeros(c_in))
        self.register_buffer("mask", mask)

    def forward(self, z, ldj, cond=None):
        z_in = z * self.mask
        if cond is not None:
            z_in = torch.cat([z_in, cond], dim=1)
        s, t = self.net(z_in).chunk(2, dim=1)
        f = self.scaling_factor.exp().view(1, -1, 1, 1)
        s = torch.tanh(s / f) * f
        s = s * (1 - self.mask)
        t = t * (1 - self.mask)
        z = (z + t) * torch.exp(s)
        return z, ldj + s.sum(dim=[1, 2, 3])


MIN_BIN = 1e-3


def knots(u, bound):
    """Knot positions (K + 1) and bin sizes (K) on [−B, B] from unconstrained sizes."""
    k = u.shape[-1]
    p = MIN_BIN + (1 - MIN_BIN * k) * torch.softmax(u, dim=-1)
    cum = F.pad(torch.cumsum(p, dim=-1), (1, 0), value=0.0)
    cum = 2 * bound * cum - bound
    cum[..., 0] = -bound
    cum[..., -1] = bound
    return cum, cum[..., 1:] - cum[..., :-1]


def rq_spline(x, raw, bound):
    """Monotonic rational-quadratic spline with linear tails (forward direction): y and
    log dy/dx, elementwise; `raw` has x's shape + [3K − 1]."""
    k = (raw.shape[-1] + 1) // 3
    inside = (x > -bound) & (x < bound)
    y, logd = x.clone(), torch.zeros_like(x)
    xi, r = x[inside], raw[inside]
    cx, w = knots(r[..., :k], bound)
    cy, h = knots(r[..., k : 2 * k], bound)
    shift = math.log(math.expm1(1 - MIN_BIN))
    d = F.pad(MIN_BIN + F.softplus(r[..., 2 * k :] + shift), (1, 1), value=1.0)
    idx = (xi[..., None] >= cx[..., 1:-1]).sum(dim=-1, keepdim=True)
    xk, wk = cx.gather(-1, idx)[..., 0], w.gather(-1, idx)[..., 0]
    yk, hk = cy.gather(-1, idx)[..., 0], h.gather(-1, idx)[..., 0]
    dk, dk1 = d.gather(-1, idx)[..., 0], d[..., 1:].gather(-1, idx)[..., 0]
    s = hk / wk
    t = ((xi - xk) / wk).clamp(0, 1)
    tt = t * (1 - t)
    den = s + (dk + dk1 - 2 * s) * tt
    y[inside] = yk + hk * (s * t**2 + dk * tt) / den
    dnum = s**2 * (dk1 * t**2 + 2 * s * tt + dk * (1 - t) ** 2)
    logd[inside] = torch.log(dnum) - 2 * torch.log(den)
    return y, logd


class SplineCoupling(nn.Module):
    def __init__(self, net, mask, bins, bound):
        super().__init__()
        self.net, self.bins, self.bound = net, bins, bound
        self.register_buffer("mask", mask)

    def forward(self, z, ldj):
        h = self.net(z * self.mask)
        b, ch, hh, ww = h.shape
        per = 3 * self.bins - 1
        raw = h.view(b, ch // per, per, hh, ww).permute(0, 1, 3, 4, 2)
        y, logd = rq_spline(z, raw, self.bound)
        inv = 1 - self.mask
        return z * self.mask + y * inv, ldj + (logd * inv).sum(dim=[1, 2, 3])


def std_normal_logp(z):
    return (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(dim=[1, 2, 3])


def planes(y, z):
    """One-hot labels `y` [B, K] as K constant planes at z's resolution."""
    return y[:, :, None, None].expand(-1, -1, z.shape[2], z.shape[3])


class CondCoupling(Coupling):
    """An affine coupling whose network also sees the label planes."""

    takes_labels = True

    def forward(self, z, ldj, y=None):
        return super().forward(z, ldj, cond=planes(y, z))


class TopPrior(nn.Module):
    """Glow's learned top prior: per-element mean and log-scale tables, one pair per class
    (selected by the one-hot label) or a single pair."""

    def __init__(self, d, classes=0):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(max(classes, 1), d))
        self.log_scale = nn.Parameter(torch.zeros(max(classes, 1), d))

    def forward(self, z, y=None):
        if y is None:
            mean, logs = self.mean[0].view(1, *z.shape[1:]), self.log_scale[0].view(1, *z.shape[1:])
        else:
            mean, logs = (y @ self.mean).view(z.shape), (y @ self.log_scale).view(z.shape)
        e = (z - mean) * torch.exp(-logs)
        return (-0.5 * e**2 - 0.5 * math.log(2 * math.pi) - logs).sum(dim=[1, 2, 3])


class Squeeze(nn.Module):
    def forward(self, z, ldj):
        b, c, h, w = z.shape
        z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, 4 * c, h // 2, w // 2), ldj


class Split(nn.Module):
    """Factors out half the channels under N(0, 1), or under a learned prior conditioned on
    the kept half (Glow: zero-initialised conv3×3 → mean, log-scale)."""

    takes_labels = True

    def __init__(self, c=0, learned=False, classes=0):
        super().__init__()
        self.prior = None
        if learned:
            self.prior = nn.Conv2d(c // 2 + classes, 2 * (c - c // 2), 3, padding=1)
            nn.init.zeros_(self.prior.weight)
            nn.init.zeros_(self.prior.bias)

    def forward(self, z, ldj, y=None):
        c = z.shape[1]
        z, z_out = z[:, : c // 2], z[:, c // 2 :]
        if self.prior is None:
            return z, ldj + std_normal_logp(z_out)
        cond = z if y is None else torch.cat([z, planes(y, z)], dim=1)
        mean, logs = self.prior(cond).chunk(2, dim=1)
        logp = -0.5 * ((z_out - mean) * torch.exp(-logs)) ** 2 - logs - 0.5 * math.log(2 * math.pi)
        return z, ldj + logp.sum(dim=[1, 2, 3])


class ActNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.logs = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, z, ldj):
        hw = z.shape[2] * z.shape[3]
        return (z + self.bias) * torch.exp(self.logs), ldj + hw * self.logs.sum()


class InvConvLU(nn.Module):
    """Glow's invertible 1×1 convolution, W = P·L·(U + diag(sign·e^{log s}))."""

    def __init__(self, c):
        super().__init__()
        w = torch.linalg.qr(torch.randn(c, c))[0]
        p, l, u = torch.linalg.lu(w)
        s = torch.diag(u)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(c, c), -1))
        self.register_buffer("eye", torch.eye(c))
        self.lower = nn.Parameter(l)
        self.upper = nn.Parameter(torch.triu(u, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def forward(self, z, ldj):
        c, hw = z.shape[1], z.shape[2] * z.shape[3]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        w = self.p @ lower @ upper
        return F.conv2d(z, w.view(c, c, 1, 1)), ldj + hw * self.log_s.sum()


class GlowNet(nn.Module):
    def __init__(self, c_in, hidden, c_out):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, hidden, 3, padding=1)
        self.c2 = nn.Conv2d(hidden, hidden, 1)
        self.c3 = nn.Conv2d(hidden, c_out, 3, padding=1)
        nn.init.zeros_(self.c3.weight)
        nn.init.zeros_(self.c3.bias)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))


class GlowCoupling(nn.Module):
    """Affine coupling on channel halves with a sigmoid scale, as in Glow."""

    def __init__(self, c, hidden):
        super().__init__()
        self.net = GlowNet(c // 2, hidden, 2 * (c - c // 2))

    def forward(self, z, ldj):
        c = z.shape[1]
        za, zb = z[:, : c // 2], z[:, c // 2 :]
        shift, raw = self.net(za).chunk(2, dim=1)
        scale = torch.sigmoid(raw + 2.0)
        zb = (zb + shift) * scale
        return torch.cat([za, zb], dim=1), ldj + torch.log(scale).sum(dim=[1, 2, 3])


class VarDeq(nn.Module):
    """Variational dequantization (tutorial 11): noise u ~ U(0,1) → logit → 4 couplings
    conditioned on the image → sigmoid; z = (x + u)/256."""

    def __init__(self, alpha=1e-5):
        super().__init__()
        self.alpha = alpha
        self.flows = nn.ModuleList(
            Coupling(GatedConvNet(2, 16, 2), checkerboard(28, 28, i % 2 == 1), 1) for i in range(4)
        )

    def forward(self, x):
        img = x / 255.0 * 2 - 1
        u = torch.rand_like(x).clamp(1e-6, 1 - 1e-6)
        ldj = torch.zeros(x.shape[0])
        ldj = ldj + (-torch.log(u) - torch.log(1 - u)).sum(dim=[1, 2, 3])
        u = torch.log(u) - torch.log(1 - u)
        for f in self.flows:
            u, ldj = f(u, ldj, cond=img)
        ldj = ldj + (-u - 2 * F.softplus(-u)).sum(dim=[1, 2, 3])
        u = torch.sigmoid(u)
        return (x + u) / 256.0, -ldj


class Flow(nn.Module):
    def __init__(self, flows, alpha=1e-5, vardeq=False, top=None):
        super().__init__()
        self.flows = nn.ModuleList(flows)
        self.top = top
        self.alpha = alpha
        self.vardeq = VarDeq(alpha) if vardeq else None

    def bpd(self, x, y=None):
        z = x.float()
        dims = z[0].numel()
        if self.vardeq is None:
            ldj = torch.zeros(z.shape[0])
            z = (z + torch.rand_like(z)) / 256.0
        else:
            z, ldj = self.vardeq(z)
        ldj = ldj - math.log(256.0) * dims
        z = z * (1 - self.alpha) + 0.5 * self.alpha
        ldj = ldj + math.log(1 - self.alpha) * dims
        ldj = ldj + (-torch.log(z) - torch.log(1 - z)).sum(dim=[1, 2, 3])
        z = torch.log(z) - torch.log(1 - z)
        for f in self.flows:
            z, ldj = f(z, ldj, y) if getattr(f, "takes_labels", False) else f(z, ldj)
        logp = std_normal_logp(z) if self.top is None else self.top(z, y)
        return -(logp + ldj) * math.log2(math.e) / dims


def board(c, hw, i, hidden=32):
    return Coupling(GatedConvNet(c, hidden), checkerboard(hw, hw, i % 2 == 1), c)


def chan(c, i, hidden=32):
    return Coupling(GatedConvNet(c, hidden), channel_mask(c, i % 2 == 1), c)


def small_graph(coupling, split=None, top=None):
    """spline_vs_affine's graph on 14×14: checkerboard ×2, squeeze, channel ×2, split,
    checkerboard ×2; `coupling(c, mask)` builds one coupling."""
    flows = [coupling(1, checkerboard(14, 14, i % 2 == 1)) for i in range(2)] + [Squeeze()]
    flows += [coupling(4, channel_mask(4, i % 2 == 1)) for i in range(2)] + [split or Split()]
    flows += [coupling(2, checkerboard(7, 7, i % 2 == 1)) for i in range(2)]
    return Flow(flows, top=top)


def build(model):
    if model == "affine14":
        return small_graph(lambda c, m: Coupling(GatedConvNet(c, 24, layers=1), m, c))
    if model in ("unconditional", "conditional"):
        k = 10 if model == "conditional" else 0
        cls = CondCoupling if k else Coupling
        return small_graph(
            lambda c, m: cls(GatedConvNet(c + k, 24, 2 * c, layers=1), m, c),
            Split(4, learned=True, classes=k),
            TopPrior(2 * 7 * 7, k),
        )
    if model == "spline":
        return small_graph(
            lambda c, m: SplineCoupling(GatedConvNet(c, 12, 23 * c, layers=1), m, 8, 13.0)
        )
    if model in ("coupling", "simple", "vardeq"):
        n = 1 if model == "coupling" else 8
        return Flow([board(1, 28, i) for i in range(n)], vardeq=model == "vardeq")
    if model == "multiscale":
        flows = [board(1, 28, i) for i in range(2)] + [Squeeze()]
        flows += [chan(4, i, 48) for i in range(2)] + [Split(), Squeeze()]
        flows += [chan(8, i, 64) for i in range(4)]
        return Flow(flows, vardeq=True)
    if model == "realnvp":
        flows = [board(1, 28, i) for i in range(3)] + [Squeeze()]
        flows += [chan(4, i) for i in range(3)] + [Split()]
        flows += [board(2, 14, i) for i in range(3)] + [Squeeze()]
        flows += [chan(8, i) for i in range(3)] + [Split()]
        flows += [board(4, 7, i) for i in range(4)]
        return Flow(flows)
    if model == "glow":
        flows = []
        for level, c in enumerate([4, 8]):
            flows.append(Squeeze())
            for _ in range(12):
                flows += [ActNorm(c), InvConvLU(c), GlowCoupling(c, 192)]
            if level == 0:
                flows.append(Split(c, learned=True))
        return Flow(flows)
    raise ValueError(model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        choices=[
            "coupling",
            "simple",
            "vardeq",
            "multiscale",
            "realnvp",
            "glow",
            "affine14",
            "spline",
            "unconditional",
            "conditional",
        ],
        default="simple",
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    flow = build(a.model)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
    hw = 28 if a.model in ("coupling", "simple", "vardeq", "multiscale", "realnvp", "glow") else 14
    x = torch.randint(0, 256, (a.batch, 1, hw, hw))
    y = F.one_hot(torch.randint(0, 10, (a.batch,)), 10).float() if a.model == "conditional" else None
    fwd, bwd, upd = [], [], []
    for i in range(2 + a.steps):
        t0 = time.perf_counter()
        loss = flow.bpd(x, y).mean()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
        opt.step()
        t3 = time.perf_counter()
        if i >= 2:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            upd.append((t3 - t2) * 1e3)
    step = statistics.median([f + b + o for f, b, o in zip(fwd, bwd, upd)])
    print(
        json.dumps(
            {
                "variant": a.model,
                "batch": a.batch,
                "fwd_ms": round(statistics.median(fwd), 1),
                "bwd_ms": round(statistics.median(bwd), 1),
                "opt_ms": round(statistics.median(upd), 1),
                "step_ms": round(step, 1),
                "imgs_per_s": round(a.batch / (step / 1e3), 1),
                "params": sum(p.numel() for p in flow.parameters()),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
