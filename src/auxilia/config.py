"""The run description: YAML validated into typed objects, then built into a Trainer.

Every error names the key and what was expected, on one line (``ConfigError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from auxilia import samplers, strategies
from auxilia.data.files import load_array_file
from auxilia.data.sources import Pair, Source, Target, split_pair
from auxilia.engine import MODES
from auxilia.errors import AuxiliaError, ConfigError, DataError
from auxilia.train import Trainer, TrainSettings

if TYPE_CHECKING:
    from auxilia.selection.select import SelectSettings, SelectTarget

Kind = Literal["classification", "regression"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetConfig(_Strict):
    """The target task: files for its splits and how to read them."""

    name: str = Field(min_length=1)
    train: str
    val: str | None = None
    test: str | None = None
    val_fraction: float | None = Field(default=None, gt=0, lt=1)
    kind: Kind = "classification"
    num_classes: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    label_column: str = "y"
    feature_columns: list[str] | None = None


class SourceConfig(_Strict):
    """An auxiliary source: a ``dataset`` file of (x, y) or ``task`` labels of the target inputs."""

    name: str = Field(min_length=1)
    granularity: Literal["task", "dataset"] = "dataset"
    data: str | None = None
    labels: str | None = None
    head: Literal["target", "own"] = "own"
    kind: Kind = "classification"
    num_classes: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    label_column: str = "y"
    feature_columns: list[str] | None = None

    @model_validator(mode="after")
    def _files(self) -> SourceConfig:
        if self.granularity == "dataset" and (self.data is None or self.labels is not None):
            raise ValueError("a dataset source needs 'data' (a file of x and y) and no 'labels'")
        if self.granularity == "task":
            if self.labels is None or self.data is not None:
                raise ValueError(
                    "a task source needs 'labels' (y for the target's train inputs) and no 'data'"
                )
            if self.head != "own":
                raise ValueError("a task source has its own head: use head: own")
        return self


class ModelConfig(_Strict):
    """The shared trunk: ``mlp``, ``cnn`` or a factory ``package.module:function``, with params."""

    trunk: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)


class _Named(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class StrategyConfig(_Named):
    """A strategy by name (``auto``, the default) or with params (``{name: gcs, params: {}}``)."""

    name: str = "auto"


class SamplerConfig(_Named):
    """A sampler by name (``all``, ``uniform``) or with params."""

    name: str = "all"


class TrainConfig(_Strict):
    """Optimiser, length, evaluation and checkpoint cadence, seed and device."""

    steps: int = Field(default=500, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    eval_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = Field(default=1024, ge=1)
    engine_mode: str = "auto"
    holdout: float = Field(default=0.1, gt=0, lt=1)
    timeout: float = Field(default=300.0, gt=0)

    @field_validator("engine_mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        known = ["auto", *MODES]
        if value not in known:
            raise ValueError(f"unknown engine mode '{value}'; expected one of: {', '.join(known)}")
        return value


class SelectionConfig(_Strict):
    """``auxilia select``: the scoring method, the budget and the warm-up (``auxilia run``
    ignores this section)."""

    method: str = "gradient"
    params: dict[str, Any] = Field(default_factory=dict)
    budget: int | float = 0.1
    warmup_steps: int = Field(default=200, ge=1)
    checkpoints: int = Field(default=4, ge=1)
    warmup_samples: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=256, ge=1)

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: int | float) -> int | float:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a count must be >= 1, got {value}")
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(f"a fraction must be in (0, 1], got {value}")
        return value

    def settings(
        self, *, warmup_batch: int, lr: float, seed: int, device: str, timeout: float = 300.0
    ) -> SelectSettings:
        """The settings of :func:`auxilia.selection.select`, with what the run config's other
        sections give (the warm-up's batch, learning rate, seed, device and timeout)."""
        from auxilia.selection import SelectSettings

        return SelectSettings(
            method=self.method,
            params=dict(self.params),
            budget=self.budget,
            warmup_steps=self.warmup_steps,
            checkpoints=self.checkpoints,
            warmup_samples=self.warmup_samples,
            batch_size=self.batch_size,
            warmup_batch=warmup_batch,
            lr=lr,
            seed=seed,
            device=device,
            timeout=timeout,
        )

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        from auxilia.selection import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method '{value}'; expected one of: {', '.join(METHODS)}")
        return value


class RunConfig(_Strict):
    """A whole run: target, sources, model, strategy, sampler and training settings."""

    target: TargetConfig
    sources: list[SourceConfig] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    select: SelectionConfig | None = None

    @model_validator(mode="after")
    def _names(self) -> RunConfig:
        names = [self.target.name] + [s.name for s in self.sources]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"source name '{name}' is used twice")
        weights = self.strategy.params.get("weights")
        if self.strategy.name == "fixed" and isinstance(weights, dict):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise ValueError(f"strategy.params.weights: unknown source '{unknown[0]}'")
        return self


def _format(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif "input" in item and not isinstance(item["input"], dict | list):
            message += f" (got {item['input']!r})"
        parts.append(f"{key}: {message}")
    return "; ".join(parts)


def parse_config(data: Any, origin: str = "config") -> RunConfig:
    """Validate a parsed YAML mapping; also checks strategy and sampler names and params."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin}: expected a mapping at the top level, got {type(data).__name__}"
        )
    if is_language_config(data):
        raise ConfigError(
            f"{origin}: model.trunk: '{CAUSAL_LM}' configs are for 'auxilia select' only "
            "(auxilia run does not train language models)"
        )
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {_format(error)}") from error
    try:
        strategy_for(config)
    except AuxiliaError as error:
        raise ConfigError(f"{origin}: strategy: {error}") from error
    try:
        samplers.get(config.sampler.name, config.sampler.params)
    except AuxiliaError as error:
        raise ConfigError(f"{origin}: sampler: {error}") from error
    return config


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config (``yaml.safe_load``: no code is executed)."""
    return parse_config(read_yaml(path), str(path))


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of ``path`` (``yaml.safe_load``: no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as error:
        raise ConfigError(f"{path}: cannot read the config as UTF-8 text: {error}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from error
    return data


def strategy_for(config: RunConfig) -> strategies.Strategy:
    """The strategy object; ``fixed`` weights may be a mapping from source name to weight."""
    params = dict(config.strategy.params)
    if config.strategy.name == "fixed" and isinstance(params.get("weights"), dict):
        names = [config.target.name] + [s.name for s in config.sources]
        params["weights"] = [float(params["weights"].get(n, 1.0)) for n in names]
    return strategies.get(config.strategy.name, params)


def _pair(path: Path, label_column: str, feature_columns: list[str] | None) -> Pair:
    loaded = load_array_file(path, label_column=label_column, feature_columns=feature_columns)
    if loaded.x is None or loaded.y is None:
        missing = "x (features)" if loaded.x is None else "y (labels)"
        raise DataError(f"{path}: has no {missing}")
    return torch.from_numpy(loaded.x), torch.from_numpy(loaded.y)


def build_target(config: TargetConfig, base: Path, seed: int) -> Target:
    """Load the target's files (paths relative to ``base``) into a :class:`Target`."""

    def read(name: str) -> Pair:
        return _pair(base / name, config.label_column, config.feature_columns)

    train = read(config.train)
    val = read(config.val) if config.val else None
    if val is None and config.val_fraction:
        train, val = split_pair(train, config.val_fraction, seed, "target.val_fraction")
    test = read(config.test) if config.test else None
    return Target(
        config.name,
        train=train,
        val=val,
        test=test,
        kind=config.kind,
        num_classes=config.num_classes,
        batch_size=config.batch_size,
    )


def build_source(config: SourceConfig, base: Path) -> Source:
    """Load one auxiliary source's file into a :class:`Source`."""
    data: Pair | None = None
    labels: torch.Tensor | None = None
    if config.granularity == "dataset":
        assert config.data is not None
        data = _pair(base / config.data, config.label_column, config.feature_columns)
    else:
        assert config.labels is not None
        path = base / config.labels
        loaded = load_array_file(path, label_column=config.label_column, feature_columns=[])
        if loaded.y is None:
            raise DataError(f"{path}: has no y (labels)")
        labels = torch.from_numpy(loaded.y)
    return Source(
        config.name,
        granularity=config.granularity,
        data=data,
        labels=labels,
        head=config.head,
        kind=config.kind,
        num_classes=config.num_classes,
        batch_size=config.batch_size,
    )


def resolved_config(config: RunConfig, base: Path) -> dict[str, Any]:
    """The config as plain data with every data path made absolute (as written to runs)."""
    resolved = config.model_dump(mode="json")
    if resolved.get("select") is None:
        resolved.pop("select", None)
    for entry, key in [(resolved["target"], k) for k in ("train", "val", "test")] + [
        (s, k) for s in resolved["sources"] for k in ("data", "labels")
    ]:
        if entry.get(key):
            entry[key] = str((base / entry[key]).resolve())
    return resolved


def build_selection(config: RunConfig, base: Path) -> SelectionJob:
    """The target, the pools (every dataset source, streamed from its file) and the model of
    ``auxilia select``, from a run config with a ``select`` section."""
    from auxilia.data.sources import output_size
    from auxilia.models import build_model, build_trunk
    from auxilia.selection import ClassifierLearner, Pool

    s, t = config.select or SelectionConfig(), config.train
    target = build_target(config.target, base, t.seed)
    pools = [
        Pool(
            c.name,
            head=c.head,
            path=base / c.data,
            label_column=c.label_column,
            feature_columns=None if c.feature_columns is None else tuple(c.feature_columns),
        )
        for c in config.sources
        if c.granularity == "dataset" and c.data is not None
    ]
    if not pools:
        raise ConfigError("select: the config has no dataset source to select samples from")
    heads = {target.name: target.outputs}
    kinds = {target.name: target.kind}
    for c, pool in zip(
        [c for c in config.sources if c.granularity == "dataset"], pools, strict=True
    ):
        if c.head == "own":
            labels = [b.y for b in pool.batches(4096)]
            heads[c.name] = output_size(c.kind, labels, c.num_classes, f"source '{c.name}'")
            kinds[c.name] = c.kind

    def make_learner() -> ClassifierLearner:
        trunk = build_trunk(
            config.model.trunk, tuple(target.train[0].shape[1:]), config.model.params
        )
        model = build_model(trunk, target.train[0][0], heads)
        return ClassifierLearner(model, target.name, kinds)

    settings = s.settings(
        warmup_batch=config.target.batch_size,
        lr=t.lr,
        seed=t.seed,
        device=t.device,
        timeout=t.timeout,
    )
    return SelectionJob(target, pools, make_learner, settings, resolved_config(config, base))


@dataclass(frozen=True)
class SelectionJob:
    """What :func:`build_selection` returns: arguments of :func:`auxilia.selection.select`."""

    target: SelectTarget
    pools: list[Any]
    make_learner: Any
    settings: Any
    config: dict[str, Any] | None  # the run config to train on the selection (None: none)


def build_trainer(
    config: RunConfig, base: Path, out_dir: Path | None, *, quiet: bool = False
) -> Trainer:
    """Load all data named by ``config`` (relative to ``base``) and wire a :class:`Trainer`."""
    t = config.train
    target = build_target(config.target, base, t.seed)
    sources = [build_source(s, base) for s in config.sources]
    settings = TrainSettings(**t.model_dump())
    resolved = resolved_config(config, base)
    return Trainer(
        target,
        sources,
        strategy=strategy_for(config),
        sampler=samplers.get(config.sampler.name, config.sampler.params),
        trunk=config.model.trunk,
        trunk_params=config.model.params,
        settings=settings,
        out_dir=out_dir,
        config=resolved,
        quiet=quiet,
    )


# ---- language models: ``auxilia select`` on text ------------------------------------------

CAUSAL_LM = "causal-lm"


def is_language_config(data: Any) -> bool:
    """Whether parsed YAML describes language-model selection (``model.trunk: causal-lm``)."""
    model = data.get("model") if isinstance(data, dict) else None
    return isinstance(model, dict) and model.get("trunk") == CAUSAL_LM


class TextTargetConfig(_Strict):
    """The target of a language model: a text file (``.txt`` a sample per line; ``.jsonl``,
    ``.csv``, ``.parquet`` a sample per row, in ``text_column``)."""

    name: str = Field(min_length=1)
    train: str
    text_column: str = "text"
    batch_size: int = Field(default=32, ge=1)


class TextSourceConfig(_Strict):
    """A pool of text to select from (a file as for the target)."""

    name: str = Field(min_length=1)
    data: str
    text_column: str = "text"


class CausalLMParams(_Strict):
    """The size of the causal language model (a Llama-style transformer over bytes)."""

    layers: int = Field(default=2, ge=1)
    width: int = Field(default=64, ge=1)
    heads: int = Field(default=4, ge=1)
    context: int = Field(default=128, ge=2)
    mlp: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _shape(self) -> CausalLMParams:
        from auxilia.selection.language import CausalLMSpec

        try:
            CausalLMSpec(**self.model_dump())
        except ConfigError as error:
            raise ValueError(str(error)) from error
        return self


class CausalLMConfig(_Strict):
    """``trunk: causal-lm``: a language model built from ``params`` (no weights downloaded)."""

    trunk: Literal["causal-lm"]
    params: CausalLMParams = Field(default_factory=CausalLMParams)


class LanguageTrainConfig(_Strict):
    """What the warm-up of language-model selection takes from ``train``."""

    lr: float = Field(default=1e-3, gt=0)
    seed: int = 0
    device: str = "cpu"


class LanguageConfig(_Strict):
    """``auxilia select`` for a causal language model: a text target and text pools."""

    target: TextTargetConfig
    sources: list[TextSourceConfig] = Field(min_length=1)
    model: CausalLMConfig
    train: LanguageTrainConfig = Field(default_factory=LanguageTrainConfig)
    select: SelectionConfig = Field(default_factory=SelectionConfig)

    @model_validator(mode="after")
    def _names(self) -> LanguageConfig:
        names = [self.target.name] + [s.name for s in self.sources]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"source name '{name}' is used twice")
        return self


def parse_language_config(data: Any, origin: str = "config") -> LanguageConfig:
    """Validate a parsed YAML mapping describing language-model selection."""
    try:
        return LanguageConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {_format(error)}") from error


def build_language_selection(config: LanguageConfig, base: Path) -> SelectionJob:
    """The text target, the text pools (streamed) and the causal LM of ``auxilia select``."""
    from auxilia.selection.language import (
        CausalLMSpec,
        LanguageModelLearner,
        transformers_missing,
    )
    from auxilia.selection.text import TextPool, load_text_target
    from auxilia.selection.tokens import ByteTokenizer

    missing = transformers_missing()
    if missing is not None:
        raise ConfigError(f"model.trunk: {missing}")
    spec = CausalLMSpec(**config.model.params.model_dump())
    tokenizer = ByteTokenizer(spec.context)
    t, s = config.target, config.select
    target = load_text_target(t.name, base / t.train, t.text_column, tokenizer)
    pools = [
        TextPool(c.name, path=base / c.data, text_column=c.text_column, tokenizer=tokenizer)
        for c in config.sources
    ]

    def make_learner() -> LanguageModelLearner:
        return LanguageModelLearner(spec.build())

    train = config.train
    settings = s.settings(
        warmup_batch=t.batch_size, lr=train.lr, seed=train.seed, device=train.device
    )
    return SelectionJob(target, pools, make_learner, settings, None)


def load_selection(path: str | Path) -> SelectionJob:
    """The job of ``auxilia select CONFIG``: a run config (dataset sources are the pools) or a
    language-model config (``model.trunk: causal-lm``, text pools)."""
    path = Path(path)
    data = read_yaml(path)
    if is_language_config(data):
        return build_language_selection(parse_language_config(data, str(path)), path.parent)
    return build_selection(parse_config(data, str(path)), path.parent)
