"""audiodiff-jax: latent audio diffusion on TPU pods and GPUs, in JAX.

Install for development and tests with ``pip install -e .[test]`` (``make test`` does it).
"""

from setuptools import find_packages, setup

# The design card's stack, pinned to the versions this project is tested with.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy>=1.26,<3",
    "soundfile==0.14.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
]

EXTRAS_REQUIRE = {
    # Ahead-of-time compilation for TPU topologies, and running on TPU VMs.
    "tpu": ["libtpu==0.0.51"],
    # CUDA 12 plugin for GPUs (matching the pinned jaxlib).
    "gpu": ["jax[cuda12]==0.10.2"],
    "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "ruff==0.17.5"],
    "eval": ["librosa==1.0.0"],
}

setup(
    name="audiodiff-jax",
    version="0.1.0",
    description="Latent audio diffusion transformers on TPU pods and GPUs, in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["audiodiff_jax*", "data_pipeline*", "configs*", "launch*"]),
    package_data={"configs": ["*.py"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "audiodiff-train=audiodiff_jax.train_main:run",
            "audiodiff-make-demo-shards=data_pipeline.demo_shards:run",
            "audiodiff-demo=audiodiff_jax.demo:run",
            "audiodiff-tokenizer=data_pipeline.tokenizer:run",
        ]
    },
)
