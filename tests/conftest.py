import os
from pathlib import Path

import pytest
import torch

# Nothing is downloaded: Hugging Face libraries must fail rather than reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Hypothesis profiles (tests/test_op_properties.py). "ci" is loaded here, so it is what every run gets; the
# hypothesis pytest plugin loads the one named by --hypothesis-profile after this file is imported, so
# `--hypothesis-profile=thorough` wins (HYPOTHESIS_PROFILE=thorough does the same where the option cannot be
# passed). No fixed seed: every run draws fresh examples, and a failure prints the blob that replays it
# (@reproduce_failure); the example database (.hypothesis/, which git-ignores itself) replays a local failure first.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    settings.register_profile("ci", max_examples=200, deadline=None, derandomize=False, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=2000, deadline=None, derandomize=False, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Fixed models, committed so that every machine tests the same weights (README, "Fixed models", has the
# commands that trained them):
# - the demo's: BadNets on Fashion-MNIST at 16×16, 3,000 clean images for the defender. The defenses' efficacy
#   claims are tested on it, with their default settings, exactly as `pydefend demo` runs them.
# - a BadNets PreAct-ResNet-18 (width 8) on 8×8 digits with 144 clean images: small and fast, for the
#   mechanics (reports, round trips, options). Too small to judge efficacy on: BNA's detection, for one,
#   misses or mistakes the target on most such models (results/bna.md).
DIGITS_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "digits-preact_resnet18-w8-badnets-t0-r0.1-s0"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random data every run, but the seed is printed so a failure can be replayed."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    yield


@pytest.fixture
def inductor_vector_isa(monkeypatch):
    """Under ATEN_CPU_CAPABILITY=default torch's inductor picks no vector ISA, yet its CPU reductions still emit
    at::vec code, which then fails to compile (torch 2.13). Inductor's generated code is independent of ATen's
    kernels, so compiled tests give it the widest vector ISA this CPU has."""
    from torch._inductor import config, cpu_vec_isa

    if not cpu_vec_isa.pick_vec_isa():
        widths = [isa.bit_width() for isa in cpu_vec_isa.valid_vec_isa_list()]
        if widths:
            monkeypatch.setattr(config.cpp, "simdlen", max(widths))


def load_fixed_backdoor(path) -> dict:
    """A committed checkpoint with its dataset split, exact attack and the defender's clean data."""
    from pydefend.checkpoint import data_spec, load_checkpoint
    from pydefend.data import load_dataset
    from pydefend.defenses import CleanData
    from pydefend.zoo import attack_from_meta

    model, meta = load_checkpoint(path)
    data = data_spec(meta)
    dataset = load_dataset(data["train"], seed=meta["seed"], test=data["test"])
    clean_indices = torch.tensor(meta["clean_indices"])
    clean = CleanData(dataset.x_train[clean_indices], dataset.y_train[clean_indices], dataset.num_classes)
    return {"path": Path(path), "dataset": dataset, "attack": attack_from_meta(meta), "model": model,
            "meta": meta, "clean_indices": clean_indices, "clean": clean, "spec": meta["model"]}


@pytest.fixture(scope="session")
def tiny_backdoor():
    """The committed digits model, for the mechanics of each defense."""
    return load_fixed_backdoor(DIGITS_CHECKPOINT)


@pytest.fixture(scope="session")
def demo_backdoor():
    """The demo's committed Fashion-MNIST model, for the defenses' efficacy."""
    from pydefend.demo import DEMO_CHECKPOINT
    from pydefend.metrics import evaluate
    fixed = load_fixed_backdoor(DEMO_CHECKPOINT)
    fixed["before"] = evaluate(fixed["model"], fixed["dataset"], fixed["attack"])
    return fixed
