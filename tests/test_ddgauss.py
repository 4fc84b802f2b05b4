"""Distributed DP (core/ddgauss.py, privacy.placement distributed; docs/privacy.md): the sampler draws the discrete
Gaussian, the published bound covers the exact Renyi divergence of a sum of discrete Gaussians (and is exact for
one), the general amplification by sampling without replacement meets dp-accounting's for the Gaussian, the
accountant meets the Gaussian's when the shares are wide; the engine against the serial reference, and one clear
error per bad input.  On 1-4 ranks: tests/mpi/test_engine_matrix.py, case N2-secagg-distributed-dp-dropouts."""
from __future__ import annotations

import copy
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import special, stats

from qmlhfl_mpi import load_config
from qmlhfl_mpi.config import ConfigError
from qmlhfl_mpi.core import rng
from qmlhfl_mpi.core.ddgauss import ORDERS, ddg_rdp, ddg_tau, discrete_gaussian, sampled_wor_rdp
from qmlhfl_mpi.core.privacy import Accountant
from qmlhfl_mpi.run.errors import RunError
from reference import reference_for
from test_secagg import SECURE, run_here


def pmf(sigma, k):
    """The discrete Gaussian's probabilities on the integers -k..k (normalised; the rest is below 1e-300)."""
    x = np.arange(-k, k + 1, dtype=np.float64)
    p = np.exp(-x * x / (2 * sigma * sigma))
    return p / p.sum()


@pytest.mark.parametrize("sigma", [0.7, 3.0, 25.0])
def test_the_sampler_draws_the_discrete_gaussian(sigma):
    n = 100_000
    got = discrete_gaussian(rng.generator((5, rng.NOISE, 0, 1, 2, 3)), sigma, n)
    again = discrete_gaussian(rng.generator((5, rng.NOISE, 0, 1, 2, 3)), sigma, n)
    assert got.dtype == np.int64 and np.array_equal(got, again)  # keyed: the same draws on every rank
    k = int(12 * sigma) + 2
    expected = pmf(sigma, k) * n
    observed = np.bincount(got + k, minlength=2 * k + 1).astype(np.float64)
    assert observed.size == 2 * k + 1  # nothing beyond 12 sigma
    keep = expected >= 20  # the tails pooled into one bin
    e = np.append(expected[keep], expected[~keep].sum())
    o = np.append(observed[keep], observed[~keep].sum())
    assert stats.chisquare(o, e * o.sum() / e.sum()).pvalue > 1e-4
    assert abs(got.mean()) < 5 * sigma / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("sigma", [0.6, 1.0])
def test_the_published_bound_covers_the_exact_divergence_of_a_sum(n, sigma):
    """Kairouz et al., Theorem 1 (without the L1 term): the Renyi divergence between the sum of n discrete
    Gaussians and its shift by an integer Delta, computed exactly from the sum's probabilities, never exceeds the
    bound; with n = 1 (tau = 0) both are the discrete Gaussian's alpha Delta^2 / (2 sigma^2) (Canonne et al.)."""
    x = np.arange(-60, 61, dtype=np.float64)
    logp = -x * x / (2 * sigma * sigma)
    logp -= special.logsumexp(logp)
    total = logp  # the sum's log-probabilities on -60n..60n, by log-space convolution (no underflow)
    for _ in range(n - 1):
        grid = total[:, None] + logp[None, :]
        out = np.full(total.size + logp.size - 1, -np.inf)
        for s in range(out.size):
            i = np.arange(max(0, s - logp.size + 1), min(total.size, s + 1))
            out[s] = special.logsumexp(grid[i, s - i])
        total = out
    tau = ddg_tau(sigma, n)
    assert (tau == 0) == (n == 1)
    for delta in (1, 3):
        for alpha in (2, 5, 10):
            a, b = total[delta:], total[:-delta]  # log P(z) and log P(z - Delta) on the same z
            exact = special.logsumexp(alpha * a + (1 - alpha) * b) / (alpha - 1)
            bound = ddg_rdp(alpha, delta / (math.sqrt(n) * sigma), tau, 1)
            assert exact <= bound + 1e-9, (delta, alpha, exact, bound)
            if n == 1:
                assert exact == pytest.approx(alpha * delta ** 2 / (2 * sigma ** 2), rel=1e-9)
            else:  # the bound's price for not being one discrete Gaussian: tau (about 0.04 at sigma 0.6)
                assert bound <= exact + alpha * 0.05 * delta ** 2 + 2 * tau


@pytest.mark.parametrize("z, n, m", [(1.0, 100, 10), (2.0, 10, 3), (0.8, 1000, 7)])
def test_the_general_amplification_meets_dp_accounting_for_the_gaussian(z, n, m):
    """Wang et al.'s Theorem 9 from the Gaussian's RDP alpha / (2 z^2): the same as dp-accounting's sampled
    Gaussian at order 2 (one term there), never below it (dp-accounting's is the tighter Gaussian-only bound)
    and never above the unsampled Gaussian."""

    def gaussian(alpha):
        return alpha / (2 * z * z)

    orders = [float(a) for a in ORDERS]
    acc = rdp.RdpAccountant(orders, neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z)))
    theirs = np.array(acc.rdp)
    ours = np.array([sampled_wor_rdp(a, m / n, gaussian) for a in ORDERS])
    assert ours[0] == pytest.approx(theirs[0], rel=1e-9)
    assert (ours >= theirs * (1 - 1e-9)).all() and (ours <= np.array([gaussian(a) for a in ORDERS]) + 1e-12).all()
    assert ours[0] < gaussian(2) * (0.2 if m / n <= 0.1 else 0.5)  # a real amplification


def test_the_distributed_accountant_meets_the_gaussian_when_shares_are_wide():
    """With many codes per share (tau ~ 0) and full participation, the distributed discrete Gaussian costs what the
    Gaussian of the same sigma does; narrow shares (tau > 0) cost more; sampling lowers it."""
    gauss = Accountant.of(1.5, 1, [2, 2], [(8, 8)], 1e-3)
    wide = Accountant.of(1.5, 1, [2, 2], [(8, 8)], 1e-3, (4096, 3))
    assert wide.epsilon(20) == pytest.approx(gauss.epsilon(20), rel=1e-9)
    narrow = Accountant.of(0.3, 1, [2, 2], [(8, 8)], 1e-3, (16, 16))  # shares of std 0.3: tau ~ 0.3
    assert narrow.epsilon(20) > Accountant.of(0.3, 1, [2, 2], [(8, 8)], 1e-3).epsilon(20) * 1.01
    sampled = Accountant.of(1.5, 1, [2, 2], [(80, 8)], 1e-3, (4096, 3))
    assert sampled.epsilon(20) < wide.epsilon(20) / 2


DISTRIBUTED = {**SECURE, "quantizer": {**SECURE["quantizer"], "levels": [20, 8]},
               "aggregation": {"policy": ["deadline", "all"], "deadline": [0.05, 0]},
               "privacy": {"clip": 0.5, "noise_multiplier": 0.8, "placement": "distributed",
                           "secure_aggregation": [True, False], "secure_threshold": 2}}


def test_distributed_noise_against_the_reference(tmp_path):
    """Devices add discrete Gaussian shares to their masked codes (stragglers dropped, groups with one survivor
    aborted): the serial reference's model bit for bit; the shares change the model but not a byte on the wire;
    epsilon is the distributed accountant's."""
    got, metrics, raw = run_here(tmp_path, "ddg", **DISTRIBUTED)
    assert np.array_equal(reference_for(load_config(raw)).run(3), got) and np.isfinite(got).all()
    quiet, m0, _ = run_here(tmp_path, "quiet", **{**DISTRIBUTED, "privacy": {**DISTRIBUTED["privacy"],
                                                                            "noise_multiplier": 0.0}})
    assert not np.array_equal(got, quiet)
    assert (metrics["dropped"][:, 0] < 12).all()  # some groups kept their survivors
    for key in ("uplink_bytes", "messages", "secagg_bytes"):
        assert np.array_equal(metrics[key], m0[key]), key
    acc = Accountant.of(0.8, 1, [2, 2], [(4, 3)], 1 / 8, (128, 2))  # 2 edges of 4, 3 sampled; d' = 128 codes
    assert np.allclose(metrics["epsilon"], acc.epsilons(3), rtol=1e-12) and np.isinf(m0["epsilon"]).all()


@pytest.mark.parametrize("privacy, quantizer, message", [
    ({"secure_aggregation": [False, False]}, {}, r"'privacy.placement' = distributed: the devices' discrete"),
    ({}, {"kind": ["qsgd", "qsgd"], "levels": [4, 8]}, r"give quantizer.kind intsum on link 1"),
    ({}, {"levels": [6, 8]}, r"a modulus of 2\^6 is too small for a group's sum.* \+ 8 standard deviations of the "
                             r"distributed noise"),
])
def test_bad_distributed_configs_are_refused_naming_the_key(tmp_path, privacy, quantizer, message):
    raw = copy.deepcopy(DISTRIBUTED)
    raw["privacy"].update(privacy)
    raw["quantizer"].update(quantizer)
    with pytest.raises((ConfigError, RunError), match=message):  # the noise's tail: once the model is known
        run_here(tmp_path, "bad", **raw)


def test_shares_below_half_a_code_are_refused_before_training(tmp_path):
    raw = copy.deepcopy(DISTRIBUTED)
    raw["privacy"]["noise_multiplier"] = 0.01  # 0.01 sqrt(128 / 2) = 0.08 code
    with pytest.raises(RunError, match=r"share may have std 0.08 < 1/2 code"):
        run_here(tmp_path, "small", **raw)
