from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="qkformer",
    version="0.1.0",
    description="QKFormer: hierarchical spiking transformer with Q-K attention (NeurIPS 2024), "
                "reference PyTorch implementation",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["qkformer", "qkformer.*"]),
    package_data={"qkformer": ["cuda/*.cu", "cpu/*.cpp", "cpu/*.h", "analysis/*.json", "configs/*.yml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "spikingjelly>=0.0.0.0.12,<0.0.0.1",
        "numpy",
        "pyyaml",
        "tensorboard",
        "tqdm",
        "torchdata>=0.11",  # StatefulDataLoader: the data position in step checkpoints
        "safetensors",
        "matplotlib",
        "scikit-learn",  # the bundled 8x8 digits set of the demo
    ],
    extras_require={
        # One CuPy wheel per CUDA major: it must match torch.version.cuda, or CuPy's NVRTC and
        # runtime libraries are missing next to torch's and the kernel falls back to torch.
        # Plain [cuda] is the major of the torch pinned in constraints.txt (a CUDA 13 build).
        # Triton: the fast path's units on CUDA (torch's Linux wheels bring it already)
        "cuda": ["cupy-cuda13x", "triton>=3.0"],
        "cuda12": ["cupy-cuda12x", "triton>=3.0"],
        "cuda13": ["cupy-cuda13x", "triton>=3.0"],
        "test": ["pytest>=7"],
    },
)
