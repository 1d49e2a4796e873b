"""Typed, validated run configuration: YAML files, named presets, command-line overrides.

A configuration is a pydantic model (unknown keys and wrong types are errors
that name the key, with the nearest valid name suggested), read from YAML
with PyYAML; overrides are ``key.path=value`` strings whose values are parsed
as YAML (``train.steps=2000``, ``method.first_order=true``).
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewshot.errors import FewShotError


class ConfigError(FewShotError):
    """A configuration that cannot be used; the message names the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Which dataset and splits; image size; where the data is."""

    dataset: str = "omniglot"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    image_size: int | None = Field(None, ge=4)
    data_root: str | None = None
    rotations: bool = False
    num_workers: int = Field(0, ge=0)


GRADIENT_METHODS = ("maml", "fomaml", "metasgd", "anil", "reptile")
"""Methods with a fixed-size output layer, adapted by gradient steps."""


class MethodConfig(Section):
    """The meta-learner and its backbone; fields a method does not use are ignored by it."""

    name: Literal["maml", "fomaml", "metasgd", "anil", "reptile", "protonet", "matching", "relation"] = (
        "protonet"
    )
    # conv4-strided: stride-2 convolutions instead of max-pooling, features averaged over
    # space, as Finn et al.'s MAML code builds its Omniglot network
    backbone: Literal["conv4", "conv4-32", "conv4-strided", "resnet12", "mlp"] = "conv4"
    # gradient-based methods
    inner_lr: float = Field(0.4, gt=0)
    inner_steps: int = Field(1, ge=0)
    inner_steps_test: int | None = Field(None, ge=0)
    first_order: bool = False
    per_step_lr: bool = False
    batchnorm: Literal["transductive", "non-transductive"] = "transductive"
    # inner steps on the batch-norm weights and offsets too; false: meta-learned only, as in
    # Finn et al.'s code (Reptile then never moves them: its outer step follows the inner loop)
    adapt_batchnorm: bool = True
    # reptile: minibatch size and optimiser of the inner steps (None: the whole support set),
    # and the minibatch size when adapting for evaluation
    inner_batch: int | None = Field(None, ge=1)
    inner_optimizer: Literal["sgd", "adam"] = "sgd"
    inner_batch_test: int | None = Field(None, ge=1)
    # metric-based methods
    distance: Literal["euclidean", "cosine"] = "euclidean"
    fce: bool = False
    # similarity multiplier before the softmax: matching (default 1, the paper's) and
    # protonet (default 1 squared Euclidean, 10 cosine)
    scale: float | None = Field(None, gt=0)
    relation_loss: Literal["mse", "ce"] = "mse"


class EpisodeConfig(Section):
    """N-way K-shot Q-query: the shape of a task."""

    ways: int = Field(5, ge=1)
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)


class TrainConfig(Section):
    """The outer loop: steps, meta-batch, optimiser, schedule, validation, checkpoints."""

    steps: int = Field(1000, ge=1)
    meta_batch: int = Field(1, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "step", "cosine", "linear"] = "constant"
    step_size: int = Field(2000, ge=1)
    gamma: float = Field(0.5, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    val_every: int = Field(500, ge=1)
    val_episodes: int = Field(200, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_every: int | None = Field(None, ge=1)
    """Also keep checkpoints/step-NNNNNN.pt every this many steps (for learning curves)."""
    log_every: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1)


class EvalConfig(Section):
    """Meta-testing: a fixed, seeded set of episodes."""

    episodes: int = Field(600, ge=1)
    seed: int = Field(2017, ge=0)
    ways: int | None = Field(None, ge=1)
    shots: int | None = Field(None, ge=1)
    queries: int = Field(15, ge=1)
    chunk: int = Field(16, ge=1)


class PublishedResult(Section):
    """The published figure a preset reproduces, and where it is from."""

    accuracy: float | None = None
    ci95: float | None = None
    mse: float | None = None
    source: str = ""


class Config(Section):
    """A whole run. ``train_episode`` shapes meta-training tasks, ``eval`` meta-testing ones."""

    name: str = "run"
    description: str = ""
    seed: int = Field(0, ge=0)
    task: Literal["classification", "sinusoid"] = "classification"
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig()
    train_episode: EpisodeConfig = EpisodeConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    published: PublishedResult = PublishedResult()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        ways = self.eval.ways or self.train_episode.ways
        if (
            self.task == "classification"
            and self.method.name in GRADIENT_METHODS
            and ways != self.train_episode.ways
        ):
            raise ValueError(
                f"{self.method.name} has a {self.train_episode.ways}-way output layer, so it evaluates "
                f"{self.train_episode.ways}-way tasks only (eval.ways is {ways}); set eval.ways to "
                f"{self.train_episode.ways} or train with train_episode.ways={ways}."
            )
        m = self.method
        if m.name != "reptile" and (
            m.inner_batch is not None or m.inner_optimizer != "sgd" or m.inner_batch_test is not None
        ):
            raise ValueError(
                "method.inner_batch, method.inner_batch_test and method.inner_optimizer are Reptile's "
                f"settings; {m.name} takes full-batch SGD inner steps. Remove them, or set "
                "method.name=reptile."
            )
        if not m.adapt_batchnorm and m.name not in GRADIENT_METHODS:
            raise ValueError(
                f"method.adapt_batchnorm=false changes the inner loop of gradient-based methods; "
                f"{m.name} has none. Remove it."
            )
        if self.task == "sinusoid" and self.method.name not in GRADIENT_METHODS:
            raise ValueError(f"sinusoid regression needs a gradient-based method, not {self.method.name}.")
        return self

    @property
    def eval_ways(self) -> int:
        return self.eval.ways or self.train_episode.ways

    @property
    def eval_shots(self) -> int:
        return self.eval.shots or self.train_episode.shots


# --- reading, overriding, presets -----------------------------------------------------------


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """Valid field names at a dotted path (for 'did you mean' suggestions)."""
    for part in path:
        field = model.model_fields.get(part)
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(error: ValidationError, where: str) -> ConfigError:
    """One readable message per problem, with the nearest valid key for unknown ones."""
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc)
        if item["type"] == "extra_forbidden":
            valid = _fields_at(Config, loc[:-1])
            near = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f"; did you mean {'.'.join([*loc[:-1], near[0]])!r}?" if near else ""
            lines.append(f"unknown key {key!r}{hint} (valid here: {', '.join(valid)})")
        elif item["type"] == "value_error":
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            got = item.get("input")
            lines.append(f"{key}: {item['msg']} (got {got!r})")
    return ConfigError(f"Invalid configuration {where}: " + "; ".join(lines))


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override {dotted!r}: {key!r} is a value, not a section.")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key.path=value`` strings to (key, value) with YAML-typed values."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} is not of the form key.path=value (e.g. train.steps=2000).")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override {item!r}: cannot parse the value ({exc}).") from exc
        out.append((key.strip(), value))
    return out


def from_dict(tree: dict[str, Any], overrides: list[str] | None = None, where: str = "") -> Config:
    """Validate a config tree after applying overrides."""
    tree = dict(tree)
    for key, value in parse_overrides(overrides or []):
        _set(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, where) from None


def preset_dir() -> Any:
    return resources.files("fewshot") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in preset_dir().iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A preset by name, or a YAML file by path, with overrides applied."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        text, where = path.read_text(), f"in {path}"
    else:
        names = preset_names()
        if name_or_path not in names:
            near = difflib.get_close_matches(name_or_path, names, n=3)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(
                f"No preset named {name_or_path!r}.{hint} `fewshot presets` lists them; "
                "or give a path to a .yaml config."
            )
        text, where = (preset_dir() / f"{name_or_path}.yaml").read_text(), f"preset {name_or_path}"
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Cannot parse {where} as YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must be a mapping of sections (data, method, train, ...).")
    return from_dict(tree, overrides, where)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def from_yaml(text: str, where: str = "") -> Config:
    """The inverse of ``to_yaml``: the configuration a run or checkpoint recorded.

    Text that is no YAML mapping (a damaged file) is a ConfigError, not a parser traceback.
    """
    place = f" {where}" if where else ""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"The config{place} is not valid YAML ({str(exc).splitlines()[0]}).") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"The config{place} is a {type(tree).__name__}, not a mapping of settings.")
    return from_dict(tree or {}, where=where)


TRAINING_NEUTRAL = frozenset(
    {
        "name",
        "description",
        "published",
        "eval",
        "data.data_root",
        "data.num_workers",
        "train.checkpoint_every",
        "train.keep_every",
        "train.log_every",
        "train.threads",
    }
)
"""Settings that move no trained weight: two configurations that differ only here train the same
weights. (``eval`` also shapes the validation episodes, which select ``best.pt``, so a resume may
change only some of it: see ``RESUMABLE_CHANGES``.)"""

RESUMABLE_CHANGES = (TRAINING_NEUTRAL - {"eval"}) | {
    "eval.episodes",
    "eval.chunk",
    "train.steps",
    "train.val_every",
}
"""Settings a run may change when it resumes: a constant-rate run may go on longer, validation may
come at other steps, and testing may use more episodes, without changing a weight trained so far.
The other ``eval`` settings (ways, shots, queries, seed) build the validation episodes: changed
midway, ``best.pt`` would compare scores on two different tasks."""

NON_FINITE_CURES = frozenset({"train.lr", "train.grad_clip"})
"""Settings a run stopped by a non-finite value may also change when it resumes: the cure for a
diverging run, applied from its last good state on (the weights before it stay as trained)."""


def _leaves(tree: dict[str, Any], whole: frozenset[str], prefix: str = "") -> dict[str, Any]:
    """Dotted setting -> value; the sections named in ``whole`` stay one leaf."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in whole:
            out.update(_leaves(value, whole, f"{path}."))
        else:
            out[path] = value
    return out


def differences(a: Config, b: Config, may_differ: frozenset[str]) -> list[tuple[str, Any, Any]]:
    """The settings outside ``may_differ`` in which ``a`` and ``b`` differ: (setting, in a, in b)."""
    old, new = _leaves(a.model_dump(mode="json"), may_differ), _leaves(b.model_dump(mode="json"), may_differ)
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if key not in may_differ and old.get(key) != new.get(key)
    ]


def training_differences(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """Where ``a`` and ``b`` would not train the same weights (their validation tasks may differ)."""
    return differences(a, b, TRAINING_NEUTRAL)


def resume_conflicts(saved: Config, wanted: Config, after_non_finite: bool = False) -> list[str]:
    """Why a run trained with ``saved`` cannot be continued as ``wanted`` (empty if it can);
    ``after_non_finite``: the run was stopped by a non-finite value, so ``NON_FINITE_CURES`` may change.

    Resuming under other settings would give weights that no single configuration
    trains, yet be recorded as ``wanted``: a silently wrong result.
    """
    may_differ = RESUMABLE_CHANGES | NON_FINITE_CURES if after_non_finite else RESUMABLE_CHANGES
    conflicts = [
        f"{key}: {old!r} in the run, {new!r} now" for key, old, new in differences(saved, wanted, may_differ)
    ]
    schedule = wanted.train.schedule
    if schedule in ("cosine", "linear") and saved.train.steps != wanted.train.steps:
        conflicts.append(
            f"train.steps: {saved.train.steps} in the run, {wanted.train.steps} now; the {schedule} "
            "schedule spreads its rate over train.steps, so the steps trained so far belong to the "
            f"{saved.train.steps}-step run only"
        )
    return conflicts
