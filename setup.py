import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "src/qmlhfl_mpi/_version.py").read_text()).group(1)

setup(
    name="qmlhfl_mpi",
    version=VERSION,
    description="Multi-layer hierarchical federated learning with layer-specific quantization (QMLHFL) on MPI",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=[
        "numpy>=1.24,<3",
        "torch>=2.1,<2.15",
        "torchvision>=0.16,<0.30",
        "mpi4py>=3.1,<5",
        "h5py>=3.8,<4",
        "PyYAML>=6,<7",
        "matplotlib>=3.6,<4",
        "numba>=0.60,<0.70",
        "dp-accounting>=0.4,<1",
        "cryptography>=42,<51",
    ],
    extras_require={
        "mpich": ["mpich>=4,<6"],
        "test": ["pytest>=7,<10", "pytest-mpi>=0.6,<1", "pandas>=1.5,<4", "tensorboard>=2.10,<3", "import-linter>=2.0,<3",
                 "vulture>=2.10,<3", "datasets>=2.14,<6", "pyarrow>=14,<30", "scipy>=1.9,<2"],
        "tensorboard": ["tensorboard>=2.10,<3"],
        "arrow": ["pyarrow>=14,<30"],
        "lint": ["ruff>=0.17,<0.18", "mypy>=2.4,<2.5", "import-linter>=2.0,<3", "types-PyYAML"],
    },
    entry_points={"console_scripts": ["qmlhfl-mpi=qmlhfl_mpi.cli:main"]},
)
