"""Process exit codes of `qmlhfl-mpi`, in one place (documented in docs/hpc.md)."""

EXIT_OK = 0
EXIT_ABORT = 1        # unexpected error on some rank (or a callback that failed): the whole job was aborted
EXIT_USAGE = 2        # bad config / data / plug-in / output / checkpoint: nothing was changed
EXIT_DIVERGED = 3     # non-finite loss or model: results so far are kept
EXIT_LR_VIOLATED = 4  # check --strict: train.lr violates the learning-rate condition
EXIT_IO = 74          # writing results or a checkpoint failed (disk full, permissions)
EXIT_PREEMPTED = 75   # stopped by SIGTERM/SIGUSR1/SIGINT or a callback after a checkpoint: resume with --resume
EXIT_TIMEOUT = 76     # a global round exceeded train.round_timeout (a rank stopped or hung): resume with --resume
