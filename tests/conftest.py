"""Shared test setup: float32 parity settings and builders of tiny Hugging Face reference models."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `schedule="auto"` uses the constant-ratio cost model, not the compiled-program model or a stored profile
# (docs/algorithm.md §4.4): analysing each target, draft and batch size would add compiles to the suite;
# tests/test_schedule.py checks the other two explicitly. Subprocesses inherit it.
os.environ.setdefault("DSPARK_JAX_PROFILE", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    torch.manual_seed(0)
    return torch.get_num_threads()


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop every compiled program after each test module: one process runs the whole suite (hundreds of
    programs), and XLA:CPU compilation crashed in a late module when all of them stayed resident."""
    yield
    jax.clear_caches()
