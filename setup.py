from setuptools import find_packages, setup

# Keep in sync with .ci/run's cache key (it hashes this file).
INSTALL_REQUIRES = [
    "torch>=2.2",
    "torchvision>=0.17",
    "timm>=1.0,<2",
    "numpy>=1.24",
    "hydra-core>=1.3,<1.4",
    "safetensors>=0.4",
    "tensorboard>=2.12",
    "pillow>=9",
    "tqdm>=4.60",
    "matplotlib>=3.6",
]
EXTRAS = {
    # CPU build; on GPUs install the matching `spconv-cuXXX` wheel instead (e.g. spconv-cu120).
    "spconv": ["spconv>=2.3"],
    "detection": ["pycocotools>=2.0.6"],
}
EXTRAS["dev"] = EXTRAS["spconv"] + EXTRAS["detection"] + ["pytest>=7"]

setup(
    name="greenmim",
    version="0.1.0",
    description="Efficient masked image modeling for hierarchical vision transformers (visible-only Swin/Twins)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["greenmim", "greenmim.*"]) + ["greenmim.configs"],
    package_dir={"greenmim.configs": "configs"},
    package_data={"greenmim.configs": ["*.yaml", "**/*.yaml"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "greenmim-pretrain=greenmim.cli.pretrain:main",
            "greenmim-visualize=greenmim.cli.visualize:main",
            "greenmim-export=greenmim.cli.export:main",
            "greenmim-bench=greenmim.cli.bench:main",
            "greenmim-finetune=greenmim.cli.finetune:main",
            "greenmim-detect=greenmim.cli.detect:main",
        ]
    },
)
