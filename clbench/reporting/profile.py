"""Paper profiles: a paper's experiment as one command, ``clbench reproduce <profile>``.

A profile (``clbench/reporting/profiles/<name>.yaml``, package data) is a sweep spec (``sweep:``,
with ``per_method`` settings) plus what the paper needs around it (``profile:``): the outside inputs
(folders/files given on the command line, e.g. the DTD for DRAEM), the published figures, and the
differences the profile knowingly has from the paper's code. ``plan`` turns a profile and the
command line into the sweep's cells; every cell records in its config (and env.json,
``paper_profile``) everything that differs from the paper: the profile's own known differences
for that method, each ``--set`` override that applies to it, stand-in inputs, random init.

Everything is checked before anything is written: a missing input is one line naming its flag and
path, a backbone whose weights resolve to random init is one line (unless ``--allow-random-init``,
which is recorded), the task list is resolved against the data root's folder names (no image is
read). ``--dry-run`` lists the cells with their resolved settings in seconds (feature dims from the
architecture alone, built on the meta device).

Choices: ``--set KEY=VALUE`` applies to every cell that takes the key (``method_params.X`` only to
methods with a hyper-parameter X, ``strategy_params.X`` only to strategies with X) and is an error if
no cell takes it; ``--weights BACKBONE=PATH`` gives a local weights file to the cells whose backbone
is BACKBONE (methods use different backbones, so one ``--weights`` cannot serve all).
"""
from __future__ import annotations

import argparse
import copy
import textwrap
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from clbench.engine.config import ConfigError, from_mapping
from clbench.sweep import (
    Cell,
    SweepSpec,
    expand,
    set_dotted,
    spec_from_mapping,
    validate_cell,
)
from clbench.sweep.cli import add_executor_arguments, executor_from_args

PROFILE_KEYS = ("profile", "sweep")
NOT_SETTABLE = ("method", "seed", "name", "output_dir", "paper_profile")  # set by the profile / other flags


# --------------------------------------------------------------------------------------------
# the profile file
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileInput:
    name: str
    flag: str
    kind: str  # dir | file
    key: str  # run-config key it sets (dotted)
    what: str
    methods: tuple[str, ...] | None = None  # the methods that need it; None: every cell
    stand_in: str | None = None  # the word that asks for a recorded stand-in
    stand_in_means: str = ""

    def needed_by(self, methods: Sequence[str]) -> bool:
        return self.methods is None or any(m in self.methods for m in methods)

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods


@dataclass
class Profile:
    name: str
    title: str
    inputs: list[ProfileInput]
    differences: dict[str, list[str]]  # "all" and per method
    not_in_paper: list[str]
    published: dict[str, Any]
    sweep: dict[str, Any]
    path: str

    @property
    def methods(self) -> list[str]:
        """The profile's methods in grid order."""
        grids = self.sweep.get("grid") or []
        grids = grids if isinstance(grids, list) else [grids]
        return list(dict.fromkeys(m for g in grids for m in g.get("method", [])))

    def known_differences(self, method: str, strategy: str) -> list[str]:
        """The profile's own differences from the paper's code for a cell: "all", its strategy's, its method's."""
        return [d for key in ("all", strategy, method) for d in self.differences.get(key, [])]


def profile_names() -> list[str]:
    folder = resources.files("clbench.reporting") / "profiles"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name: str) -> Profile:
    """A shipped profile by name (``clad``) or a profile file by path."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        text, source = Path(name).read_text(), name
    else:
        resource = resources.files("clbench.reporting") / "profiles" / f"{name}.yaml"
        if not resource.is_file():
            raise ConfigError(f"profile: unknown profile '{name}' (available: {', '.join(profile_names()) or 'none'})")
        text, source = resource.read_text(), f"profile {name}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML ({str(err).splitlines()[0]})") from None
    unknown = [k for k in data if k not in PROFILE_KEYS] if isinstance(data, dict) else ["(not a mapping)"]
    if unknown or not isinstance(data.get("profile"), dict) or not isinstance(data.get("sweep"), dict):
        raise ConfigError(f"{source}: expected a mapping with 'profile' and 'sweep'")
    meta = data["profile"]
    inputs = []
    for entry in meta.get("inputs") or []:
        methods = entry.get("methods")
        inputs.append(ProfileInput(entry["name"], entry["flag"], entry.get("kind", "dir"), entry["key"], entry.get("what", ""),
                                   tuple(methods) if methods else None, entry.get("stand_in"), entry.get("stand_in_means", "")))
    return Profile(
        name=str(meta.get("name") or name), title=str(meta.get("title") or ""), inputs=inputs,
        differences={k: list(v) for k, v in (meta.get("differences") or {}).items()},
        not_in_paper=list(meta.get("not_in_paper") or []), published=dict(meta.get("published") or {}),
        sweep=dict(data["sweep"]), path=source,
    )


# --------------------------------------------------------------------------------------------
# command line -> cells
# --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    profile: Profile
    spec: SweepSpec
    cells: list[Cell]
    inputs: dict[str, str | None] = field(default_factory=dict)  # input name -> path, stand-in word, or None (not needed)
    tasks: dict[str, list[str]] = field(default_factory=dict)  # cell -> resolved task list


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sets(items: Sequence[str] | None) -> list[tuple[str, Any]]:
    sets = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE, got '{item}'")
        if key.split(".")[0] in NOT_SETTABLE:
            hint = " (use --seeds)" if key == "seed" else " (use --only)" if key == "method" else ""
            raise ConfigError(f"--set: '{key}' is set by the profile or its own flag{hint}")
        sets.append((key, _parse_value(value)))
    return sets


def _check_input(item: ProfileInput, value: str | None) -> str | None:
    """The absolute path, the stand-in word, or a one-line error naming the flag and the path."""
    if value is None:
        extra = f", or `{item.flag} {item.stand_in}` for a recorded stand-in" if item.stand_in else ""
        raise ConfigError(f"{item.flag}: missing ({item.what}){extra}")
    if item.stand_in is not None and value == item.stand_in:
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{item.flag}: {path} does not exist ({item.what})")
    if item.kind == "dir" and not path.is_dir():
        raise ConfigError(f"{item.flag}: {path} is not a folder ({item.what})")
    if item.kind == "file" and not path.is_file():
        raise ConfigError(f"{item.flag}: {path} is not a file ({item.what})")
    return str(path.resolve())


def _get_dotted(mapping: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = mapping
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _takes(key: str, method_cls, strategy_cls) -> bool:
    """Whether a cell of this method/strategy takes the override ``key``."""
    head, _, rest = key.partition(".")
    if head == "method_params" and rest:
        return rest.split(".")[0] in method_cls.hyperparameters
    if head == "strategy_params" and rest:
        return rest.split(".")[0] in strategy_cls.hyperparameters
    if head == "backbone":
        return "backbone" in method_cls.hyperparameters
    return True


def _show(value: Any) -> str:
    """A value as written on the command line: strings bare, the rest as JSON (lists, null)."""
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _default(key: str, method_cls, strategy_cls) -> Any:
    """What ``key`` is for a cell that does not set it: the method's, strategy's or RunConfig's default."""
    head, _, rest = key.partition(".")
    if head == "method_params" and rest:
        return _get_dotted(method_cls.hyperparameters, rest)
    if head == "strategy_params" and rest:
        return _get_dotted(strategy_cls.hyperparameters, rest)
    return _get_dotted(from_mapping({}).to_dict(), key)


def _backbone(config: Mapping[str, Any], method_cls) -> str | None:
    params = method_cls.resolve_params(config.get("method_params") or {})
    return config.get("backbone") or params.get("backbone")


def plan(
    profile: Profile,
    *,
    inputs: Mapping[str, str | None],
    sets: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    only: Sequence[str] | None = None,
    allow_random_init: bool = False,
    weights: Sequence[str] = (),
    output_dir: str | None = None,
    name: str | None = None,
) -> Plan:
    """The profile's cells for this command line; raises ConfigError (one line) before anything is written."""
    from methods.base import METHODS
    from strategies.base import STRATEGIES

    methods = profile.methods
    if only:
        unknown = [m for m in only if m not in methods]
        if unknown:
            raise ConfigError(f"--only: '{unknown[0]}' is not a method of profile {profile.name} (methods: {', '.join(methods)})")
        methods = [m for m in methods if m in only]
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    resolved_inputs: dict[str, str | None] = {}
    for item in profile.inputs:
        resolved_inputs[item.name] = _check_input(item, inputs.get(item.name)) if item.needed_by(methods) else None
    weight_files: dict[str, str] = {}
    for entry in weights:
        backbone, sep, path = entry.partition("=")
        if not sep or not backbone or not path:
            raise ConfigError(f"--weights: expected BACKBONE=PATH, got '{entry}'")
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"--weights: {file} does not exist (weights file for {backbone})")
        weight_files[backbone] = str(file.resolve())
    overrides = parse_sets(sets)

    sweep = copy.deepcopy(profile.sweep)
    grids = sweep.get("grid") or []
    grids = grids if isinstance(grids, list) else [grids]
    sweep["grid"] = [dict(g, seed=list(seeds)) for g in grids if any(m in methods for m in g.get("method", []))]
    for g in sweep["grid"]:
        g["method"] = [m for m in g["method"] if m in methods]
    if name is not None:
        sweep["name"] = name
    spec = spec_from_mapping(sweep, profile.path, output_dir)
    cells = expand(spec, check=False)

    applied: set[str] = set()
    tasks: dict[str, list[str]] = {}
    for cell in cells:
        config = cell.config
        method = config["method"]
        method_cls = METHODS.get(method)
        strategy_cls = STRATEGIES.get(config.get("strategy", "sequential"))
        differences = profile.known_differences(method, config.get("strategy", "sequential"))
        for item in profile.inputs:
            value = resolved_inputs.get(item.name)
            if value is None or not item.applies_to(method):
                continue
            if item.stand_in is not None and value == item.stand_in:
                set_dotted(config, item.key, None, profile.path)
                differences.append(f"stand-in {item.flag} {value}: {item.stand_in_means}")
            else:
                set_dotted(config, item.key, value, profile.path)
        for key, value in overrides:
            if not _takes(key, method_cls, strategy_cls):
                continue
            before = _get_dotted(config, key, _default(key, method_cls, strategy_cls))
            applied.add(key)
            if before == value:
                continue  # what the profile does already: not a difference
            set_dotted(config, key, value, "--set")
            differences.append(f"--set {key}={_show(value)} (profile: {_show(before)})")
        backbone = _backbone(config, method_cls)
        if backbone is not None and backbone in weight_files:
            config["weights"] = weight_files[backbone]
        if allow_random_init:
            config["require_pretrained"] = False
            differences.append("--allow-random-init: a backbone without pretrained weights runs random-init")
            if backbone is not None:
                from clbench.features.backbones import resolve_weights

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    info = resolve_weights(backbone, config.get("weights", "auto"))
                if not info.pretrained:
                    differences.append(f"backbone {backbone}: random init (weights '{info.requested}' resolve to no pretrained weights)")
        config["paper_profile"] = {"name": profile.name, "title": profile.title,
                                   "not_in_paper": method in profile.not_in_paper, "differences": differences}
    for key, _ in overrides:
        if key not in applied:
            raise ConfigError(f"--set {key}: no cell of profile {profile.name} takes it")

    from clbench.data import DatasetError, RootScan, scan_root
    from clbench.engine.runner import check_pretrained
    from clbench.engine.tasks import resolve_tasks

    scans: dict[str, RootScan] = {}
    for cell in cells:
        config = validate_cell(cell, profile.path)
        try:
            if config.data_root not in scans:
                scans[config.data_root] = scan_root(config.data_root)
            scan = scans[config.data_root]
            tasks[cell.name] = resolve_tasks(config.tasks, scan.categories, config.task_order, config.seed,
                                             root=config.data_root, incomplete=scan.incomplete)
        except (DatasetError, ValueError) as err:
            raise ConfigError(f"--data-root: {err}") from None
        if config.require_pretrained:
            method_cls = METHODS.get(config.method)
            params = method_cls.resolve_params(config.method_params)
            if config.backbone is not None:
                params["backbone"] = config.backbone
            try:
                check_pretrained(method_cls, params, config.weights)
            except ValueError as err:  # ConfigError, or a bad weights path
                raise ConfigError(f"{cell.name}: {err}") from None
    return Plan(profile, spec, cells, resolved_inputs, tasks)


# --------------------------------------------------------------------------------------------
# the dry run
# --------------------------------------------------------------------------------------------
def describe_cell(cell: Cell) -> dict[str, str]:
    """The resolved settings of a cell, from its config and the architectures alone (no weights, no images)."""
    from clbench.features.backbones import feature_info, resolve_weights
    from methods.base import METHODS
    from strategies.base import STRATEGIES

    config = from_mapping(cell.config)
    method_cls = METHODS.get(config.method)
    params = method_cls.resolve_params(config.method_params)
    if config.backbone is not None:
        params["backbone"] = config.backbone
    strategy = {**STRATEGIES.get(config.strategy).hyperparameters, **config.strategy_params}
    size = config.eval_size
    row = {"cell": cell.name, "method": config.method}
    replay = "buffer_size" in strategy
    row["strategy"] = config.strategy + (f" {strategy['buffer_size']} ({strategy.get('policy')})" if replay else "")
    backbone = params.get("backbone")
    if backbone and "model_size" not in params:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = resolve_weights(backbone, config.weights)
        source = {"none": "random init", "cache": "cache", "download": "download", "file": "file"}[info.source]
        row["backbone"] = f"{backbone} ({info.tag + ', ' if info.tag else ''}{source})"
        layers = params.get("layers") or []
        row["layers"] = "+".join(str(layer).replace("layer", "") for layer in layers) if layers else "-"
        channels, reductions = feature_info(backbone, layers)
        side = -(-size // reductions[0])
        dims = f"{sum(channels)} ({'+'.join(map(str, channels))}) @ {side}x{side}"
        if "n_features" in params:
            from methods.padim import default_n_features

            dims += f" -> {params['n_features'] or default_n_features(backbone, sum(channels))}"
        row["features"] = dims
    elif "model_size" in params:
        row["backbone"] = f"PDN {params['model_size']} (teacher)"
        row["layers"] = "-"
        row["features"] = f"{params.get('out_channels', '?')} ch"
    else:
        row["backbone"], row["layers"], row["features"] = "-", "-", "-"
    row["size"] = f"{config.image_size} -> crop {config.crop_size}" if config.crop_size else str(config.image_size)
    if "epochs" in params:
        epochs = max(1, round(params["epochs"] * config.epochs_scale))
        if config.max_epochs is not None:
            epochs = min(epochs, config.max_epochs)
        patience = params.get("patience")
        row["epochs"] = f"{epochs}" + (f" (early stop, patience {patience})" if patience else "")
    else:
        row["epochs"] = "- (one pass)"
    batch = params.get("batch_size")
    row["batch"] = "-" if batch is None else (f"{batch}+{batch}" if replay and strategy["buffer_size"] else str(batch))
    used = [f"{k}={Path(str(v)).name}" for k, v in params.items()
            if k in ("anomaly_source", "penalty_dir", "teacher_weights") and v is not None]
    stand = [k for k in ("anomaly_source", "penalty_dir", "teacher_weights") if k in params and params[k] is None]
    row["inputs"] = ", ".join(used + [f"{k}=stand-in" for k in stand]) or "-"
    return row


def dry_run_text(p: Plan) -> str:
    """The dry run: tasks, inputs, one table row per cell, then the differences (each once, with its methods)."""
    from clbench.reporting.tables import markdown_table

    rows = [describe_cell(c) for c in p.cells]
    headers = list(rows[0]) if rows else []
    lines = []
    if p.cells:
        tasks = p.tasks.get(p.cells[0].name, [])
        lines.append(f"tasks ({len(tasks)}): {', '.join(tasks)}")
    for item in p.profile.inputs:
        value = p.inputs.get(item.name)
        if value is not None:
            users = f" ({', '.join(item.methods)})" if item.methods else ""
            lines.append(f"{item.flag} {value}{users}")
    lines += ["", markdown_table(headers, [[r[h] for h in headers] for r in rows], [False] * len(headers)), ""]
    lines.append("differences from the paper (recorded in each run's env.json, paper_profile):")
    methods: dict[str, list[str]] = {}
    for cell in p.cells:
        for d in cell.config["paper_profile"]["differences"]:
            users = methods.setdefault(d, [])
            if cell.config["method"] not in users:
                users.append(cell.config["method"])
    everyone = list(dict.fromkeys(c.config["method"] for c in p.cells))
    for d, users in methods.items():
        lines.append(f"  [{'all' if users == everyone and len(everyone) > 1 else ', '.join(users)}] {d}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
REPRODUCE_EXAMPLES = textwrap.dedent(
    """\
    examples:
      clbench reproduce clad --data-root /data/mvtec --dtd /data/dtd/images --imagenet /data/imagenet/train \\
                             --teacher /models/teacher_medium.pth --dry-run      # list the cells, run nothing
      clbench reproduce clad --data-root /data/mvtec --dtd /data/dtd/images --imagenet /data/imagenet/train \\
                             --teacher /models/teacher_medium.pth --workers 2 --seeds 0,1,2
      clbench reproduce clad ... --only padim,patchcore                           # a subset of the methods
      clbench reproduce clad ... --set tasks=3 --set max_epochs=2                 # recorded as differences
      clbench report results/sweeps/clad                                          # with the paper's table

    Inputs may be replaced by recorded stand-ins: --dtd procedural, --imagenet procedural,
    --teacher distil. Backbones need pretrained weights (timm's .tv_in1k, from the HF hub / torch hub
    cache or downloaded; --weights BACKBONE=PATH for a local file) unless --allow-random-init.
    """
)


def add_reproduce_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reproduce",
        help="run a paper's experiment (a profile: clad) in one command",
        description="Run every cell of a paper profile as a sweep (<output>/<profile>/runs/<cell>), recording in each "
                    "run everything that differs from the paper. Profiles: " + ", ".join(profile_names()),
        epilog=REPRODUCE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("profile", help="profile name (e.g. clad) or a profile YAML file")
    p.add_argument("--data-root", dest="data_root", help="the dataset in MVTec AD layout")
    p.add_argument("--dtd", help="the Describable Textures Dataset folder (DRAEM), or 'procedural'")
    p.add_argument("--imagenet", help="a folder of ImageNet images (EfficientAD's penalty), or 'procedural'")
    p.add_argument("--teacher", help="EfficientAD's pretrained PDN teacher file, or 'distil'")
    p.add_argument("--weights", action="append", default=[], metavar="BACKBONE=PATH",
                   help="a local weights file for the cells using BACKBONE (repeatable)")
    p.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    p.add_argument("--only", help="comma list of the profile's methods to run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key in every cell that takes it (recorded as a difference)")
    p.add_argument("--allow-random-init", action="store_true",
                   help="run backbones without pretrained weights random-init (recorded) instead of refusing")
    add_executor_arguments(p)
    p.add_argument("--output", dest="output_dir", help="sweeps folder (default: the profile's, results/sweeps)")
    p.add_argument("--name", help="sweep name (default: the profile's)")
    p.add_argument("--dry-run", action="store_true", help="check the inputs, list every cell's settings, run nothing")
    p.set_defaults(func=cmd_reproduce)
    return p


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected a comma list of integers, got '{text}'") from None
    if any(v < 0 for v in values):
        raise ConfigError(f"{flag}: seeds must be non-negative, got '{text}'")
    return values


def plan_from_args(args: argparse.Namespace) -> Plan:
    profile = load_profile(args.profile)
    inputs = {"data_root": args.data_root, "dtd": args.dtd, "imagenet": args.imagenet, "teacher": args.teacher}
    only = [m.strip() for m in args.only.split(",") if m.strip()] if args.only else None
    return plan(profile, inputs=inputs, sets=args.sets, seeds=_int_list(args.seeds, "--seeds"), only=only,
                allow_random_init=args.allow_random_init, weights=args.weights, output_dir=args.output_dir,
                name=args.name)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from clbench.sweep import run_sweep

    p = plan_from_args(args)
    executor = executor_from_args(args)
    sweep_dir = Path(p.cells[0].sweep_dir) if p.cells else None
    print(f"reproduce {p.profile.name}: {p.profile.title}")
    if args.dry_run:
        run_sweep(p.spec, executor, dry_run=True, cells=p.cells)
        print(dry_run_text(p))
        return 0
    print(dry_run_text(p))
    outcome = run_sweep(p.spec, executor, cells=p.cells)
    if sweep_dir is not None:
        print(f"paper table: clbench report {sweep_dir}")
    return 1 if outcome.failed else 0
