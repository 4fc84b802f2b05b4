"""qmlhfl_mpi: multi-layer hierarchical federated learning with layer-specific
quantization (QMLHFL) on MPI."""
__version__ = "0.1.0"
