"""Names vulture (the dead-code pass of tests/test_architecture.py) cannot see used, each with the reason.

Not a test module: ``vulture src/qmlhfl_mpi tests/vulture_whitelist.py`` reads it.
"""
# ruff: noqa: B018, F821
# module-level __getattr__/__dir__: the lazy re-exports of the public API (qmlhfl_mpi/__init__.py)
__getattr__
__dir__
# registry entries, named in the registries by "module:attr" strings and loaded on demand
identity  # core/codecs/identity.py, CODECS
qsgd  # core/codecs/qsgd.py, CODECS
Momentum  # core/server_opt.py, SERVER_OPTIMIZERS
Yogi
LeastSquares  # data/synthetic.py, DATASETS
mnist  # data/images.py, DATASETS
fashion_mnist
cifar10
__qualname__  # data/images.py names its loaders for the registry's messages
logreg  # learning/models.py, MODELS
mlp
cnn
cifar_cnn
# the stream purposes are part of the results' reproducibility (docs/results.md): never renumbered or reused
INIT
PARTITION
# interfaces called by the machinery that owns them
find_class  # data/safe_pickle.py: pickle.Unpickler hooks
persistent_load
on_run_start  # run/callbacks.py: Callback hooks, called by name through Agreement.hooks
on_round_end
frame  # run/signals.py: the signal handler's signature
Partitioner  # core/partition.py: the type of a partitioner plug-in, documented in docs/api.md
PARTITION_KINDS  # core/partition.py: the built-in kinds, for the docs and tests
encode_reference  # core/codecs/qsgd.py: the numpy reference the compiled kernels are tested against
# torch backend switches set for determinism (comm/placement.py)
deterministic
benchmark
allow_tf32
# fields read by name: dataclass fields of the round's statistics (core/stats.py), the report's axes
# (analysis/report.py, getattr by the plot table), a sweep's run description (analysis/sweep.py), the
# session's model_vector (read by callbacks)
t_compute
t_codec
t_comm
train_loss
time_compute
time_codec
time_comm
time_round
rounds_x
uplink_x
wall_x
virtual_x
partition_seed
model_vector
# the virtual clock's read-outs (core/clock.py), tested in tests/test_clock.py; the run records them once the
# clock drives the results (issue 20: /metrics/virtual_time, the critical path)
duration
critical_path
# DeviceStore.made: how many devices' data a rank made (public; asserted by tests/test_scale.py)
made
# Membership.moved: the devices off their tree edge (tests/test_membership.py); the results' record of the tree of
# the moment (issue 22, /topology/parents) reads it
moved
# TierEvent.tier: which buffered tier an event is at (core/tiers.py, groundwork; read by tests/test_tiers.py and by
# the executor once the tiers are wired)
tier
# Cell fields (analysis/evaluation.py): the evaluation table columns, read by tests/test_evaluation.py; the
# optimiser evaluation of issue 24 (not written yet) prints them
chosen_mean
median_draw_mean
oracle_mean
default_mean
fastest_mean
half_width
