"""gru_mem: a gated recurrent memory agent (GRU-Mem) for long-context QA, in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned to the versions the test suite runs against.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "pyarrow==26.0.1",  # MemAgent's training parquet
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",  # transformers' apply_chat_template needs it but does not require it
    "tqdm==4.70.1",  # progress of infer and evaluate
    "ml-collections==1.1.0",
    "safetensors==0.8.0",
    "clu==0.0.12",
    "tensorboard==2.21.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "matplotlib==3.11.2",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.2.0",
        "hypothesis==6.170.15",
        # Parity reference through transformers; 2.13.0 is a local CPU build.
        "torch==2.13.0",
    ],
}

setup(
    name="gru_mem",
    version="0.1.0",
    description="GRU-Mem: gated recurrent memory agents for long-context QA, in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gru_mem", "gru_mem.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
