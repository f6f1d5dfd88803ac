"""Command line: ``clbench run | sweep | reproduce | report | data synth | data check | data convert | memory | plot``."""
from __future__ import annotations

import argparse
import errno
import functools
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import yaml

from clbench.engine.config import ConfigError
from clbench.reporting.profile import add_reproduce_parser
from clbench.reporting.report import add_report_parser
from clbench.sweep import add_sweep_parser
from clbench.sweep.status import add_status_parser

RUN_EXAMPLES = textwrap.dedent(
    """\
    examples:
      clbench run --method padim --tasks 5 --image-size 64            # synthetic data, first 5 tasks
      clbench run --config configs/quickstart.yaml
      clbench run --method padim --data-root /data/mvtec --tasks paper10 --backbone wide_resnet50_2 \\
                  --weights imagenet --image-size 224 --device auto
      clbench run --config configs/quickstart.yaml --resume            # continue a killed run
      clbench run --method padim --strategy joint --tasks all --param n_features=50
    """
)


def _parse_value(text: str) -> Any:
    """YAML scalars, so --param n_features=50 is an int and layers=[layer1,layer2] a list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parse_params(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    params = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag}: expected KEY=VALUE, got '{item}'")
        params[key] = _parse_value(value)
    return params


def _parse_tasks(text: str | None) -> Any:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    if "," in text:
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


SYNTHETIC_CHOICES = {"auto": "auto", "true": True, "false": False}


def _synthetic_choice(text: str) -> bool | str:
    """``--synthetic`` as the config key's value: the word ``auto``, or a boolean."""
    try:
        return SYNTHETIC_CHOICES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from auto, true, false)") from None


def _add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a task-sequence experiment",
        description="Train a method on a sequence of tasks, evaluating every task after every step.",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML config (flags override its keys)")
    p.add_argument("--method", help="method name (see `clbench methods`)")
    p.add_argument("--strategy", help="sequential | joint | replay")
    p.add_argument("--tasks", help="comma list of categories, 'all', a count N (first N), a preset (mvtec, paper10, "
                                   "visa, dne) or a protocol (mvtec:10-5, visa:8-1x4, 10-5: steps of several categories)")
    p.add_argument("--task-order", dest="task_order", choices=["given", "shuffle"])
    p.add_argument("--backbone", help="timm model name, e.g. resnet18, wide_resnet50_2")
    p.add_argument("--weights", help="auto | none | imagenet | PATH to a local weights file")
    p.add_argument("--image-size", dest="image_size", type=int, help="resize images to this size")
    p.add_argument("--crop-size", dest="crop_size", type=int, help="then center-crop them to this size (e.g. 256 -> 224)")
    p.add_argument("--require-pretrained", dest="require_pretrained", action="store_true", default=None,
                   help="refuse to start if a backbone's weights resolve to random init")
    p.add_argument("--allow-random-init", dest="require_pretrained", action="store_false",
                   help="allow random-init backbones even if the config requires pretrained weights")
    p.add_argument("--val-fraction", dest="val_fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs-scale", dest="epochs_scale", type=float, help="scale trainable methods' epochs (e.g. 0.1)")
    p.add_argument("--max-epochs", dest="max_epochs", type=int, help="cap trainable methods' epochs")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--decode-workers", dest="decode_workers", type=int,
                   help="threads decoding images ahead of the method (default: min(4, CPUs) on CUDA, spare cores on CPU; 0: none)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help="write the checkpoint every K steps (default 1; the last step always): a killed run "
                        "redoes at most K-1 steps on --resume")
    p.add_argument("--amp", action="store_true", default=None,
                   help="mixed precision for trainable methods (fp16 + grad scaling on CUDA, bf16 on CPU)")
    p.add_argument("--evaluation", help="agnostic (default: the method gets only the image) | oracle (also the "
                                        "test image's task index, for methods that route, e.g. PatchCore)")
    p.add_argument("--data-root", dest="data_root", help="dataset in MVTec AD layout (default: built-in synthetic)")
    p.add_argument("--synthetic", type=_synthetic_choice, metavar="{auto,true,false}",
                   help="generate the built-in synthetic dataset: auto (only at the default data root), true (at "
                        "--data-root if missing, empty or clbench's), false (never)")
    p.add_argument("--output", dest="output_dir", help="results folder (default: results)")
    p.add_argument("--name", help="run folder name")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method hyper-parameter (repeatable)")
    p.add_argument("--strategy-param", action="append", metavar="KEY=VALUE", help="strategy parameter (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run folder from its last completed step")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=None,
                   help="do not draw the plots at the end (draw them later with clbench plot RUN)")
    p.add_argument("--probe-maps", dest="probe_maps", type=int, metavar="N",
                   help="defect test images per task whose maps are kept after every step and drawn as "
                        "plots/maps_<task>.png (default 2; 0: none, for large sweeps)")
    p.add_argument("--tracker", dest="trackers", action="append", choices=["tensorboard", "mlflow"],
                   help="mirror the run into an experiment tracker (repeatable; off by default): tensorboard writes "
                        "event files under the run folder, mlflow a local store mlruns/ in the output folder")
    p.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI (default: OUTPUT/mlruns)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks of errors")


def cmd_run(args: argparse.Namespace) -> int:
    from clbench.engine import config as config_mod
    from clbench.engine.runner import run_experiment
    from clbench.engine.validation import validate_run

    overrides = {
        key: getattr(args, key)
        for key in ("method", "strategy", "task_order", "backbone", "weights", "image_size", "crop_size", "val_fraction",
                    "seed", "device", "data_root", "output_dir", "name", "epochs_scale", "max_epochs",
                    "require_pretrained", "synthetic", "evaluation", "plots", "amp", "decode_workers",
                    "checkpoint_every", "probe_maps", "trackers", "tracking_uri")
    }
    overrides["tasks"] = _parse_tasks(args.tasks)
    config = config_mod.load(args.config, overrides)
    config.method_params.update(_parse_params(args.param, "--param"))
    config.strategy_params.update(_parse_params(args.strategy_param, "--strategy-param"))
    validate_run(config)  # every value, --param and --strategy-param included: one line before anything is read
    run_dir = run_experiment(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    _print_run(run_dir)
    return 0


def _print_run(run_dir: Path) -> None:
    import pandas as pd

    from clbench.engine.rundir import RunFolder

    folder = RunFolder(run_dir)
    summary = folder.summary()
    print(f"\nrun: {run_dir}")
    print("pixel AUROC (rows: after training step; columns: evaluated task)")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(folder.accuracy_matrix("pixel_auroc", summary.get("tasks")).round(3).to_string())
    for metric in ("pixel_auroc", "image_auroc", "pixel_aupro"):
        values = (summary.get("metrics") or {}).get(metric)
        if values:
            acc, bwt, fm = _number(values.get("acc"), ".3f"), _number(values.get("bwt"), "+.3f"), _number(values.get("fm"), ".3f")
            print(f"{metric:12s} ACC {acc}  BWT {bwt}  FM {fm}")
    print(f"plots: {folder.plots_dir}")


def _number(value: Any, spec: str) -> str:
    """A summary value for the terminal: null (undefined, NaN) reads "n/a"."""
    return "n/a" if value is None or value != value else format(value, spec)


def cmd_synth(args: argparse.Namespace) -> int:
    """Write the synthetic dataset only into a folder clbench owns (new, empty or marked)."""
    from clbench.data.synth import synthesize

    names = synthesize(args.out, categories=args.categories, size=args.size, seed=args.seed, workers=args.workers,
                       profile=args.profile, count_scale=args.count_scale)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Print the dataset's table and every fault (errors on stderr); exit 2 if any is an error."""
    from clbench.data.check import check_dataset, format_report

    report = check_dataset(args.root, args.val_fraction, args.seed, args.image_size, args.crop_size)
    out, errors = format_report(report)
    print("\n".join(out), flush=True)
    if errors:
        print("\n".join(errors), file=sys.stderr)
    return 2 if errors else 0


def _option_pairs(pairs: Sequence[str] | None) -> dict[str, str]:
    """``--option KEY=VALUE`` (repeatable) as a dict; a word without '=' is one error line naming it."""
    options: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def cmd_convert(args: argparse.Namespace) -> int:
    """Lay a distributed dataset out in MVTec layout by links; one line per category (from the marker)."""
    from clbench.data.formats import convert_dataset, read_conversion_marker

    wanted = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    names = convert_dataset(args.format, args.src, args.dst, wanted, **_option_pairs(args.option))
    recorded = (read_conversion_marker(args.dst) or {}).get("categories", {})
    for name in names:
        info = recorded.get(name, {})
        n = info.get("counts", {})
        print(f"{name}: train {n.get('train', '?')}, validation {n.get('validation', '?')}, test good "
              f"{n.get('test_good', '?')}, test anomalous {n.get('test_anomalous', '?')}; defects: "
              f"{', '.join(info.get('defects', [])) or '-'}; masks: {info.get('mask_convention') or '-'}")
        for note in info.get("notes", []):
            print(f"  note: {note}")
    print(f"converted {len(names)} categories ({args.format}) from {args.src} to {args.dst}: "
          f"check it with clbench data check {args.dst}, run it with --data-root {args.dst}")
    return 0


class _FormatsHelp(argparse.RawDescriptionHelpFormatter):
    """Lists the registered dataset formats when ``data convert --help`` is shown (and only then:
    building the parser imports no format, nor torch)."""

    def _format_text(self, text: str) -> str:
        if "{formats}" in text:
            from clbench.data.formats import FORMATS

            listing = "\n".join(f"  {name:<12} {FORMATS.get(name).description}" for name in FORMATS.names())
            text = text.replace("{formats}", listing)
        return super()._format_text(text)


def cmd_memory(args: argparse.Namespace, extra: list[str]) -> int:
    from clbench.engine.memory import format_bytes
    from methods.base import METHODS
    from strategies.base import STRATEGIES

    if args.method is None and args.replay is None:
        raise ConfigError("memory: give --method M and/or --replay N")
    if args.strategy is not None and args.method is None:
        raise ConfigError("memory: --strategy needs --method (what a strategy stores depends on the method)")

    def show(title: str, components: dict[str, int], total_prefix: str, total_label: str) -> None:
        print(title)
        for key, value in components.items():
            print(f"  {key:32s} {value:>15,d} B  {format_bytes(value):>12s}")
        total = sum(v for k, v in components.items() if k.startswith(total_prefix))
        print(f"  {total_label:32s} {total:>15,d} B  {format_bytes(total):>12s}")

    if args.method is not None:
        params = _parse_params(args.param, "--param")
        params.update(_flags_to_params(extra))
        if args.backbone:
            params["backbone"] = args.backbone
        method_cls = METHODS.get(args.method)
        try:
            components = method_cls.analytic_memory(params, args.image_size)
        except NotImplementedError as err:
            if args.strategy is None:
                raise
            print(f"{err}; its memory.csv measures it")
        else:
            show(f"{args.method} at {args.image_size}px, analytic (fp32):", components, "method_state", "method state (total)")
        if args.strategy is not None:
            strategy_cls = STRATEGIES.get(args.strategy)
            strategy_params = strategy_cls.resolve_params(_parse_params(args.strategy_param, "--strategy-param"))
            components = strategy_cls.analytic_memory(strategy_params, args.image_size,
                                                      _probe_method(method_cls, params, args.image_size))
            show(f"strategy {args.strategy} for {args.method} at {args.image_size}px (full buffers):", components, "",
                 "continual-learning memory (total)")
    elif extra:
        raise ConfigError(f"memory: unexpected arguments {' '.join(extra)} without --method")
    if args.replay is not None:
        components = STRATEGIES.get("replay").analytic_memory({"buffer_size": args.replay}, args.image_size)
        show(f"replay buffer of {args.replay} images at {args.image_size}px (uint8 RGB):", components, "replay", "replay buffer (total)")
    return 0


def _probe_method(method_cls: Any, params: dict[str, Any], image_size: int) -> Any:
    """The method built as a run would build it (random-init backbones, CPU, no data): what a strategy
    copies or stores of it has the same shapes whatever the weights."""
    import torch

    from clbench.features.backbones import BackbonePool
    from methods.base import MethodContext

    pool = BackbonePool("none", torch.device("cpu"), 0, cache_bytes=1 << 30, spill_dir=None)
    context = MethodContext(pool, torch.device("cpu"), image_size, progress=False)
    return method_cls(context, **method_cls.resolve_params(params))


def _flags_to_params(extra: list[str]) -> dict[str, Any]:
    """Unknown ``--key value`` flags of ``clbench memory`` become method parameters (e.g. --budget)."""
    params, i = {}, 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--") or i + 1 >= len(extra):
            raise ConfigError(f"memory: cannot parse argument '{flag}' (use --KEY VALUE or --param KEY=VALUE)")
        params[flag[2:].replace("-", "_")] = _parse_value(extra[i + 1])
        i += 2
    return params


def cmd_plot(args: argparse.Namespace) -> int:
    """The written PNGs on stdout (one path a line, for scripts); warnings (a metric or memory.csv
    missing, a truncated row) on stderr, one ``warning: ...`` line each like ``report``'s, not
    Python's format with a source line."""
    import warnings

    from clbench.reporting.plots import plot_run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            paths = plot_run(args.run_dir, metrics=tuple(args.metric or ("pixel_auroc", "image_auroc")))
        finally:  # also the warnings that came before an error
            for warning in caught:
                print(f"warning: {' '.join(str(warning.message).split())}", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Names and one-line descriptions, read from the source (``clbench.registry.index``): no method
    is imported, so this takes a fraction of a second and no torch."""
    from clbench.registry import index

    for title, package in (("methods", "methods"), ("\nstrategies", "strategies")):
        entries = index(package)
        print(f"{title}:")
        for name in sorted(entries):
            print(f"  {name:12s} {entries[name].summary}")
    return 0


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser. One that a method declares (``CLI_COMMANDS``, see ``clbench.registry``)
    is a stand-in with the declared help until it parses (or shows its help): then ``load`` imports
    the method, whose ``add_cli_commands`` builds the real parser, and the stand-in hands over to it,
    so ``clbench --help`` lists the command without importing torch."""

    def __init__(self, *args: Any, load: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._load = load  # callable(subparsers) that adds this command's real parser, or None
        self._real: argparse.ArgumentParser | None = None

    def _built(self) -> argparse.ArgumentParser:
        if self._real is None:
            scratch = argparse.ArgumentParser(prog=self.prog).add_subparsers()
            self._load(scratch)
            command = self.prog.split()[-1]
            if command not in scratch.choices:
                raise ValueError(f"command '{command}' is declared in CLI_COMMANDS but its method's "
                                 "add_cli_commands does not add it")
            self._real = scratch.choices[command]
            self._real.prog = self.prog
        return self._real

    def parse_known_args(self, args: Any = None, namespace: Any = None):  # type: ignore[override]
        if self._load is None:
            return super().parse_known_args(args, namespace)
        return self._built().parse_known_args(args, namespace)

    def format_help(self) -> str:
        return super().format_help() if self._load is None else self._built().format_help()


def _add_method_commands(sub) -> None:
    """The commands method packages declare (``CLI_COMMANDS``, read from the source): each is listed
    with its help and built by its method (``add_cli_commands``) only when used; the CLI names no method."""
    from clbench.registry import index

    added: set[str] = set()
    for entry in index("methods").values():
        for command, help_text in entry.commands.items():
            if command in added:
                continue  # a package of several methods (its ``__init__`` declares it once)
            if command in sub.choices:
                raise ValueError(f"method '{entry.name}' declares command '{command}', which clbench already has")
            sub.add_parser(command, help=help_text, load=functools.partial(_method_cli, entry.name))
            added.add(command)


def _method_cli(method: str, subparsers) -> None:
    from methods.base import METHODS  # imports torch: only when a method's own command is used

    METHODS.get(method).add_cli_commands(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Building it imports no method and no torch: the commands that method
    packages add are stand-ins until used (``_CommandParser``)."""
    parser = argparse.ArgumentParser(prog="clbench", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    _add_run_parser(sub)
    add_sweep_parser(sub)
    add_reproduce_parser(sub)
    add_report_parser(sub)
    add_status_parser(sub)

    data = sub.add_parser("data", help="datasets: generate the synthetic one, check one on disk, convert one")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser(
        "synth", help="write the built-in synthetic dataset (MVTec layout) into a new, empty or clbench-generated folder")
    synth.add_argument("--out", type=Path, required=True,
                       help="a new or empty folder (then marked as clbench's), or one clbench generated before")
    synth.add_argument("--categories", type=int, default=15)
    synth.add_argument("--size", type=int,
                       help="image side in px, one for all categories (default: the profile's: 128; mvtec: MVTec AD's "
                            "original size per category, 700-1024)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--profile", default="default", metavar="{default,mvtec}",
                       help="default: 40 train, 8 good and 4 per defect type per category; mvtec: MVTec AD's "
                            "train/test counts and original sizes per category (3629 train, 1725 test images)")
    synth.add_argument("--count-scale", dest="count_scale", type=float, default=1.0,
                       help="scale every count (rounded half up, at least 1), e.g. 0.05 for a quick mvtec-shaped set")
    synth.add_argument("--workers", type=int, help="processes, one category each (default: one per CPU for 4+ categories)")
    synth.set_defaults(func=cmd_synth)
    check = data_sub.add_parser(
        "check", help="validate a dataset in MVTec layout: a table, every note and warning, every error (exit 2 on errors)")
    check.add_argument("root", type=Path)
    check.add_argument("--val-fraction", type=float, default=0.1)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--image-size", type=int, help="also report defect masks that vanish at this run resolution")
    check.add_argument("--crop-size", type=int, help="... and this center crop")
    check.set_defaults(func=cmd_check)
    convert = data_sub.add_parser(
        "convert", formatter_class=_FormatsHelp,
        help="lay a distributed dataset (VisA, MVTec LOCO, ...) out in MVTec layout by symlinks, never writing into SRC",
        description="Lay a distributed dataset out in MVTec layout under DST: symlinks to the source images\n"
                    "and masks (a written PNG only where several mask files are merged), never writing into\n"
                    "SRC; running it again completes a killed conversion.\n\nformats:\n{formats}")
    convert.add_argument("format", metavar="FORMAT", help="a dataset format (listed in --help)")
    convert.add_argument("src", type=Path, metavar="SRC", help="the dataset as distributed (read only)")
    convert.add_argument("dst", type=Path, metavar="DST", help="a new or empty folder, or one this conversion wrote")
    convert.add_argument("--categories", help="comma-separated categories (default: all the source has)")
    convert.add_argument("--option", action="append", metavar="KEY=VALUE",
                         help="a format option (repeatable; e.g. real-iad's camera view)")
    convert.set_defaults(func=cmd_convert)

    mem = sub.add_parser("memory", help="analytic memory of a method's state, a replay buffer, and/or what a strategy stores (e.g. --budget 30000 for patchcore)")
    mem.add_argument("--method")
    mem.add_argument("--replay", type=int, metavar="N", help="size of a replay buffer in images")
    mem.add_argument("--strategy", help="with --method: what the strategy stores for it (e.g. ewc, der, latent_replay, replay+ewc)")
    mem.add_argument("--strategy-param", action="append", metavar="KEY=VALUE", help="a strategy parameter (e.g. buffer_size=100)")
    mem.add_argument("--backbone")
    mem.add_argument("--image-size", type=int, default=224)
    mem.add_argument("--param", action="append", metavar="KEY=VALUE")

    plot = sub.add_parser("plot", help="(re)draw a run's plots")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--metric", action="append")
    plot.set_defaults(func=cmd_plot)

    sub.add_parser("methods", help="list methods and strategies").set_defaults(func=cmd_methods)
    _add_method_commands(sub)
    return parser


# Exceptions that are a user's input or environment, not a bug: one line, no traceback (--debug shows it).
USER_ERRORS = (ConfigError, ValueError, FileExistsError, FileNotFoundError, NotImplementedError)
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def error_line(err: BaseException) -> str:
    """The one line printed for a user or environment error (an OSError names its file)."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        line = f"{where}{err.strerror}"
        if err.errno in FULL_DISK:
            line += " (disk full or file-size limit: files already written are kept; free space, then --resume)"
        return line
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "memory":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    debug = getattr(args, "debug", False)
    try:
        if args.command == "memory":
            return cmd_memory(args, extra)
        if args.command == "run":
            return cmd_run(args)
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        hint = "; run the same command with --resume to continue from the last completed step" if args.command == "run" else ""
        print(f"\nclbench: interrupted{hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"clbench: error: {error_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment: permissions, a full disk, a file-size limit
        if debug:
            raise
        print(f"clbench: error: {error_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
