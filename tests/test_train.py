import pytest
import torch

from pydefend import zoo
from pydefend.attacks import BadNets, make_attack
from pydefend.checkpoint import load_checkpoint
from pydefend.data import clean_split, load_digits
from pydefend.metrics import evaluate
from pydefend.augment import random_crop
from pydefend.train import train_backdoored


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny models gain nothing from threads, and on a busy CI machine the
    # thread barriers of an oversubscribed pool cost far more than the maths.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_badnets_on_digits_is_learned(digits):
    attack = BadNets(digits.input_shape, digits.num_classes, target=0, rate=0.1)
    model, metrics = train_backdoored(digits, "simple_cnn", {"width": 16}, attack, epochs=8,
                                      batch_size=64, lr=0.05, seed=0, progress=False)
    assert metrics["acc"] >= 0.85, metrics
    assert metrics["asr"] >= 0.9, metrics
    assert metrics["ra"] <= 0.1, metrics
    assert metrics["poisoned"] == round(0.1 * digits.x_train.shape[0])
    assert not model.training
    assert evaluate(model, digits, attack) == {k: metrics[k] for k in ("acc", "asr", "ra")}


def test_training_is_deterministic_in_the_seed(digits):
    small = digits.subset(300, 100)
    attack = make_attack("blended", small.input_shape, small.num_classes, seed=0)
    runs = [train_backdoored(small, "simple_cnn", {"width": 4}, attack, epochs=1, seed=seed,
                             progress=False)[0] for seed in (0, 0, 1)]
    first, second, other = (torch.cat([p.flatten() for p in m.parameters()]) for m in runs)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_random_crop_shifts_content_within_padding():
    x = torch.rand(16, 2, 6, 6)
    generator = torch.Generator().manual_seed(0)
    cropped = random_crop(x, 2, generator)
    assert cropped.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        assert any(torch.equal(cropped[i], padded[i, :, top:top + 6, left:left + 6])
                   for top in range(5) for left in range(5))


def test_train_argument_checks(digits):
    attack = BadNets(digits.input_shape, digits.num_classes)
    with pytest.raises(ValueError, match="epochs"):
        train_backdoored(digits, "simple_cnn", {}, attack, epochs=0, progress=False)


def test_zoo_caches_and_retrains_on_changed_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("PYDEFEND_ZOO", str(tmp_path))
    settings = dict(dataset_name="digits", model="simple_cnn", width=4, epochs=2, progress=False)
    model, meta = zoo.get_or_train("badnets", **settings)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").exists()
    assert meta["training"]["epochs"] == 2 and meta["attack"]["name"] == "badnets"
    digits = load_digits()
    assert meta["clean_indices"] == clean_split(digits, 0.05, 0).tolist()

    calls = []
    real_train = zoo.train_backdoored

    def counting_train(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(zoo, "train_backdoored", counting_train)
    cached, cached_meta = zoo.get_or_train("badnets", **settings)
    assert calls == [] and cached_meta == meta
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(cached(x), model(x))
    attack = zoo.attack_from_meta(cached_meta)
    assert torch.equal(attack.apply(x), BadNets((1, 8, 8), 10).apply(x))

    zoo.get_or_train("badnets", **{**settings, "epochs": 1})
    assert len(calls) == 1
    assert load_checkpoint(entries[0])[1]["training"]["epochs"] == 1
