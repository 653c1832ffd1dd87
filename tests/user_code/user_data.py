"""Torch Datasets a user might bring: pydefend reads them through module:factory."""
import torch
from torch.utils.data import TensorDataset

from pydefend.data import load_digits


def _split(train: bool) -> TensorDataset:
    digits = load_digits()
    x, y = (digits.x_train, digits.y_train) if train else (digits.x_test, digits.y_test)
    return TensorDataset(x * 2 - 1, y)  # normalised to [-1, 1], as many users' pipelines are


def digits_train() -> TensorDataset:
    return _split(True)


def digits_test() -> TensorDataset:
    return _split(False)
