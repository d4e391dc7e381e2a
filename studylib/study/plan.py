"""The study's plan: params/study.yaml expanded into cells (notebook runs), every one validated before anything runs.

One small planner per notebook, registered with the block of the scale it receives (`planner`): `plan_study`
calls them in order, each adding its cells to a `PlanContext`. A codec run (03) is named
`runs/<arm>-<config hash>-s<seed>`; the other notebooks get a folder of their name.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studylib.core import config as cfglib
from studylib.model.codec import EMA_QUANTIZERS
from studylib.training.baselines import OPUS_BITRATES, OPUS_MAX_KBPS, OPUS_MIN_KBPS
from studylib.training.bounds import check_fits
from studylib.training.latents import expand_grid
from studylib.training.manifest import load_manifest
from studylib.training.run_config import NOT_HASHED, TrainConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository (params/, notebooks/)
NOTEBOOKS = ("01_bug_anatomy", "02_quantizer_study", "03_train_codec", "04_compare", "05_codebook_audit",
             "06_cpu_recipe", "07_long_horizon", "08_regimes")
CODEC_NOTEBOOK = "03_train_codec"
SCALE_KEYS = ("corpus", "train_params", "cell_timeout_s", "notebooks", "codec", "quantizer", "anatomy", "audit",
              "compare", "recipe", "horizon", "regimes")
CODEC_KEYS = ("arms", "seeds", "arm_seeds", "nproc_per_node", "evaluate", "set", "groups")
# a codec group: runs of their own settings within a scale (regimes: one codebook of 4096, a frozen encoder...);
# arms, seeds, evaluate and set default to the codec block's (set: overlaid on it)
GROUP_KEYS = ("arms", "seeds", "arm_seeds", "evaluate", "set", "init_from")
QUANTIZER_KEYS = ("latents_from", "base", "grid")
REGIMES_KEYS = ("latents_from", "base", "grid", "jobs", "train_cells", "compare_scales", "arm", "baseline",
                "milestones")  # 08_regimes
RECIPE_KEYS = ("arm", "steps", "valid_every", "seed", "variants")
VARIANT_KEYS = ("change", "set")
RUNNER_KEYS = ("manifest", "results_dir", "out_dir", "progress")  # parameters every cell gets from the runner
OFFICIAL_ENCODEC = Path.home() / ".cache" / "torch" / "hub" / "checkpoints" / "encodec_24khz-d7cc33bc.th"


class StudyError(cfglib.ConfigError):
    """Bad study parameters; one line naming the key and what is allowed."""



@dataclass
class Cell:
    """One notebook execution."""

    name: str  # its folder relative to the scale's results folder, e.g. runs/fixed_rel-1a2b3c4d5e-s0
    notebook: str
    parameters: dict[str, Any]
    needs: tuple[str, ...] = ()
    arm: str | None = None
    seed: int | None = None
    gpus: int = 0  # GPUs it takes when the runner dispatches over --gpus
    always: bool = False  # re-run even when complete (aggregations over what is on disk)
    requires: tuple[str, ...] = ()  # cells an aggregation cannot do without (08: the run whose latents it maps)



@dataclass
class StudyPlan:
    scale: str
    results: Path  # results/<scale>
    manifest: Path
    corpus: str | None  # profile to build when the manifest is missing
    timeout_s: int
    cells: list[Cell]
    selected: set[str]  # names of the cells this invocation runs
    notebooks: Path = ROOT / "notebooks"  # where <cell.notebook>.ipynb is read from
    params: Path = ROOT / "params"  # the params folder the cells' overlays come from

    def folder(self, cell: Cell) -> Path:
        return self.results / cell.name

    def notebook_path(self, cell: Cell) -> Path:
        return self.notebooks / f"{cell.notebook}.ipynb"



def _check_keys(where: str, mapping: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(mapping, dict):
        raise StudyError(f"{where}: expected a mapping, got {mapping!r}")
    for key in mapping:
        if key not in allowed:
            raise StudyError(f"{where}.{key}: unknown key; allowed keys: {', '.join(allowed)}")
    return mapping



def load_study(path: str | Path, scale: str) -> dict:
    """The settings of one scale from params/study.yaml, keys checked."""
    data = cfglib.read_overlay(path)
    scales = _check_keys(str(path), data, ("scales",)).get("scales") or {}
    if scale not in scales:
        raise StudyError(f"--scale: got {scale!r}, allowed {sorted(scales)} (from {path})")
    settings = _check_keys(f"scales.{scale}", scales[scale], SCALE_KEYS)
    for name in settings.get("notebooks", NOTEBOOKS):
        if name not in NOTEBOOKS:
            raise StudyError(f"scales.{scale}.notebooks: {name!r} unknown; allowed {NOTEBOOKS}")
    _check_keys(f"scales.{scale}.codec", settings.get("codec", {}), CODEC_KEYS)
    _check_keys(f"scales.{scale}.quantizer", settings.get("quantizer", {}), QUANTIZER_KEYS)
    _check_keys(f"scales.{scale}.regimes", settings.get("regimes", {}), REGIMES_KEYS)
    return settings



def notebook_parameters(path: Path) -> tuple[str, ...]:
    """The names of a notebook's `parameters` cell, as papermill reads them (what it can inject)."""
    return tuple(notebook_defaults(path))



@dataclass
class PlanContext:
    """What the planners share while a scale is expanded: its settings, where things are, the cells so far."""

    scale: str
    settings: dict
    params: Path  # the params folder (study.yaml, scales/, arms/)
    scale_file: Path  # the codec runs' TrainConfig overlay: params/scales/<train_params>.yaml
    manifest: Path
    results: Path  # results/<scale>
    groups: list[dict]  # the codec block's groups, resolved (`_codec_groups`)
    cells: list[Cell] = field(default_factory=list)
    codec_runs: dict[tuple[str, int], Cell] = field(default_factory=dict)  # the first group's runs, by (arm, seed)
    group_runs: dict[str, list[Cell]] = field(default_factory=dict)  # every group's runs, in order

    @property
    def compare(self) -> dict:
        """04's parameters (evaluation settings, Opus bitrates), which 06 and 07 share."""
        codec = self.settings.get("codec", {})
        return {"evaluate": dict(codec.get("evaluate") or {}), "opus_bitrates": list(OPUS_BITRATES),
                **(self.settings.get("compare") or {})}

    def codec_run(self, key: str, arm: str) -> Cell:
        """The first group's run of `arm` at its first seed (what `key` of the scale names)."""
        arms, seeds = self.groups[0]["arms"], self.groups[0]["seeds"]
        if (arm, seeds[0]) not in self.codec_runs:
            raise StudyError(f"scales.{self.scale}.{key}: {arm!r} is not among the codec arms {arms}")
        return self.codec_runs[(arm, seeds[0])]

    def codec_cells(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cells if c.notebook == CODEC_NOTEBOOK)

    def arm_file(self, where: str, arm: str) -> Path:
        path = self.params / "arms" / f"{arm}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (self.params / "arms").glob("*.yaml"))
            raise StudyError(f"{where}: {arm!r} unknown; allowed {known}")
        return path


@dataclass(frozen=True)
class Planner:
    """How one notebook enters a scale: the function adding its cells, and the block of the scale it receives.
    A block's keys are the notebook's parameters, less the runner's and those the planner derives (`derived`),
    plus the block's own (`extra`, translated by the planner)."""

    notebook: str
    plan: Callable[[PlanContext], None]
    block: str | None = None
    derived: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()


PLANNERS: dict[str, Planner] = {}  # in planning order: a cell is planned after the cells it needs


def planner(notebook: str, block: str | None = None, derived: tuple[str, ...] = (), extra: tuple[str, ...] = ()):
    """Register the decorated function as `notebook`'s planner (its `block` of the scale checked against the
    notebook's parameters cell before anything runs)."""
    def register(plan: Callable[[PlanContext], None]) -> Callable[[PlanContext], None]:
        PLANNERS[notebook] = Planner(notebook, plan, block, derived, extra)
        return plan
    return register


def check_notebook_blocks(scale: str, settings: dict, notebooks: Path = ROOT / "notebooks") -> None:
    """Every key of the notebook blocks of a scale (anatomy, audit, compare, horizon) names a parameter of its
    notebook (StudyError naming the block, the key and the allowed keys otherwise)."""
    for p in PLANNERS.values():
        if p.block in settings and p.block in ("anatomy", "audit", "compare", "horizon"):
            names = notebook_parameters(notebooks / f"{p.notebook}.ipynb")
            allowed = tuple(p.extra) + tuple(n for n in names if n not in RUNNER_KEYS + tuple(p.derived))
            _check_keys(f"scales.{scale}.{p.block}", settings[p.block] or {}, allowed)


def _check_cells_against_notebooks(scale: str, cells: list[Cell], notebooks: Path) -> None:
    """Every parameter the runner hands a notebook, but the common ones (`RUNNER_KEYS`, which a notebook may
    leave out), is one of its parameters, of the type and range its parameters cell gives (`check_value`): the
    runner and the notebooks agree before anything runs."""
    for cell in cells:
        defaults = notebook_defaults(notebooks / f"{cell.notebook}.ipynb")
        unknown = sorted(set(cell.parameters) - set(defaults) - set(RUNNER_KEYS))
        if unknown:
            raise StudyError(f"{cell.name}: {cell.notebook} has no parameter {unknown[0]!r}; its parameters: "
                             f"{', '.join(defaults)}")
        block = PLANNERS[cell.notebook].block if cell.notebook in PLANNERS else None
        for key, value in cell.parameters.items():
            if key in defaults and key not in RUNNER_KEYS + CHECKED_ELSEWHERE:
                where = f"scales.{scale}.{SOURCE_BLOCK.get(key, block or 'codec')}.{key}"
                check_value(where, value, defaults[key])


# validated as TrainConfigs / quantizer grids by their planners, or written by the planners themselves
CHECKED_ELSEWHERE = ("params", "overrides", "variants", "base", "grid", "chosen_runs", "runs", "source_run",
                     "arms_dir", "official", "nproc_per_node")
NO_DEFAULT = object()
SOURCE_BLOCK = {"evaluate": "codec", "opus_bitrates": "compare"}  # the block of study.yaml a shared value comes from


@functools.lru_cache(maxsize=16)
def notebook_defaults(path: Path) -> dict[str, Any]:
    """A notebook's parameters cell as name -> default value (NO_DEFAULT where it is not a literal): the schema of
    what the runner may hand it."""
    import logging

    import papermill

    logging.getLogger("papermill").setLevel(logging.ERROR)  # its parser's warnings are not the user's error
    found = {}
    for name, info in papermill.inspect_notebook(str(path)).items():
        try:
            found[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError, TypeError):
            found[name] = NO_DEFAULT
    return found


# keyword arguments of `studylib.training.evaluate.evaluate` a scale may set (`evaluate` blocks): (kind, minimum)
EVALUATE_ARGS = {"per_kind": ("int", 1), "visqol_items": ("int", 0), "seconds": ("number", 0.1),
                 "examples_per_kind": ("int", 0), "batch_size": ("int", 1), "bands": ("bool", None)}
MAX_EVAL_SECONDS = 60.0  # a test window longer than this is a typo (the corpus' segments are ~10 s)


def check_value(where: str, value: Any, default: Any) -> None:
    """StudyError unless `value` has the type of the notebook's `default` (int, number, bool, str, list, dict), in
    range (counts and amounts >= 0, finite), and an `evaluate` block holds only `evaluate`'s keyword arguments."""
    if where.endswith(".evaluate"):
        _check_evaluate(where, value)
    elif where.endswith(".opus_bitrates"):
        if not isinstance(value, list) or not value or not all(_number(v) for v in value) or \
                not all(OPUS_MIN_KBPS <= v <= OPUS_MAX_KBPS for v in value):
            raise StudyError(f"{where}: got {value!r}, allowed a non-empty list of kbps in [{OPUS_MIN_KBPS}, "
                             f"{OPUS_MAX_KBPS}] (opusenc's range)")
    elif default is NO_DEFAULT or default is None:
        if value is not None and default is None and not _number(value) and not isinstance(value, str):
            raise StudyError(f"{where}: got {value!r}, allowed null, a number or a string")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise StudyError(f"{where}: got {value!r}, allowed true or false")
    elif isinstance(default, int | float):
        kind = "an integer" if isinstance(default, int) else "a number"
        if not (_number(value) and (isinstance(value, int) or isinstance(default, float))) or value < 0:
            raise StudyError(f"{where}: got {value!r}, allowed {kind} >= 0")
    elif isinstance(default, str | list | dict) and not isinstance(value, type(default)):
        raise StudyError(f"{where}: got {value!r}, allowed a {type(default).__name__}")
    elif isinstance(default, list) and default and _number(default[0]) and \
            not all(_number(v) and v >= 0 for v in value):
        raise StudyError(f"{where}: got {value!r}, allowed a list of numbers >= 0")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_evaluate(where: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise StudyError(f"{where}: got {value!r}, allowed a mapping of {', '.join(EVALUATE_ARGS)}")
    for key, arg in value.items():
        if key not in EVALUATE_ARGS:
            raise StudyError(f"{where}.{key}: unknown key; allowed keys: {', '.join(EVALUATE_ARGS)}")
        kind, low = EVALUATE_ARGS[key]
        if kind == "bool":
            ok = isinstance(arg, bool)
        elif kind == "int":
            ok = isinstance(arg, int) and not isinstance(arg, bool) and arg >= low
        else:
            ok = _number(arg) and low <= arg <= MAX_EVAL_SECONDS
        if not ok:
            allowed = {"bool": "true or false", "int": f"an integer >= {low}"}.get(
                kind, f"a number in [{low}, {MAX_EVAL_SECONDS:g}]")
            raise StudyError(f"{where}.{key}: got {arg!r}, allowed {allowed}")


def _codec_groups(scale: str, codec: dict) -> list[dict]:
    """The codec block as its groups, each with every key resolved: one unnamed group without `groups`."""
    where = f"scales.{scale}.codec"
    raw = codec.get("groups")
    if raw is None:
        raw = {"": {}}
    elif not isinstance(raw, dict) or not raw:
        raise StudyError(f"{where}.groups: got {raw!r}, allowed a mapping of group names to their settings")
    groups = []
    for name, group in raw.items():
        group = _check_keys(f"{where}.groups.{name}", group or {}, GROUP_KEYS) if name else {}
        resolved = {"name": name, "arms": group.get("arms", codec.get("arms", [])),
                    "seeds": group.get("seeds", codec.get("seeds", [0])),
                    "arm_seeds": group.get("arm_seeds", codec.get("arm_seeds") or {}),
                    "evaluate": dict(group.get("evaluate", codec.get("evaluate")) or {}),
                    "set": {**(codec.get("set") or {}), **(group.get("set") or {})},
                    "init_from": group.get("init_from")}
        here = f"{where}.groups.{name}" if name else where
        if not isinstance(resolved["arm_seeds"], dict) or not set(resolved["arm_seeds"]) <= set(resolved["arms"]):
            raise StudyError(f"{here}.arm_seeds: got {resolved['arm_seeds']!r}, allowed a mapping of the codec "
                             f"arms {resolved['arms']} to lists of seeds")
        for key, values in [("seeds", resolved["seeds"])] + [(f"arm_seeds.{a}", v)
                                                              for a, v in resolved["arm_seeds"].items()]:
            if not isinstance(values, list) or not values or \
                    not all(isinstance(s, int) and not isinstance(s, bool) for s in values):
                raise StudyError(f"{here}.{key}: got {values!r}, allowed a non-empty list of integers")
        groups.append(resolved)
    return groups



def _codec_config(scale_file: Path, arm_file: Path, sets: dict) -> TrainConfig:
    return cfglib.build(TrainConfig, [cfglib.read_overlay(scale_file), cfglib.read_overlay(arm_file), sets])


def codec_run_hash(cell: Cell) -> str:
    """The TrainConfig hash `train` gives a codec cell's run (what its checkpoint must store)."""
    params = cell.parameters["params"]
    cfg = _codec_config(Path(params[0]), Path(params[1]), cell.parameters["overrides"])
    return cfglib.config_hash(cfg, exclude=NOT_HASHED)


# ------------------------------------------------------------------------------------ the planners


@planner("01_bug_anatomy", block="anatomy")
def _plan_anatomy(ctx: PlanContext) -> None:
    ctx.cells.append(Cell("01_bug_anatomy", "01_bug_anatomy", dict(ctx.settings.get("anatomy") or {})))


@planner(CODEC_NOTEBOOK)
def _plan_codec_runs(ctx: PlanContext) -> None:
    """One cell per group x arm x seed, seed by seed (every arm's seed 0 first): a study stopped part-way leaves
    arms paired by seed."""
    nproc = ctx.settings.get("codec", {}).get("nproc_per_node", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise StudyError(f"scales.{ctx.scale}.codec.nproc_per_node: got {nproc!r}, allowed an integer >= 1")
    for group in ctx.groups:
        where = f"scales.{ctx.scale}.codec" + (f".groups.{group['name']}" if group["name"] else "")
        source = None
        if group.get("init_from"):  # the fine-tuning regime: start from (and wait for) an earlier group's run
            if not ctx.group_runs.get(group["init_from"]):
                raise StudyError(f"{where}.init_from: {group['init_from']!r} is not an earlier group; allowed "
                                 f"{sorted(ctx.group_runs)}")
            source = ctx.group_runs[group["init_from"]][0]
        arm_files = {arm: ctx.arm_file(f"{where}.arms", arm) for arm in group["arms"]}
        arm_seeds = group["arm_seeds"]
        pairs = sorted(((arm, seed) for arm in group["arms"] for seed in arm_seeds.get(arm, group["seeds"])),
                       key=lambda pair: (pair[1], group["arms"].index(pair[0])))
        ctx.group_runs[group["name"]] = []
        for arm, seed in pairs:
            cell = _codec_cell(ctx, where, group, arm_files[arm], arm, seed, source, nproc)
            if group is ctx.groups[0]:
                ctx.codec_runs[(arm, seed)] = cell
            ctx.group_runs[group["name"]].append(cell)
            ctx.cells.append(cell)


def _codec_cell(ctx: PlanContext, where: str, group: dict, arm_file: Path, arm: str, seed: int,
                source: Cell | None, nproc: int) -> Cell:
    """One codec run, its TrainConfig validated now; named by its config hash, which leaves out how the run
    executes (NOT_HASHED) and where its inputs sit on disk."""
    sets = {**group["set"], "seed": seed, "manifest": str(ctx.manifest.resolve()), "progress": False}
    if source is not None:
        sets["init_from"] = str((ctx.results / source.name).resolve())
    try:
        cfg = _codec_config(ctx.scale_file, arm_file, sets)
        check_fits(cfg)  # a step that would not fit in memory is refused now, not after the runs before it
    except cfglib.UserError as e:
        raise StudyError(f"{where} ({arm}, seed {seed}): {e}") from None
    chash = cfglib.config_hash(cfg, exclude=(*NOT_HASHED, "manifest", "seed", "init_from"))
    return Cell(f"runs/{arm}-{chash}-s{seed}", CODEC_NOTEBOOK, {
        "params": [str(ctx.scale_file.resolve()), str(arm_file.resolve())],
        "overrides": sets, "nproc_per_node": nproc, "evaluate": group["evaluate"],
    }, needs=(source.name,) if source else (), arm=arm, seed=seed, gpus=nproc)


@planner("06_cpu_recipe", block="recipe")
def _plan_recipe(ctx: PlanContext) -> None:
    """The recipe study: its variants validated as TrainConfigs now; it shows the grid's runs of its arm (the
    chosen recipe, every seed) beside them, so it needs those and is planned right after them (with --jobs > 1 its
    variants train beside the other arms' runs)."""
    where, recipe = f"scales.{ctx.scale}.recipe", ctx.settings.get("recipe") or {}
    _check_keys(where, recipe, RECIPE_KEYS)
    arm = recipe.get("arm", "none")
    arm_file = ctx.arm_file(f"{where}.arm", arm)
    variants = recipe.get("variants") or {}
    if not isinstance(variants, dict) or not variants:
        raise StudyError(f"{where}.variants: got {variants!r}, allowed a mapping name -> {{change, set}}")
    steps, valid_every, seed = recipe.get("steps", 400), recipe.get("valid_every", 50), recipe.get("seed", 0)
    for name, value in (("steps", steps), ("valid_every", valid_every), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise StudyError(f"{where}.{name}: got {value!r}, allowed an integer >= {0 if name == 'seed' else 1}")
    for name, variant in variants.items():
        _check_keys(f"{where}.variants.{name}", variant, VARIANT_KEYS)
        try:
            _codec_config(ctx.scale_file, arm_file, {**(variant.get("set") or {}), "steps": steps,
                                                      "valid_every": valid_every, "seed": seed})
        except cfglib.ConfigError as e:
            raise StudyError(f"{where}.variants.{name}.set: {e}") from None
    chosen = [cell for (run_arm, _), cell in ctx.codec_runs.items() if run_arm == arm]
    cell = Cell("06_cpu_recipe", "06_cpu_recipe", {
        "params": [str(ctx.scale_file.resolve()), str(arm_file.resolve())],
        "variants": {name: {"change": str(v.get("change", name)), "set": dict(v.get("set") or {})}
                     for name, v in variants.items()},
        "steps": steps, "valid_every": valid_every, "seed": seed, "chosen_runs": [c.name for c in chosen],
        "evaluate": ctx.compare["evaluate"], "opus_bitrates": ctx.compare["opus_bitrates"],
    }, needs=tuple(c.name for c in chosen))
    after = max((i for i, c in enumerate(ctx.cells) if c.name in cell.needs), default=len(ctx.cells) - 1)
    ctx.cells.insert(after + 1, cell)


def _quantizer_grid(ctx: PlanContext, key: str, block: dict) -> None:
    """A quantizer-only grid (02, 08) validated now: every cell is a LatentRunConfig."""
    if not block.get("grid"):
        raise StudyError(f"scales.{ctx.scale}.{key}.grid: empty; give at least one block with an 'arm'")
    try:
        expand_grid(block["grid"], ctx.params / "arms", block.get("base") or {})
    except cfglib.ConfigError as e:
        raise StudyError(f"scales.{ctx.scale}.{key}: {e}") from None


@planner("02_quantizer_study", block="quantizer")
def _plan_quantizer_study(ctx: PlanContext) -> None:
    q = ctx.settings.get("quantizer") or {}
    source = ctx.codec_run("quantizer.latents_from", q.get("latents_from", "fixed_rel"))
    _quantizer_grid(ctx, "quantizer", q)
    ctx.cells.append(Cell("02_quantizer_study", "02_quantizer_study", {
        "source_run": source.name, "base": dict(q.get("base") or {}), "grid": list(q.get("grid") or []),
        "arms_dir": str((ctx.params / "arms").resolve()),
    }, needs=(source.name,)))


@planner("05_codebook_audit", block="audit", derived=("runs",), extra=("arms",))
def _plan_audit(ctx: PlanContext) -> None:
    audit = dict(ctx.settings.get("audit") or {})
    audited = [ctx.codec_run("audit.arms", arm) for arm in audit.pop("arms", ctx.groups[0]["arms"][:1])]
    for cell in audited:  # the audit reads EMA statistics: dac and simvq keep none
        quantizer = cfglib.read_overlay(ctx.params / "arms" / f"{cell.arm}.yaml").get("quantizer", "ours")
        if quantizer not in EMA_QUANTIZERS:
            raise StudyError(f"scales.{ctx.scale}.audit.arms: {cell.arm!r} (quantizer {quantizer!r}) keeps no EMA "
                             f"statistics to audit; allowed arms of the quantizers {EMA_QUANTIZERS}")
    ctx.cells.append(Cell("05_codebook_audit", "05_codebook_audit", {
        "runs": [c.name for c in audited], "official": str(OFFICIAL_ENCODEC), **audit,
    }, needs=tuple(c.name for c in audited)))


@planner("04_compare", block="compare")
def _plan_compare(ctx: PlanContext) -> None:
    """Last of the per-scale notebooks: it reports on whatever runs are on disk."""
    ctx.cells.append(Cell("04_compare", "04_compare", ctx.compare, needs=tuple(c.name for c in ctx.cells),
                          always=True))


@planner("07_long_horizon", block="horizon")
def _plan_horizon(ctx: PlanContext) -> None:
    """On whatever codec runs finished, like 04."""
    horizon = {"evaluate": ctx.compare["evaluate"], "opus_bitrates": ctx.compare["opus_bitrates"],
               **(ctx.settings.get("horizon") or {})}
    ctx.cells.append(Cell("07_long_horizon", "07_long_horizon", horizon, needs=ctx.codec_cells(), always=True))


@planner("08_regimes", block="regimes")
def _plan_regimes(ctx: PlanContext) -> None:
    """The quantizer-only map on a codec run's latents, then every regime's tables."""
    r = dict(ctx.settings.get("regimes") or {})
    source = ctx.codec_run("regimes.latents_from", r.pop("latents_from", (ctx.groups[0]["arms"] or ["none"])[0]))
    _quantizer_grid(ctx, "regimes", r)
    ctx.cells.append(Cell("08_regimes", "08_regimes", {
        **r, "source_run": source.name, "arms_dir": str((ctx.params / "arms").resolve()),
    }, needs=ctx.codec_cells(), always=True, requires=(source.name,)))


# ------------------------------------------------------------------------------------------ the plan


def plan_study(scale: str, results: str | Path = "results", params: str | Path = ROOT / "params",
               only: list[str] | None = None, manifest: str | Path | None = None,
               data: str | Path = "data") -> StudyPlan:
    """Expand the grid of `scale` into cells and validate every one of them (StudyError otherwise)."""
    params = Path(params)
    settings = load_study(params / "study.yaml", scale)
    check_notebook_blocks(scale, settings)
    # the TrainConfig overlay of the codec runs: params/scales/<train_params>.yaml, by default the scale's own
    scale_file = params / "scales" / f"{settings.get('train_params', scale)}.yaml"
    if not scale_file.is_file():
        where = f"scales.{scale}.train_params" if "train_params" in settings else "--scale"
        raise StudyError(f"{where}: {scale_file} does not exist")
    given = manifest is not None
    manifest = Path(manifest) if given else Path(data) / str(settings.get("corpus")) / "manifest.csv"
    if given or manifest.is_file():  # a given manifest must exist (a mistyped path must not start a corpus build)
        load_manifest(manifest, check_files=True)
    ctx = PlanContext(scale, settings, params, scale_file, manifest, Path(results).resolve() / scale,
                      _codec_groups(scale, settings.get("codec", {})))
    notebooks = settings.get("notebooks", list(NOTEBOOKS))
    for p in PLANNERS.values():
        if p.notebook in notebooks:
            p.plan(ctx)
    common = {"manifest": str(manifest.resolve()), "results_dir": str(ctx.results), "progress": False}
    for cell in ctx.cells:
        cell.parameters = {**cell.parameters, **common, "out_dir": str(ctx.results / cell.name)}
    _check_cells_against_notebooks(scale, ctx.cells, ROOT / "notebooks")
    timeout = settings.get("cell_timeout_s", 3600)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise StudyError(f"scales.{scale}.cell_timeout_s: got {timeout!r}, allowed an integer >= 1 (seconds)")
    return StudyPlan(scale, ctx.results, manifest, settings.get("corpus"), timeout, ctx.cells,
                     _selected(ctx.cells, only), params=params.resolve())


def _selected(cells: list[Cell], only: list[str] | None) -> set[str]:
    """The names of the cells `--only` selects (arms, notebooks or run names; aggregations always), or all."""
    if not only:
        return {c.name for c in cells}
    known = {c.arm for c in cells if c.arm} | {c.notebook for c in cells} | {c.name for c in cells}
    for name in only:
        if name not in known:
            raise StudyError(f"--only: {name!r} matches no run; allowed arms and notebooks {sorted(known)}")
    return {c.name for c in cells if {c.arm, c.notebook, c.name} & set(only) or c.always}
