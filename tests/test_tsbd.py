import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pydefend.defenses import TSBD, CleanData, TSBDConfig
from pydefend.defenses.tsbd import ActivenessAwareStep
from pydefend.metrics import evaluate
from pydefend.repaired import load_repaired, save_repaired



@pytest.fixture(scope="module")
def tsbd_and_stage1_inputs(demo_backdoor):
    """TSBD with its defaults on the demo's model, and copies of the two models its re-initialisation compared."""
    seen, reinitialise = {}, TSBD._reinitialise

    def spy(self, model, unlearned, *args):
        seen["backdoored"], seen["unlearned"] = copy.deepcopy(model), copy.deepcopy(unlearned)
        return reinitialise(self, model, unlearned, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TSBD, "_reinitialise", spy)
        result = TSBD().run(copy.deepcopy(demo_backdoor["model"]), demo_backdoor["clean"], progress=False)
    return result, seen


@pytest.fixture(scope="module")
def tsbd_run(tsbd_and_stage1_inputs):
    return tsbd_and_stage1_inputs[0]


def test_tsbd_removes_the_backdoor(demo_backdoor, tsbd_run):
    before = demo_backdoor["before"]
    after = evaluate(tsbd_run.model, demo_backdoor["dataset"], demo_backdoor["attack"])
    assert after["asr"] < 0.2 and before["asr"] > 0.9, (before, after)
    assert after["acc"] > before["acc"] - 0.12, (before, after)


def test_report_names_the_zeroed_neurons(tsbd_run):
    report = tsbd_run.report
    assert report["unlearning"]["reached"] and report["clean_accuracy"]["unlearned"] <= 0.10
    layers = report["layers"]
    assert {layer["type"] for layer in layers} == {"Conv2d"}
    total = sum(layer["neurons"] for layer in layers)
    selected = sum(len(layer["selected_neurons"]) for layer in layers)
    assert selected == round(0.15 * total)
    assert all(set(layer["zeroed_neurons"]) <= set(layer["selected_neurons"]) for layer in layers)
    assert report["zeroed_sub_weights"] == sum(layer["zeroed_sub_weights"] for layer in layers) > 0
    assert set(report["phases"]) == {"unlearn", "reinitialise", "finetune"}
    assert len(report["finetune"]) == 20
    assert all(p.grad is None for p in tsbd_run.model.parameters())
    assert not tsbd_run.model.training


def test_selected_neurons_are_the_top_ones_by_nwc(tsbd_and_stage1_inputs):
    """The report's selected neurons are the top 15 % by NWC over all convolutions, recomputed in float64."""
    result, seen = tsbd_and_stage1_inputs
    backdoored, unlearned = dict(seen["backdoored"].named_modules()), dict(seen["unlearned"].named_modules())
    scores, names = [], []
    for layer in result.report["layers"]:
        a, b = backdoored[layer["name"]].weight.double(), unlearned[layer["name"]].weight.double()
        nwc = (a - b).abs().flatten(1).sum(1)
        scores += nwc.tolist()
        names += [(layer["name"], k) for k in range(nwc.numel())]
    selected = {(layer["name"], n) for layer in result.report["layers"] for n in layer["selected_neurons"]}
    k = round(0.15 * len(scores))
    kth = sorted(scores, reverse=True)[k - 1]
    assert len(selected) == k and result.report["nwc_threshold"] == pytest.approx(kth, rel=1e-5)
    # the op accumulates in fp32: only neurons within its rounding of the k-th score may go either way
    above = {names[i] for i, s in enumerate(scores) if s > kth * (1 + 1e-5)}
    below = {names[i] for i, s in enumerate(scores) if s < kth * (1 - 1e-5)}
    assert above <= selected and not (below & selected)


def test_plots_and_round_trip(demo_backdoor, tsbd_run, tmp_path):
    for name, draw in tsbd_run.plots.items():
        assert draw(tmp_path / name) is not False and (tmp_path / name).stat().st_size > 0
    save_repaired(tmp_path, tsbd_run.model, demo_backdoor["spec"], "tsbd", tsbd_run.inserted, tsbd_run.report)
    x = demo_backdoor["dataset"].x_test[:64]
    with torch.no_grad():
        assert torch.equal(load_repaired(tmp_path)(x), tsbd_run.model(x))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def hand_step(model, x, y, lr, r, alpha, perturb_norm):
    """Algorithm 2 written out: two gradients from functional calls on separate parameter dicts."""
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def grad_at(params):
        params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = F.cross_entropy(functional_call(model, (params, copy.deepcopy(buffers)), (x,)), y)
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    g1 = grad_at(theta)
    if perturb_norm == "global":
        total = torch.sqrt(sum((g.double() ** 2).sum() for g in g1.values()))
        shifted = {k: theta[k] + r * g1[k] / total for k in theta}
    else:
        shifted = {k: theta[k] + r * g1[k] / g1[k].norm() for k in theta}
    g2 = grad_at(shifted)
    return {k: theta[k] - lr * ((1 - alpha) * g1[k] + alpha * g2[k]) for k in theta}


@pytest.mark.parametrize("perturb_norm", ["global", "per_tensor"])
def test_step_equals_hand_computed_two_gradient_update(perturb_norm):
    model = TinyNet().train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    expected = hand_step(model, x, y, lr=0.1, r=0.05, alpha=0.7, perturb_norm=perturb_norm)
    reference = copy.deepcopy(model)
    reference(x)  # the running statistics should see exactly one forward, at θ
    step = ActivenessAwareStep(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.05, 0.7, perturb_norm)
    step(x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-5, atol=1e-6)
    for (k, b), b_ref in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, b_ref), k


def test_weights_are_restored_exactly_between_the_two_gradients():
    model = TinyNet().train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    model.fc1.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.detach().clone()))
    # lr = 0: the optimizer step leaves θ as it is, so any change would come from an inexact restore
    step = ActivenessAwareStep(model, torch.optim.SGD(model.parameters(), lr=0.0), r=0.05, alpha=0.7)
    step(x, y)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert len(seen) == 2 and torch.equal(seen[0], before[0]) and not torch.equal(seen[1], before[0])
    # the second gradient was taken at θ + r·g1/‖g1‖: the global perturbation has norm r
    grads = hand_step(copy.deepcopy(model), x, y, lr=1.0, r=0.0, alpha=0.0, perturb_norm="global")
    g1 = {k: before[i] - grads[k] for i, (k, _) in enumerate(model.named_parameters())}
    total = torch.sqrt(sum((g ** 2).sum() for g in g1.values()))
    torch.testing.assert_close(seen[1] - seen[0], 0.05 * g1["fc1.weight"] / total, rtol=1e-4, atol=1e-7)


def test_unlearning_cap_warns_and_keeps_the_input_model(tiny_backdoor):
    model = tiny_backdoor["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TSBDConfig(unlearn_lr=1e-9, max_unlearn_epochs=2, finetune_epochs=1, inplace=False)
    with pytest.warns(UserWarning, match="did not bring the clean accuracy to 0.1 within max_unlearn_epochs=2"):
        result = TSBD().run(model, tiny_backdoor["clean"], config, progress=False)
    unlearning = result.report["unlearning"]
    assert not unlearning["reached"] and unlearning["epochs"] == 2 and unlearning["steps"] == 2
    assert result.report["clean_accuracy"]["unlearned"] > 0.5
    assert result.model is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def linear_only_model_and_data():
    torch.manual_seed(0)
    centers = torch.randn(10, 12) * 3
    y = torch.randint(0, 10, (200,))
    x = centers[y] + torch.randn(200, 12)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):  # accurate but not saturated: ascent on a saturated softmax barely moves
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), CleanData(x, y, 10)


def test_linear_layers_only_when_asked():
    model, clean = linear_only_model_and_data()
    with pytest.raises(ValueError, match="no conv layer.*layers='linear'"):
        TSBD().run(model, clean, progress=False)
    original = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    config = TSBDConfig(layers="linear", unlearn_lr=1e-2, finetune_epochs=0, batch_size=64)
    result = TSBD().run(model, clean, config, progress=False)
    layers = result.report["layers"]
    assert [layer["name"] for layer in layers] == ["0", "2", "4"] and result.report["unlearning"]["reached"]
    assert sum(len(layer["selected_neurons"]) for layer in layers) == round(0.15 * (32 + 32 + 10))
    # no fine-tuning: exactly the reported sub-weights are zero now, each in a selected neuron
    linears = [m for m in result.model if isinstance(m, nn.Linear)]
    for layer, lin, w0 in zip(layers, linears, original):
        newly_zero = (lin.weight == 0) & (w0 != 0)
        assert int(newly_zero.sum()) == layer["zeroed_sub_weights"]
        assert set(newly_zero.any(1).nonzero().flatten().tolist()) == set(layer["zeroed_neurons"])


def test_model_already_unlearned_is_refused():
    model, clean = linear_only_model_and_data()
    wrong = CleanData(clean.x, (clean.y + 1) % 10, 10)  # every label wrong: accuracy 0
    with pytest.raises(ValueError, match="nothing to unlearn"):
        TSBD().run(model, wrong, TSBDConfig(layers="linear"), progress=False)


def test_bad_config():
    with pytest.raises(ValueError, match="selection"):
        TSBDConfig(selection="layer")
    with pytest.raises(ValueError, match="neuron_ratio"):
        TSBDConfig(neuron_ratio=15)
    official = TSBDConfig.official()
    assert (official.perturb_norm, official.unlearn_check, official.finetune_epochs) == ("per_tensor", "epoch", 21)


def test_default_finetuning_on_a_model_without_batchnorm():
    model, clean = linear_only_model_and_data()  # no BatchNorm: no running statistics to restore
    config = TSBDConfig(layers="linear", unlearn_lr=1e-2, batch_size=64)
    assert config.finetune_epochs == TSBDConfig().finetune_epochs > 0
    zeroed = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    result = TSBD().run(model, clean, config, progress=False)
    accuracy = result.report["clean_accuracy"]
    assert accuracy["reinitialised"] < accuracy["original"] and accuracy["final"] > accuracy["reinitialised"]
    assert len(result.report["finetune"]) == config.finetune_epochs
    # fine-tuning moved the weights, zeroed ones included
    assert all(not torch.equal(m.weight, w) for m, w in
               zip((m for m in result.model if isinstance(m, nn.Linear)), zeroed))
