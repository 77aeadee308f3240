"""PyTorch eager reference for `flowlab bench`: the same architectures, timed the same way.

Models (UvA DL tutorial 11 architecture, written independently for this benchmark):
  coupling   one checkerboard affine coupling, GatedConvNet(1→32→2, 3 gated blocks)
             (flowlab: bench/tutorial_coupling.yaml)
  simple     uniform dequantization + logit + 8 checkerboard couplings (556,312 params)
             (flowlab: experiments/uva_tutorial11.yaml --only simple)

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


class Coupling(nn.Module):
    def __init__(self, net, mask, c_in):
        super().__init__()
        self.net = net
        self.scaling_factor = nn.Parameter(torch.zeros(c_in))
        self.register_buffer("mask", mask)

    def forward(self, z, ldj):
        z_in = z * self.mask
        s, t = self.net(z_in).chunk(2, dim=1)
        f = self.scaling_factor.exp().view(1, -1, 1, 1)
        s = torch.tanh(s / f) * f
        s = s * (1 - self.mask)
        t = t * (1 - self.mask)
        z = (z + t) * torch.exp(s)
        return z, ldj + s.sum(dim=[1, 2, 3])


class Flow(nn.Module):
    def __init__(self, couplings, alpha=1e-5):
        super().__init__()
        self.flows = nn.ModuleList(couplings)
        self.alpha = alpha

    def bpd(self, x):
        z = x.float()
        ldj = torch.zeros(z.shape[0])
        z = (z + torch.rand_like(z)) / 256.0
        dims = z[0].numel()
        ldj = ldj - math.log(256.0) * dims
        z = z * (1 - self.alpha) + 0.5 * self.alpha
        ldj = ldj + math.log(1 - self.alpha) * dims
        ldj = ldj + (-torch.log(z) - torch.log(1 - z)).sum(dim=[1, 2, 3])
        z = torch.log(z) - torch.log(1 - z)
        for f in self.flows:
            z, ldj = f(z, ldj)
        logp = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(dim=[1, 2, 3])
        return -(logp + ldj) * math.log2(math.e) / dims


def build(model):
    n = {"coupling": 1, "simple": 8}[model]
    return Flow(
        [
            Coupling(GatedConvNet(1, 32), checkerboard(28, 28, i % 2 == 1), 1)
            for i in range(n)
        ]
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["coupling", "simple"], default="simple")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    flow = build(a.model)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (a.batch, 1, 28, 28))
    fwd, bwd, upd = [], [], []
    for i in range(2 + a.steps):
        t0 = time.perf_counter()
        loss = flow.bpd(x).mean()
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
