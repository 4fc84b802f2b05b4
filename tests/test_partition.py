"""Partitioners: coverage, class structure, determinism, errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qmlhfl_mpi.core.partition import (
    PARTITION_KINDS,
    PARTITIONERS,
    PartitionRequest,
    partition,
)

RANDOM_KINDS = [k for k in PARTITION_KINDS if k != "natural"]  # natural follows the data's owners

GROUPS = [range(0, 3), range(3, 10), range(10, 12), range(12, 20)]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(123).integers(0, 10, 6000)


def _run(labels: np.ndarray, kind: str, seed: int = 7, num_devices: int = 20, **kw) -> list[np.ndarray]:
    if kind == "edge-shards":
        kw.setdefault("groups", GROUPS)
    return partition(labels, num_devices, kind, seed, **kw)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0), "each device's indices sorted and unique"
    allidx = np.concatenate(parts)
    assert allidx.size == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_every_sample_exactly_once(labels, kind):
    parts = _run(labels, kind)
    assert len(parts) == 20 and all(p.size >= 1 for p in parts)
    _assert_exact_cover(parts, labels.size)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_deterministic_and_seed_dependent(labels, kind):
    a, b, c = _run(labels, kind, seed=3), _run(labels, kind, seed=3), _run(labels, kind, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_no_global_rng_use(labels):
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    a = _run(labels, "dirichlet")
    np.random.seed(99)
    b = _run(labels, "dirichlet")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    np.random.seed(0)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_iid_equal_and_unequal_sizes(labels):
    sizes = [p.size for p in _run(labels, "iid")]
    assert max(sizes) - min(sizes) <= 1
    uneven = [p.size for p in _run(labels, "iid", size_sigma=1.0, min_samples=10)]
    assert sum(uneven) == labels.size and min(uneven) >= 10
    assert max(uneven) > 3 * min(uneven)
    for p in _run(labels, "iid"):  # iid: every device sees (nearly) every class
        assert np.unique(labels[p]).size == 10


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_classes_per_device(labels, k):
    parts = _run(labels, "shards", classes_per_device=k)
    ncls = [np.unique(labels[p]).size for p in parts]
    assert max(ncls) <= k
    assert np.mean(ncls) >= k - 0.5  # shards come from distinct classes nearly always
    sizes = [p.size for p in parts]
    assert max(sizes) <= 1.5 * min(sizes)


def test_shards_imbalanced_classes():
    lab = np.concatenate([np.zeros(1000), np.ones(50), np.full(300, 2), np.full(7, 3)]).astype(np.int64)
    parts = partition(lab, 10, "shards", 0, classes_per_device=2)
    _assert_exact_cover(parts, lab.size)
    assert max(np.unique(lab[p]).size for p in parts) <= 2


def test_dirichlet_alpha_controls_heterogeneity(labels):
    def mean_classes(alpha: float) -> float:
        return float(np.mean([np.unique(labels[p]).size for p in _run(labels, "dirichlet", alpha=alpha)]))

    assert mean_classes(0.05) < 6 < mean_classes(100.0)


def test_edge_shards_devices_stay_in_their_edge_pool(labels):
    parts = _run(labels, "edge-shards", classes_per_edge=3, classes_per_device=2)
    pools = []
    for g in GROUPS:
        pool = np.unique(labels[np.concatenate([parts[d] for d in g])])
        assert pool.size <= 3
        pools.append(set(pool.tolist()))
        for d in g:
            dev = set(np.unique(labels[parts[d]]).tolist())
            assert dev <= pools[-1]
            if len(g) * 2 >= 3:  # enough shards in the edge for single-class shards
                assert len(dev) <= 2
    assert set().union(*pools) == set(range(10)), "12 pool slots cover all 10 classes"


def test_edge_shards_drops_classes_when_pools_too_small(labels):
    groups = [range(0, 2), range(2, 4)]
    parts = partition(labels, 4, "edge-shards", 1, groups=groups, classes_per_edge=2, classes_per_device=1)
    used = np.concatenate(parts)
    assert np.unique(used).size == used.size  # at most once
    assert np.unique(labels[used]).size == 4
    for g in groups:
        assert np.unique(labels[np.concatenate([parts[d] for d in g])]).size <= 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="shards", num_devices=400, classes_per_device=20), r"8000 shards.*6000 samples"),
    (dict(kind="shards", classes_per_device=11), r"classes_per_device=11.*1\.\.10"),
    (dict(kind="dirichlet", alpha=0.0), r"alpha=0\.0.*> 0"),
    (dict(kind="dirichlet", alpha=-1.0), r"alpha=-1\.0"),
    (dict(kind="iid", num_devices=0), r"num_devices=0.*>= 1"),
    (dict(kind="iid", min_samples=400), r"min_samples=400.*<= 6000"),
    (dict(kind="dirichlet", alpha=0.01, min_samples=250), r"min_samples=250"),
    (dict(kind="iid", size_sigma=-0.5), r"size_sigma=-0\.5.*>= 0"),
    (dict(kind="random"), r"'random'.*iid"),
    (dict(kind="iid", seed=-1), r"seed=-1.*>= 0"),
    (dict(kind="edge-shards", groups=None), r"needs groups.*0\.\.19"),
    (dict(kind="edge-shards", groups=[range(0, 10), range(11, 20)]), r"groups\[1\]=range\(11, 20\).*start=10"),
    (dict(kind="edge-shards", groups=[range(0, 10), range(10, 18)]), r"0\.\.17.*num_devices=20"),
    (dict(kind="edge-shards", classes_per_edge=11, groups=GROUPS), r"classes_per_edge=11.*1\.\.10"),
    (dict(kind="edge-shards", classes_per_edge=3, classes_per_device=4, groups=GROUPS),
     r"classes_per_device=4.*classes_per_edge=3"),
])
def test_impossible_requests(labels, kwargs, match):
    kwargs = {"num_devices": 20, "seed": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        partition(labels, **kwargs)


def test_bad_labels():
    with pytest.raises(ValueError, match="1-D integer"):
        partition(np.zeros(10), 2, "iid", 0)
    with pytest.raises(ValueError, match="1-D integer"):
        partition(np.zeros((5, 2), dtype=int), 2, "iid", 0)


def test_module_is_pure():
    """The partitioners pull in neither torch, mpi4py nor h5py."""
    code = ("import sys, qmlhfl_mpi.core.partition; "
            "bad = [m for m in ('torch', 'mpi4py', 'h5py') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("owners_n,devices", [(20, 20), (45, 20), (7, 3)])
def test_natural_deals_sorted_owners_in_contiguous_blocks(owners_n, devices):
    g = np.random.default_rng(3)
    owner_ids = g.choice(10_000, owners_n, replace=False)  # arbitrary, unsorted ids
    owners = g.choice(owner_ids, 3000)
    owners[:owners_n] = owner_ids  # every owner has at least one sample
    labels = g.integers(0, 10, owners.size)
    parts = partition(labels, devices, "natural", 0, owners=owners)
    _assert_exact_cover(parts, labels.size)
    ranked = {o: j for j, o in enumerate(np.sort(owner_ids))}
    for k, p in enumerate(parts):
        mine = sorted({ranked[o] for o in owners[p]})
        # device k gets exactly the owners of rank floor(k O / D) .. floor((k+1) O / D) - 1
        assert mine == [j for j in range(owners_n) if (j * devices) // owners_n == k]
        assert mine == list(range(-(-k * owners_n // devices), -(-(k + 1) * owners_n // devices)))
    assert partition(labels, devices, "natural", 0, owners=owners)[0].tolist() == parts[0].tolist()


def test_natural_errors_name_the_problem():
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="needs a data set that returns the owner"):
        partition(labels, 2, "natural", 0)
    with pytest.raises(ValueError, match="3 owners but the tree has 4 devices.*at most 3 devices"):
        partition(labels, 4, "natural", 0, owners=np.arange(10) % 3)
    with pytest.raises(ValueError, match="9 owner ids for 10 training samples"):
        partition(labels, 2, "natural", 0, owners=np.arange(9))


def test_plugin_partitioner_by_reference(tmp_path):
    plugin = tmp_path / "halves.py"
    plugin.write_text("import numpy as np\n"
                      "def halves(req):\n"
                      "    return np.array_split(np.arange(req.labels.size)[::-1], req.num_devices)\n")
    labels = np.zeros(10, dtype=np.int64)
    parts = partition(labels, 2, f"{plugin}:halves", 0)
    assert [p.tolist() for p in parts] == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition(labels, 2, "halves", 0)
    assert isinstance(PARTITIONERS.resolve("iid")(PartitionRequest(labels, 2, 0, None)), list)
