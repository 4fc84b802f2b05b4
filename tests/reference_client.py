"""An independent client optimiser for the tests: plain loops over the parameters.

Written from the update rule (SGD with dampening 0 as in torch.optim.SGD, plus the
FedProx term), sharing no code with the engine's trainers.  With ``w0`` the
parameters at the start of the run, per step and per parameter:

    g = grad
    g = g + weight_decay * w            (if weight_decay)
    g = g + prox_mu * (w - w0)          (if prox_mu)
    buf = g (first step) | buf = momentum * buf + g      (if momentum)
    g = g + momentum * buf (nesterov) | g = buf          (if momentum)
    w = w - lr * g

The plain case (all options 0) is exactly ``p.add_(gr, alpha=-lr)`` per parameter,
as in tests/reference.py.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _loss(out, y):
    if y.is_floating_point():
        return 0.5 * F.mse_loss(out.squeeze(-1), y)
    return F.cross_entropy(out, y)


def sgd_run(model, params, x, y, order, lr, momentum=0.0, nesterov=False, weight_decay=0.0, prox_mu=0.0, w0=None):
    """``len(order)`` steps on the minibatches ``x[order[s]], y[order[s]]`` (order: a ``(steps, b)``
    index array); updates ``params`` (the model's parameters, in order) in place, returns nothing.
    Momentum buffers live for this run only.  ``w0``: the proximal anchor as one flat float32 array (ADMM),
    else the start of the run."""
    plain = momentum == 0 and weight_decay == 0 and prox_mu == 0
    if w0 is None:
        w0 = [p.detach().clone() for p in params]
    else:
        flat, w0, off = torch.from_numpy(np.ascontiguousarray(w0, dtype=np.float32)), [], 0
        for p in params:
            w0.append(flat[off:off + p.numel()].view_as(p).clone())
            off += p.numel()
    bufs = [None] * len(params)
    for s in range(len(order)):
        idx = torch.from_numpy(np.asarray(order[s]))
        loss = _loss(model(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (p, gr) in enumerate(zip(params, grads)):
                if plain:
                    p.add_(gr, alpha=-lr)
                    continue
                d_p = gr
                if weight_decay != 0:
                    d_p = d_p.add(p, alpha=weight_decay)
                if prox_mu != 0:
                    d_p = d_p.add(p - w0[i], alpha=prox_mu)
                if momentum != 0:
                    if bufs[i] is None:
                        bufs[i] = d_p.clone()
                    else:
                        bufs[i].mul_(momentum).add_(d_p)
                    d_p = d_p.add(bufs[i], alpha=momentum) if nesterov else bufs[i]
                p.add_(d_p, alpha=-lr)
