"""Finding activation sites in any nn.Module and inserting modules after them.

Defenses must not rely on attribute names, and models often call activations
functionally (F.relu, torch.relu, x.relu()). `locate` traces the model with
torch.fx, and every activation call — functional, method or module — becomes a
site. A model that cannot be traced (Python control flow on its inputs, as in
Hugging Face models) falls back to module outputs: activation modules (torch's
and Hugging Face's) and attention modules, found by type, with a forward hook
on each. Functional activations are then out of reach, and `locate` says so.
"""
from __future__ import annotations

import copy
import operator
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_OTHER_ACTIVATION_FUNCTIONS = {F.gelu, F.silu, F.relu6, F.leaky_relu, F.elu, torch.tanh, torch.sigmoid}
_OTHER_ACTIVATION_METHODS = {"tanh", "sigmoid"}
_ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid)


class UntraceableModel(ValueError):
    """The model's forward cannot be captured as a graph."""


@dataclass(frozen=True)
class Site:
    """One place in the graph whose output a defense bounds."""
    node: str  # fx node name, or the module's name (ModuleSites); stable for a given model definition
    kind: str  # "relu" (replaceable by a fused clip), "activation" or "attention"


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with attention blocks kept whole so that their output is one node (a site)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return _is_attention(module) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # the tracer raises many types; the message is what the user needs
        raise UntraceableModel(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); defenses that "
            "insert layers need a traceable forward (no data-dependent Python control flow)") from exc


def _site_kind(gm: fx.GraphModule, node: fx.Node, attention: bool):
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu"
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return "relu"
    if node.op == "call_function" and node.target in _OTHER_ACTIVATION_FUNCTIONS:
        return "activation"
    if node.op == "call_method" and node.target in _OTHER_ACTIVATION_METHODS:
        return "activation"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, _ACTIVATION_MODULES):
            return "activation"
        if attention and _is_attention(module) and not isinstance(module, nn.MultiheadAttention):
            return "attention"  # timm's and Hugging Face's blocks return their output tensor
    # nn.MultiheadAttention returns (output, weights): the site is output = getitem(mha, 0)
    if (attention and node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module"
            and isinstance(gm.get_submodule(node.args[0].target), nn.MultiheadAttention)):
        return "attention"
    return None


def find_sites(gm: fx.GraphModule, attention: bool = True) -> list[Site]:
    """Activation sites in graph order (and attention outputs when `attention`)."""
    sites = []
    for node in gm.graph.nodes:
        kind = _site_kind(gm, node, attention)
        if kind is not None:
            sites.append(Site(node.name, kind))
    return sites


def insert_after(gm: fx.GraphModule, modules: dict[str, nn.Module], replace_relu: bool = False) -> fx.GraphModule:
    """Route each site's output through modules[site.node].

    With replace_relu, a ReLU site is replaced by its module (which must apply
    the ReLU itself, e.g. a fused clip) instead of being followed by it.
    Modules are registered under `pydefend_sites.<node>`.
    """
    holder = nn.Module()
    for name, module in modules.items():
        holder.add_module(name, module)
    gm.add_module("pydefend_sites", holder)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in modules:
        if name not in nodes:
            raise KeyError(f"graph has no node {name!r}; was the model definition changed?")
        node = nodes[name]
        kind = _site_kind(gm, node, attention=True)
        if replace_relu and kind == "relu":
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(f"pydefend_sites.{name}", (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        else:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(f"pydefend_sites.{name}", (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
    return gm


@torch.no_grad()
def capture(gm: fx.GraphModule, sites: list[Site], batches, on_batch):
    """Run batches through gm and call on_batch(site_name, activation) at every site."""
    nodes = {n.name: n for n in gm.graph.nodes}
    taps = {}

    class _Tap(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            on_batch(self.name, x)
            return x

    probe = fx.GraphModule(gm, gm.graph.__deepcopy__())  # shares gm's submodules, not its graph
    for site in sites:
        if site.node not in nodes:
            raise KeyError(f"graph has no node {site.node!r}")
        taps[site.node] = _Tap(site.node)
    insert_after(probe, taps)
    probe.eval()
    for x in batches:
        probe(x)


# --------------------------------------------------------------------------- module sites (no tracing)
def _activation_types() -> tuple:
    """torch's activation modules and, when the model's library is loaded, Hugging Face's."""
    types = list(_ACTIVATION_MODULES)
    hf = sys.modules.get("transformers.activations")
    for entry in getattr(hf, "ACT2CLS", {}).values():
        types.append(entry[0] if isinstance(entry, tuple) else entry)
    return tuple(types)


def _is_attention(module: nn.Module) -> bool:
    # nn.MultiheadAttention, and the attention blocks of timm and Hugging Face ("ViTAttention", "Attention"),
    # which share no base class: their class name is the one thing they have in common
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


def find_module_sites(model: nn.Module, attention: bool = True) -> list[Site]:
    """Activation modules and the outermost attention modules, in module order."""
    sites, inside_attention = [], ()
    activations = _activation_types()
    for name, module in model.named_modules():
        if not name or (inside_attention and name.startswith(inside_attention)):
            continue
        if isinstance(module, nn.ReLU):
            sites.append(Site(name, "relu"))
        elif isinstance(module, activations):
            sites.append(Site(name, "activation"))
        elif attention and _is_attention(module):
            sites.append(Site(name, "attention"))
            inside_attention = (*inside_attention, name + ".")
    return sites


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"a site's module returned {type(output).__name__}; expected a tensor or a tuple starting with one")


class _BoundOutput:
    """Forward hook: the module's output (or its first element) through `bound`. A callable object rather than
    a closure, so that deep-copying the model copies the hook together with its bound."""

    def __init__(self, bound: nn.Module):
        self.bound = bound

    def __call__(self, module, inputs, output):
        if isinstance(output, torch.Tensor):
            return self.bound(output)
        return (self.bound(_first_tensor(output)), *output[1:])


def attach_to_modules(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """Route each named module's output through modules[name] with a forward hook; the modules are registered
    under `pydefend_sites.site<i>` in the order given."""
    holder = nn.Module()
    for index, (name, bound) in enumerate(modules.items()):
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"model has no module {name!r}; was the model definition changed?") from None
        holder.add_module(f"site{index}", bound)
        target.register_forward_hook(_BoundOutput(bound))
    model.add_module("pydefend_sites", holder)
    return model


class GraphSites:
    """The sites of a traced graph."""
    via = "graph"

    def __init__(self, model: nn.Module, attention: bool):
        self.gm = trace(model)
        self.sites = find_sites(self.gm, attention)
        self.note = "sites from the traced graph (functional, method and module activations)"

    def capture(self, batches, on_batch):
        capture(self.gm, self.sites, batches, on_batch)

    def insert(self, modules: dict[str, nn.Module]) -> nn.Module:
        return insert_after(self.gm, modules, replace_relu=True)


class ModuleSites:
    """The sites of a model torch.fx cannot trace: module outputs, reached with forward hooks."""
    via = "modules"

    def __init__(self, model: nn.Module, attention: bool, reason: str):
        # a new module tree over the same parameters and buffers: the caller's model gets no hooks
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.model = copy.deepcopy(model, memo=shared)
        self.sites = find_module_sites(self.model, attention)
        self.note = (f"{reason}; sites are the outputs of activation and attention modules instead "
                     "(functional activations such as F.gelu inside forward are not bounded)")

    @torch.no_grad()
    def capture(self, batches, on_batch):
        hooks = [self.model.get_submodule(s.node).register_forward_hook(
            lambda module, inputs, output, name=s.node: on_batch(name, _first_tensor(output))) for s in self.sites]
        try:
            for x in batches:
                self.model(x)
        finally:
            for hook in hooks:
                hook.remove()

    def insert(self, modules: dict[str, nn.Module]) -> nn.Module:
        return attach_to_modules(self.model, modules)


def locate(model: nn.Module, attention: bool = True):
    """GraphSites when torch.fx traces the model, ModuleSites otherwise; `.note` says which and why."""
    try:
        return GraphSites(model, attention)
    except UntraceableModel as exc:
        return ModuleSites(model, attention, str(exc))


def insert_recorded(model: nn.Module, modules: dict[str, nn.Module], via: str) -> nn.Module:
    """Re-insert modules recorded by a defense (see pydefend.repaired) the way they were inserted."""
    if via == "modules":
        return attach_to_modules(model, modules)
    return insert_after(trace(model), modules, replace_relu=True)
