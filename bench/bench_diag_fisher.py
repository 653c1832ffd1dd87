"""diag_fisher: diagonal empirical Fisher, pydefend vs vmap(grad) vs BackPACK vs Opacus.

    python bench/bench_diag_fisher.py                       # CPU: ResNet-18 (CIFAR) and a ViT-small-like stack
    python bench/bench_diag_fisher.py --device cuda --large # GPU: also ResNet-50 at batch 256 and ViT-B/16
    python bench/bench_diag_fisher.py --batch 128 --providers plain,pydefend,vmap   # a subset of the rows

Every provider computes sum_n g_n^2 of a cross-entropy sum loss, models in eval mode (BackPACK's
BatchNorm extensions need it; Opacus runs in train mode, the same function for models without BatchNorm or
dropout, and it rejects BatchNorm). Time is one forward+backward+Fisher step, reported as a ratio to a
plain forward+backward at the same batch, measured in the same run. Peak memory: bytes allocated
above the starting point during one step (CUDA allocator, or the profiler's CPU allocation events).
A provider that cannot run a model says why (unsupported layer, out of memory).
"pydefend (all params, torch ops)" is the path before the fused C++ kernels: per-sample Linear/Conv2d
gradients by torch GEMMs over bounded chunks of samples (the reference backend), norm layers in C++.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import _EventType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, markdown_table, peak_cuda_bytes, time_ms  # noqa: E402

from pydefend.ops import diag_fisher as df  # noqa: E402
from pydefend.ops.diag_fisher import DiagFisher  # noqa: E402


# --------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


def resnet18_cifar(classes=10):
    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


def resnet50(classes=1000):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class ViTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        n, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, -1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, length, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    def __init__(self, image=32, patch=4, d=384, depth=4, heads=6, classes=10):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.blocks = nn.Sequential(*[ViTBlock(d, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)
        self.pos = (image // patch) ** 2

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(tokens)).mean(1))


MODELS = {
    "resnet18-cifar": (resnet18_cifar, (3, 32, 32), 10),
    "vit-small-4blk": (lambda: ViT(32, 4, 384, 4, 6), (3, 32, 32), 10),
    "resnet50": (resnet50, (3, 224, 224), 1000),
    "vit-b16": (lambda: ViT(224, 16, 768, 12, 12, 1000), (3, 224, 224), 1000),
}


# --------------------------------------------------------------------------- providers
def plain(model, x, t):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), t, reduction="sum").backward()


@contextlib.contextmanager
def without_fused_gemm_kernels():
    """Linear/Conv2d ops on their torch reference path, as before the cpp backend existed."""
    saved = [(t, t.pop("cpp")) for t in (df.LINEAR_BACKENDS, df.CONV_BACKENDS)]
    try:
        yield
    finally:
        for table, backend in saved:
            table["cpp"] = backend


def pydefend_provider(params, fused=True):
    def make(model):
        fisher = DiagFisher(model, params)

        def step(model, x, t):
            model.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if fused else without_fused_gemm_kernels(), fisher.accumulate():
                fisher.backward(F.cross_entropy(model(x), t, reduction="none"))
        return step, fisher.detach
    return make


def vmap_provider(model):
    from torch.func import functional_call, grad, vmap
    names = [n for n, _ in model.named_parameters()]

    def loss_one(p, xi, ti):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), ti[None])

    def step(model, x, t):
        params = {n: p.detach() for n, p in model.named_parameters()}
        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, t)
        return {n: per_sample[n].square().sum(0) for n in names}
    return step, lambda: None


def backpack_provider(kind):
    def make(model):
        import backpack
        from backpack.extensions import BatchGrad, SumGradSquared
        ext = backpack.extend(model, use_converter=True)
        loss_fn = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))

        def step(_model, x, t):
            ext.zero_grad(set_to_none=True)
            loss = loss_fn(ext(x), t)
            with backpack.backpack(SumGradSquared() if kind == "sgs" else BatchGrad()):
                loss.backward()
            if kind == "batchgrad":
                return [p.grad_batch.square().sum(0) for p in ext.parameters()]
            return [p.sum_grad_squared for p in ext.parameters()]
        return step, lambda: None
    return make


def opacus_provider(model):
    from opacus import GradSampleModule
    gsm = GradSampleModule(model.train(), loss_reduction="sum")  # Opacus records activations in train mode only

    def step(_model, x, t):
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), t, reduction="sum").backward()
        out = [p.grad_sample.square().sum(0) for p in gsm.parameters()]
        for p in gsm.parameters():
            p.grad_sample = None
        return out
    return step, gsm._close


PROVIDERS = {
    "pydefend (norm affine)": pydefend_provider("norm"),
    "pydefend (all params)": pydefend_provider("all"),
    "pydefend (all params, torch ops)": pydefend_provider("all", fused=False),
    "vmap(grad) + square-sum": vmap_provider,
    "BackPACK SumGradSquared": backpack_provider("sgs"),
    "BackPACK BatchGrad squared": backpack_provider("batchgrad"),
    "Opacus GradSampleModule squared": opacus_provider,
}


def peak_cpu_bytes(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    steps, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # every allocation and free with its time (a private but stable profiler API)
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation:
            steps.append((e.start_time_ns, e.typed[1].alloc_size))
        stack.extend(e.children)
    live = top = 0
    for _, delta in sorted(steps):
        live += delta
        top = max(top, live)
    return top


def run_one(model_name, batch, device, repeats, providers):
    factory, shape, classes = MODELS[model_name]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, classes, (batch,), device=device)
    peak = peak_cuda_bytes if device == "cuda" else peak_cpu_bytes
    rows = []
    model = factory().to(device).eval()
    base_ms = time_ms(lambda: plain(model, x, t), device, repeats=repeats, warmup=1)
    base_mem = peak(lambda: plain(model, x, t))
    rows.append([f"{model_name} · batch {batch}", "plain forward+backward", f"{base_ms:.0f}", "1.00×",
                 f"{base_mem / 2**20:.0f}"])
    for name, make in PROVIDERS.items():
        if not any(name.startswith(p) for p in providers):
            continue
        model = factory().to(device).eval()
        try:
            step, close = make(model)
            ms = time_ms(lambda: step(model, x, t), device, repeats=repeats, warmup=1)
            mem = peak(lambda: step(model, x, t))
            close()
            rows.append(["", name, f"{ms:.0f}", f"{ms / base_ms:.2f}×", f"{mem / 2**20:.0f}"])
        except (torch.OutOfMemoryError, MemoryError):
            rows.append(["", name, "out of memory", "", ""])
        except Exception as e:  # an unsupported layer: report it, keep going
            if "can't allocate memory" in str(e):  # the CPU allocator's out-of-memory error is a RuntimeError
                rows.append(["", name, "out of memory", "", ""])
                continue
            rows.append(["", name, f"fails: {type(e).__name__}: {str(e).splitlines()[0][:70]}", "", ""])
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
    p.add_argument("--large", action="store_true", help="also ResNet-50 and ViT-B/16 at batch 256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--models", default="resnet18-cifar,vit-small-4blk", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--providers", default="", help="comma-separated name prefixes (default: all)")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="CPU: cap this process's address space (a smaller machine), to show who runs out of memory")
    args = p.parse_args(argv)
    if args.memory_cap_gib:
        import resource
        cap = int(args.memory_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (32 if args.device == "cpu" else 128)
    providers = [s.strip() for s in args.providers.split(",") if s.strip()] or [""]
    cap = f" · address space capped at {args.memory_cap_gib:g} GiB" if args.memory_cap_gib else ""
    print(f"diag_fisher (eval mode, float32) · {machine_line(args.device)}{cap}\n")
    rows = []
    for name in args.models.split(","):
        rows += run_one(name, batch, args.device, args.repeats, providers)
    if args.large:
        for name in ("resnet50", "vit-b16"):
            rows += run_one(name, 256, args.device, args.repeats, providers)
    print(markdown_table(["model", "provider", "ms per step", "vs plain fwd+bwd", "peak MiB"], rows))


if __name__ == "__main__":
    main()
