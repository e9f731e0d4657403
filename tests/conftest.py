"""Shared fixtures (generic; any helper's tests may use them).

- ``digits_base_model`` (session): path (str) of a base model trained once per test session with
  ``train_base(dataset="digits", sigma=0.25, seed=0)``: noisy test accuracy >= 0.9 at sigma 0.25.
  Training takes about 10-30 s on 2 CPU cores, so use it only in tests marked ``slow``; it is shared
  by every test that asks for it. Its metrics are in ``load_checkpoint(path)[1]["meta"]``.
- ``digits_untrained_model`` (session): path (str) of a built-in ``small_cnn`` checkpoint for digits
  with seeded random weights (kind ``base``, sigma 0.25): instant; for plumbing tests that need a
  valid model file but not an accurate one.

The session runs torch with one intra-op thread: on the shared 2-core CI machine, OpenMP's
spinning workers made small forward passes up to 100x slower with two threads.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_base_model(tmp_path_factory) -> str:
    from data_gen.models import train_base

    path = tmp_path_factory.mktemp("digits_base") / "base.pt"
    train_base(dataset="digits", sigma=0.25, out=str(path), seed=0, device="cpu", progress=False)
    return str(path)


@pytest.fixture(scope="session")
def digits_untrained_model(tmp_path_factory) -> str:
    from surrogate_cert.core.architectures import build, save_checkpoint

    path = tmp_path_factory.mktemp("digits_untrained") / "untrained.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build("small_cnn", (1, 8, 8), 10)
    save_checkpoint(
        str(path),
        model,
        arch="small_cnn",
        input_shape=(1, 8, 8),
        num_classes=10,
        kind="base",
        meta={"sigma": 0.25, "dataset": "digits", "note": "random weights (test fixture)"},
    )
    return str(path)
