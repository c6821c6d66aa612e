"""gru_mem: GRU-Mem, a gated recurrent memory agent for long-context QA, in JAX/Flax."""

__version__ = "0.1.0"
