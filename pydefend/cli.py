"""Command line: ``pydefend attack`` trains one backdoored model, ``pydefend zoo`` a set,
``pydefend defend`` runs a defense on a checkpoint, ``pydefend demo`` is the main job.

User errors (bad arguments, missing files, bad data) print one line on
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .attacks import ATTACKS
from .models import MODELS

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the user's input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line instead of usage + message."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _number_type(parse, accepts, expected: str):
    """An argparse type: `parse` the text, then refuse values outside what `accepts` (NaN never passes)."""
    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value
    return convert


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_fraction = _number_type(float, lambda v: 0.0 < v < 1.0, "a number between 0 and 1 (exclusive)")
_clean_fraction = _number_type(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1] (1: all of --data)")
_positive_real = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_seed = _number_type(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")


MAX_WIDTH = 4096


def _width(text):
    value = _positive_int(text)
    if value > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WIDTH}, got {text}")
    return value


def _device(text):
    """'cpu', 'cuda' or 'cuda:N', refused here when this torch cannot reach it."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        raise argparse.ArgumentTypeError(f"{text} is not available: this torch ({torch.__version__}, {build}) "
                                         "sees no CUDA GPU; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text} is not available: this machine has "
                                         f"{torch.cuda.device_count()} CUDA device(s)")
    return text


def _json_object(text):
    import json
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"depth\": 4}}' ({exc})") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("is nested too deeply") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


DATA_HELP = ("digits, fashion_mnist, a .npz file (x_train, y_train, x_test, y_test; or x, y with --test-data), an "
             "image folder (one sub-folder per class) or module:factory returning a torch Dataset; append @HxW to "
             "resize")


def _add_data_options(parser, default_data):
    parser.add_argument("--data", default=default_data,
                        help=f"{DATA_HELP}; default: {default_data or 'the checkpoint' + chr(39) + 's data'}")
    parser.add_argument("--test-data", default=None,
                        help="the test set when --data is one split (.npz with x and y, an image folder or "
                             "module:factory): pydefend never splits your data itself")


def _add_model_options(parser, default_model):
    parser.add_argument("--model", default=default_model,
                        help="pydefend's own (" + ", ".join(sorted(MODELS)) + "), torchvision:NAME, timm:NAME, "
                             "transformers:CLASS, hf:CONFIG_DIR, path/to/file.py:NAME or package.module:NAME"
                             + (f"; default: {default_model}" if default_model else ""))
    parser.add_argument("--width", type=_width, default=None,
                        help="base channel count / embed dim of pydefend's models (default 16)")
    parser.add_argument("--num-classes", type=_positive_int, default=None,
                        help="classes of the model (default: from the data)")
    parser.add_argument("--in-chans", type=_positive_int, default=None, help="input channels (timm, transformers)")
    parser.add_argument("--img-size", type=_positive_int, default=None, help="input size (timm, transformers)")
    parser.add_argument("--model-args", type=_json_object, default=None, metavar="JSON",
                        help="keyword arguments of the model's class or factory, or its config fields")


def _add_training_options(parser, default_epochs):
    parser.add_argument("--epochs", type=_positive_int, default=default_epochs)
    parser.add_argument("--batch-size", type=_positive_int, default=128)
    parser.add_argument("--lr", type=_positive_real, default=0.05, help="peak learning rate (one-cycle)")
    parser.add_argument("--target", type=int, default=0, help="attack target class")
    parser.add_argument("--rate", type=_fraction, default=0.10, help="poison rate")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest "
                             "when other jobs share the cores)")
    parser.add_argument("--clean-fraction", type=_fraction, default=0.05,
                        help="training fraction kept clean for the defender (default 0.05)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_attack_parser(subparsers):
    parser = subparsers.add_parser("attack", help="train one backdoored model and save a checkpoint",
                                   description="Poison a dataset, train a model on it, report "
                                               "ACC/ASR/RA and save a safetensors checkpoint.")
    parser.add_argument("--attack", required=True, choices=sorted(ATTACKS))
    _add_data_options(parser, "digits")
    _add_model_options(parser, "preact_resnet18")
    _add_training_options(parser, default_epochs=10)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="SGD with Nesterov momentum, or AdamW (for transformers, e.g. with --lr 0.003)")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint directory (default: ./<attack>-<model>)")
    parser.set_defaults(handler=run_attack)


def add_zoo_parser(subparsers):
    parser = subparsers.add_parser("zoo", help="train (or reuse) one backdoored model per attack",
                                   description="Build the zoo of backdoored models and print a "
                                               "table of ACC/ASR/RA/training time.")
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blended", "sig", "wanet"],
                        choices=sorted(ATTACKS) + ["clean"], metavar="ATTACK",
                        help=f"any of {', '.join(sorted(ATTACKS))}, or clean (the same training without "
                             "poisoning); default: badnets blended sig wanet")
    parser.add_argument("--data", default="fashion_mnist",
                        help="digits or fashion_mnist (the zoo's own data), with @HxW to resize; default: "
                             "fashion_mnist")
    parser.add_argument("--model", default="preact_resnet18", choices=sorted(MODELS))
    parser.add_argument("--width", type=_width, default=16, help="base channel count / embed dim")
    _add_training_options(parser, default_epochs=6)
    parser.add_argument("--out", type=Path, default=None,
                        help="zoo directory (default: $PYDEFEND_ZOO or ~/.cache/pydefend/zoo)")
    parser.add_argument("--retrain", action="store_true", help="ignore cached models")
    parser.set_defaults(handler=run_zoo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pydefend", description="Backdoor removal for trained PyTorch classifiers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=_Parser)
    # Each subcommand registers itself with an add_*_parser(subparsers) function
    # that sets `handler`; add new subcommands (defend, demo, ...) here.
    add_attack_parser(subparsers)
    add_zoo_parser(subparsers)
    add_defend_parser(subparsers)
    add_demo_parser(subparsers)
    return parser


def _defense_names():
    from .defenses import REGISTRY
    return sorted(REGISTRY)


def add_defend_parser(subparsers):
    parser = subparsers.add_parser(
        "defend", help="run a defense on a model and report before/after metrics",
        description="Run a backdoor defense on your model (--model and --weights, with --data) or on a pydefend "
                    "checkpoint (a directory with model.safetensors and meta.json). Prints ACC (and ASR/RA/DER "
                    "when the attack is known) before and after, time and peak memory, and writes report.json, "
                    "plots and the repaired model (repaired.safetensors + repaired.json) to --out.")
    parser.add_argument("--method", required=True, choices=_defense_names())
    parser.add_argument("--checkpoint", type=Path, default=None, help="a pydefend checkpoint directory")
    parser.add_argument("--weights", type=Path, default=None,
                        help="your model's weights: safetensors, or a .pt/.pth state_dict (read with "
                             "torch.load(weights_only=True); a whole pickled model is refused)")
    _add_model_options(parser, None)
    _add_data_options(parser, None)
    parser.add_argument("--clean-fraction", type=_clean_fraction, default=0.05,
                        help="defender's share of the training data when no clean split is recorded (default "
                             "0.05; 1 uses all of --data)")
    parser.add_argument("--attack", default=None, choices=sorted(ATTACKS),
                        help="with --weights: the attack the model was trained with, to measure ASR and RA")
    parser.add_argument("--target", type=int, default=0, help="with --attack: its target class (default 0)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a defense setting, e.g. --set steps=300 (repeatable)")
    parser.add_argument("--preset", default=None,
                        help="a named configuration of the defense, e.g. 'official' (the authors' code)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: ./defended-<method>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_defend)


def add_demo_parser(subparsers):
    parser = subparsers.add_parser(
        "demo", help="the main job: every defense on the embedded backdoored model",
        description="Run every defense on the BadNets-backdoored PreAct-ResNet-18 embedded in the package "
                    "(Fashion-MNIST at 16x16, 3,000 clean training images for the defender) and print a "
                    "before/after table. Takes about nine minutes on two cores.")
    parser.add_argument("--out", type=Path, default=Path("pydefend-demo"), help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--methods", nargs="+", default=None, choices=_defense_names(), metavar="METHOD",
                        help=f"defenses to run (default: all of {', '.join(_defense_names())})")
    parser.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_demo)


def _model_from_args(args, dataset):
    """(spec, model with random weights) for --model and its size options, checked against the data."""
    from . import modelspec

    spec = modelspec.parse(args.model, num_classes=args.num_classes, in_channels=args.in_chans,
                           image_size=args.img_size, width=args.width, args=args.model_args)
    if spec["source"] == "pydefend" and "width" not in spec["config"]:
        spec["config"]["width"] = 16
    spec = modelspec.complete(spec, dataset)
    model = modelspec.build(spec, trust_code=True, example=dataset.x_test[:2])
    return spec, model


def _classes_of(model, dataset, device) -> int:
    """The model's output count; the data's labels must fit it."""
    import torch

    from .modelspec import logits_of

    with torch.no_grad():
        try:
            outputs = logits_of(model(dataset.x_test[:2].to(device))).shape[-1]
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise UsageError(f"the model cannot take the data's images of shape {tuple(dataset.input_shape)}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    labels = int(max(dataset.y_train.max(), dataset.y_test.max())) + 1
    if labels > outputs:
        raise UsageError(f"the data has labels up to {labels - 1} but the model has {outputs} outputs: pass the "
                         f"right --num-classes, or data whose classes are the model's")
    return outputs


def _check_recorded_data(data: dict, checkpoint: Path):
    """A checkpoint's meta.json names its data, and may come from someone you do not trust: it may name pydefend's
    datasets, or files and folders under the current directory or beside the checkpoint, never code."""
    from .data import NAMED_DATASETS, names_code, split_base

    allowed = [Path.cwd().resolve(), checkpoint.resolve().parent]
    for split, spec in data.items():
        if spec is None or split_base(spec) in NAMED_DATASETS:
            continue
        if names_code(spec):
            raise UsageError(f"{checkpoint} records data read by code ({spec}); pydefend imports code only when "
                             f"you name it: pass --data (and --test-data)")
        location = Path(split_base(spec)).resolve()
        if not any(location.is_relative_to(root) for root in allowed):
            raise UsageError(f"{checkpoint} records its {split} data at {location}, outside the current directory "
                             f"and the checkpoint's: pass --data (and --test-data) to use it")


def run_attack(args) -> int:
    import torch

    from .attacks import make_attack
    from .checkpoint import save_checkpoint
    from .data import absolute_spec, clean_split, load_dataset
    from .train import train_backdoored

    dataset = load_dataset(args.data, seed=args.seed, test=args.test_data)
    torch.manual_seed(args.seed)
    spec, model = _model_from_args(args, dataset)
    dataset.num_classes = _classes_of(model, dataset, "cpu")
    attack = make_attack(args.attack, dataset.input_shape, dataset.num_classes, target=args.target,
                         rate=args.rate, seed=args.seed)
    clean_indices = clean_split(dataset, args.clean_fraction, args.seed)
    model, metrics = train_backdoored(dataset, model, None, attack, epochs=args.epochs, batch_size=args.batch_size,
                                      lr=args.lr, seed=args.seed, device=args.device, progress=not args.quiet,
                                      reserved_indices=clean_indices, optimizer=args.optimizer)
    out = args.out or Path(f"{args.attack}-{spec['name'].rpartition(':')[2]}")
    training = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
                "seed": args.seed, "clean_fraction": args.clean_fraction}
    save_checkpoint(out, model, spec, dataset=dataset.name,
                    data={"train": absolute_spec(args.data), "test": absolute_spec(args.test_data)},
                    attack=attack.to_dict(), seed=args.seed, clean_indices=clean_indices.tolist(),
                    metrics={k: metrics[k] for k in ("acc", "asr", "ra")},
                    train_time_s=metrics["train_time_s"], extra={"training": training})
    print(f"{attack.name} on {dataset.name} with {args.model}: ACC {metrics['acc']:.4f}  "
          f"ASR {metrics['asr']:.4f}  RA {metrics['ra']:.4f}  ({metrics['train_time_s']:.1f} s)")
    print(f"checkpoint: {out}")
    return 0


def run_zoo(args) -> int:
    from .zoo import get_or_train

    rows = []
    for attack_name in args.attacks:
        _, meta = get_or_train(attack_name, dataset_name=args.data, model=args.model, width=args.width,
                               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               target=args.target, rate=args.rate, seed=args.seed,
                               clean_fraction=args.clean_fraction, cache_dir=args.out, device=args.device,
                               progress=not args.quiet, retrain=args.retrain)
        metrics = meta["metrics"]
        rows.append((attack_name, metrics["acc"], metrics.get("asr"), metrics.get("ra"), meta["train_time_s"]))
    fmt = lambda v: f"{v:>7.4f}" if v is not None else f"{'–':>7}"  # noqa: E731
    print(f"{'attack':<16} {'ACC':>7} {'ASR':>7} {'RA':>7} {'time (s)':>9}")
    for name, acc, asr, ra, seconds in rows:
        print(f"{name:<16} {fmt(acc)} {fmt(asr)} {fmt(ra)} {seconds:>9.1f}")
    return 0


def run_defend(args) -> int:
    from .attacks import make_attack
    from .checkpoint import CheckpointError, data_spec, load_checkpoint, load_meta, load_state_into, load_weights
    from .data import absolute_spec, clean_split, load_dataset
    from .defend import SUMMARY_HEADER, format_table, parse_overrides, run_defense, summary_row
    from .defenses import get_defense
    from .zoo import attack_from_meta

    config = parse_overrides(get_defense(args.method).Config, args.settings, args.preset)
    if (args.checkpoint is None) == (args.weights is None):
        raise UsageError("pydefend defend: give --model SPEC --weights FILE --data DATA, or --checkpoint DIR")
    if args.test_data and not args.data:
        raise UsageError("pydefend defend: --test-data goes with --data")
    if args.checkpoint is not None:
        meta = load_meta(args.checkpoint)
        data = ({"train": absolute_spec(args.data), "test": absolute_spec(args.test_data)} if args.data
                else data_spec(meta))
        if not data["train"]:
            raise UsageError(f"{args.checkpoint} names no dataset: pass --data")
        if not args.data:
            _check_recorded_data(data, args.checkpoint)
        dataset = load_dataset(data["train"], seed=meta.get("seed") or 0, test=data["test"])
        if args.model:
            spec, _ = _model_from_args(args, dataset)
            model, _ = load_checkpoint(args.checkpoint, device=args.device, spec=spec, trust_code=True)
        else:
            model, _ = load_checkpoint(args.checkpoint, device=args.device)
            spec = meta["model"]
        recorded = meta.get("clean_indices") if not args.data else None
        attack = attack_from_meta(meta) if meta.get("attack") else None
        source = {"checkpoint": str(args.checkpoint.resolve()), "data": data}
    else:
        if not args.model or not args.data:
            raise UsageError("pydefend defend: --weights needs --model (its architecture) and --data")
        data = {"train": absolute_spec(args.data), "test": absolute_spec(args.test_data)}
        dataset = load_dataset(args.data, seed=args.seed, test=args.test_data)
        spec, model = _model_from_args(args, dataset)
        try:
            load_state_into(model, load_weights(args.weights), args.weights)
        except CheckpointError as exc:
            if args.num_classes is None and "wrong shape" in str(exc):
                raise CheckpointError(f"{exc} (the model was sized for the {dataset.num_classes} classes of "
                                      f"{args.data}; pass --num-classes if the weights have another count)") from exc
            raise
        model = model.to(args.device)
        recorded = None
        attack = None
        source = {"weights": str(args.weights.resolve()), "data": data}
    dataset.num_classes = _classes_of(model, dataset, args.device)
    if args.attack:
        if attack is not None:
            raise UsageError(f"{args.checkpoint} records its attack: drop --attack")
        attack = make_attack(args.attack, dataset.input_shape, dataset.num_classes, target=args.target,
                             seed=args.seed)
    clean_indices = recorded if recorded else clean_split(dataset, args.clean_fraction, args.seed)
    out = args.out or Path(f"defended-{args.method}")
    report, _ = run_defense(args.method, model, dataset, attack, clean_indices, config, device=args.device,
                            progress=not args.quiet, out_dir=out, model_spec=spec, source=source,
                            overwrite=args.overwrite)
    print(format_table(SUMMARY_HEADER, [summary_row(args.method, report)]))
    print(f"report, plots and repaired model: {out}")
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    demo(out_dir=args.out, methods=args.methods, device=args.device, progress=not args.quiet,
         overwrite=args.overwrite)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        from .environment import record_command
        record_command(["pydefend"] + list(sys.argv[1:] if argv is None else argv))
        if getattr(args, "threads", None):
            import torch
            torch.set_num_threads(args.threads)
        return args.handler(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (ValueError, OSError, ImportError) as exc:
        # Data, attack, model and checkpoint problems are reported as ValueError,
        # FileNotFoundError or a missing optional package.
        print(f"pydefend: error: {exc}", file=sys.stderr)
    return EXIT_USAGE
