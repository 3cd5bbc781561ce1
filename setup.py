"""Packaging for patchdpo_fast.

``pip install patchdpo_fast`` installs the core (torch, triton, numpy, safetensors): enough for the fused loss ops in
any diffusion trainer. ``pip install "patchdpo_fast[train]"`` adds the training stack (diffusers, transformers,
accelerate, DeepSpeed, bitsandbytes, pydantic, ...) for ``patchdpo train`` and the other commands.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed as
``patchdpo_fast.kernels`` (see ``package_dir``), so installing this project never puts a top-level module
named ``kernels`` into a user's environment.
"""

from pathlib import Path

from setuptools import find_packages, setup

_packages = find_packages(include=["patchdpo_fast", "patchdpo_fast.*"])
_packages.append("patchdpo_fast.kernels")

setup(
    name="patchdpo_fast",
    version="0.1.0",
    description="Fast, scalable PatchDPO training: fused Triton loss kernels, IP-Adapter-Plus on SDXL, DeepSpeed.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages,
    package_dir={"patchdpo_fast": "patchdpo_fast", "patchdpo_fast.kernels": "kernels"},
    include_package_data=True,
    package_data={
        "patchdpo_fast.quality": ["assets/*.json", "assets/*/*.json", "assets/*/*/*"],
        "patchdpo_fast.minibench": ["assets/quickstart/**/*"],
    },
    # The core: what a trainer that imports only the loss ops (patchdpo_fast.ops, patchdpo_fast.kernels) needs.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
    ],
    extras_require={
        # The training stack: `patchdpo train`, data construction, quality estimation, DreamBench evaluation.
        "train": [
            "diffusers>=0.30",
            "transformers>=4.44",
            "accelerate>=0.33",
            "bitsandbytes>=0.43",
            "deepspeed>=0.14",
            "peft>=0.15",  # LoRA on the UNet (model.trainable=unet_lora), as diffusers uses it
            "pydantic>=2.5",
            "PyYAML>=6.0",
            "tqdm>=4.66",
            "Pillow>=10.0",
        ],
        "gpu": ["xformers>=0.0.27"],
        "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["patchdpo=patchdpo_fast.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
