from setuptools import find_packages, setup

setup(
    name="lookwhen-kernels",
    version="0.1.0",
    description="Fused Triton kernels and a thin model layer for token-selection video transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lookwhen_kernels*", "lookwhen*", "bench*"]),
    install_requires=[
        # torch.library.triton_op / wrap_triton arrived in 2.6.
        "torch>=2.6",
        "triton>=3.2",
        "einops>=0.7",
        "timm>=1.0",
        "numpy>=1.24",
        "safetensors>=0.4",
        "decord2>=3.0",
        "tqdm>=4.60",
        "pillow>=9.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-benchmark>=4.0",
            "hypothesis>=6.80",
            "av>=12.0",
        ],
        "xformers": ["xformers>=0.0.28"],
        "flash-attn": ["flash-attn>=2.6"],
    },
    entry_points={
        "console_scripts": [
            "lookwhen=lookwhen.cli:main",
            "lookwhen-bench=bench.__main__:main",
        ]
    },
)
