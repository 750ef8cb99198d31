"""Run configuration: parsed once, at the edge, into frozen dataclasses.

A run is a TOML file (see simulations/). Everything downstream receives these objects, never raw
dicts, so a typo is caught here with the list of valid keys instead of surfacing as a KeyError in
round 7. The same objects travel to sites as JSON (``to_json``/``from_json``): no pickle.
They are immutable all the way down (tuples and FrozenMap, never lists or dicts), so a RunConfig
is hashable: equal plans hash equal and can key a cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tomllib
import types
import typing
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError

DEFAULT_DATA_DIR = "../shared/datasets"


# -- the environment: every FEDMED_* variable fedmed reads, read here and nowhere else -------------
# (README "Environment variables"). Read at call time, not import time: a test or a daemon may set
# one just before the work that needs it.
ENVIRONMENT = {
    "FEDMED_DATA_DIR": "shared datasets (default ../shared/datasets)",
    "FEDMED_LEDGER_DIR": "a site's privacy ledger (default ~/.fedmed/ledger)",
    "FEDMED_KEY_DIR": "model-signing keys (default ~/.fedmed/keys)",
    "FEDMED_SITE_STATE_DIR": "a simulated site's kept layers (default: inside the run folder)",
    "FEDMED_CACHE_DIR": "noise calibrations and prepared data a site executor's children share",
    "FEDMED_GRID_POLL_SECONDS": "how often a deployed coordinator pulls replies (default 0.2)",
    "FEDMED_SIM_WORKERS": "sites an in-process simulation trains at once (default: usable cores)",
}


def _env(name: str) -> str | None:
    assert name in ENVIRONMENT, name  # a new variable is documented above first
    return os.environ.get(name) or None


def data_dir() -> Path:
    """Where shared datasets live: $FEDMED_DATA_DIR, else ../shared/datasets."""
    return Path(_env("FEDMED_DATA_DIR") or DEFAULT_DATA_DIR)


def site_state_dir() -> Path | None:
    """$FEDMED_SITE_STATE_DIR when set (a simulated site's kept layers go there)."""
    value = _env("FEDMED_SITE_STATE_DIR")
    return Path(value) if value else None


def cache_dir() -> Path | None:
    """$FEDMED_CACHE_DIR when set (a site executor's children share calibrations and data there)."""
    value = _env("FEDMED_CACHE_DIR")
    return Path(value) if value else None


def grid_poll_seconds(default: float) -> float:
    """$FEDMED_GRID_POLL_SECONDS, else ``default``."""
    return float(_env("FEDMED_GRID_POLL_SECONDS") or default)


def sim_workers() -> int:
    """$FEDMED_SIM_WORKERS, else the cores this process may use.

    A property of the machine, not of the study: it changes how fast a simulation runs, never
    what it computes, so it stays out of the RunConfig (whose hash sites approve and a resumed
    run must match).
    """
    value = _env("FEDMED_SIM_WORKERS")
    if value is None:
        return usable_cores()
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ConfigError(
            f"FEDMED_SIM_WORKERS = {echo(value)} is not a number of workers; use a whole "
            "number >= 1 (1 trains the sites one after another)"
        )
    return workers


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        return os.cpu_count() or 1


def _choices(*names: str) -> dict[str, tuple[str, ...]]:
    return {"choices": names}


# One rule for every name that becomes part of a path (a study's run folder, a site's state
# folder and ledger): a letter or digit first, then letters, digits, '.', '_' or '-', at most 64
# characters, and never '..'. So `name = "../../escaped"` cannot write outside the output folder.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SAFE_NAME_RULE = (
    "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"
)
MAX_ECHO = 200  # characters of a user's value quoted back in an error: never a whole file


def echo(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error stays one short line, whatever came in.

    repr escapes newlines, so a multi-line value cannot break the one-line rule either.
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"


def check_name(key: str, name: Any) -> str:
    """``name`` if it obeys SAFE_NAME_RULE; else a ConfigError naming ``key`` and the rule.

    Shared by the study ``name`` and every site name, because both become folder names.
    """
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{key} = {echo(name)} is not a safe name; use {SAFE_NAME_RULE} (e.g. st-marys)"
        )
    return name


class FrozenMap(Mapping[str, Any]):
    """A read-only, hashable mapping: the config's tables (data.schema.categorical).

    It reads like a dict (``m[k]``, ``.get``, ``.items()``, ``in``) and equals a dict with the same
    items; it cannot be changed, so a RunConfig that holds one can be hashed and used as a cache
    key. It serializes as a JSON object (RunConfig.to_dict turns it back into a dict).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items = {k: _freeze(v) for k, v in (items or {}).items()}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._items,))

    def __copy__(self) -> FrozenMap:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenMap:
        return self  # immutable all the way down (_freeze), so dataclasses.asdict may share it


def _freeze(value: Any) -> Any:
    """``value`` with every list made a tuple and every table a FrozenMap, at any depth."""
    if isinstance(value, FrozenMap):
        return value
    if isinstance(value, Mapping):
        return FrozenMap(value)
    if isinstance(value, list | tuple):
        items = tuple(_freeze(v) for v in value)
        same = type(value) is tuple and all(a is b for a, b in zip(items, value, strict=True))
        return value if same else items
    return value


class _Frozen:
    """Base of the config dataclasses: lists and tables given to them are frozen on the way in.

    So ``SchemaConfig(categorical={...})`` or ``replace(schema, features=[...])`` still builds a
    hashable config; a subclass's own ``__post_init__`` calls this one first.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            frozen = _freeze(value)
            if frozen is not value:
                object.__setattr__(self, f.name, frozen)


@dataclass(frozen=True)
class AugmentConfig(_Frozen):
    """Train-time image augmentation (imaging only; off at evaluation and when served).

    Defaults suit ultrasound/radiographs: a left-right flip and shifts of a few pixels keep the
    anatomy plausible; an up-down flip would put the transducer (or the lung apices) at the
    bottom and invert depth cues such as posterior acoustic shadowing, so it is off.
    """

    hflip: bool = True
    vflip: bool = False
    max_shift: int = 2  # pixels, each direction


@dataclass(frozen=True)
class ModelConfig(_Frozen):
    """Which network the task builds. ``hidden`` is ignored by the linear kinds.

    ``linear`` is the task's linear model (logistic regression for classification, the linear
    Cox predictor for survival); ``logreg`` is its classification-only name, kept for old configs.
    ``cnn`` (imaging): ``hidden`` lists the channels of its conv blocks. ``gru`` (sequences):
    ``hidden[0]`` is the GRU's state size; ``grud`` (sequences) is GRU-D, the same with learned
    decays of the last observation and of the state (fedmed.tasks.sequence).
    ``summaries`` (sequences): the output layer also reads per-variable summaries of the whole
    window (share of bins observed, mean/min/max of the observed values, last value), so the
    extremes a clinician scans for do not have to survive 48 recurrent steps.
    ``members`` (classification tasks): a deep ensemble of that many copies of the network, each
    initialized on its own and trained with its own loss on the same batches; the model's output
    is the mean of their logits (fedmed.tasks.ensemble).
    ``bag`` (text): token embeddings of width ``hidden[0]``, averaged over the text, then a linear
    layer; ``transformer`` (text): one encoder layer of width ``hidden[i]`` per entry (all equal)
    with ``heads`` attention heads (fedmed.tasks.text).
    ``frozen_embedding`` (text): the token embedding is a fixed random table drawn from the
    study's seed, never trained and never sent; only the layers after it learn (and, under
    DP-SGD, only they get noise). See fedmed.tasks.text.
    """

    kind: str = field(
        default="mlp",
        metadata=_choices("logreg", "linear", "mlp", "cnn", "gru", "grud", "bag", "transformer"),
    )
    hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0
    summaries: bool = False
    members: int = 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    heads: int = 2  # transformer (text): attention heads per layer; must divide hidden[0]
    frozen_embedding: bool = False  # text: fixed random token embeddings (train the rest only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.members < 1:
            raise ConfigError(
                f"model.members must be >= 1 (got {self.members}); 1 = one network, 5 = an "
                "ensemble of 5 networks whose logits are averaged"
            )


@dataclass(frozen=True)
class TrainConfig(_Frozen):
    """Local training at each site, per round. Set exactly one of local_epochs/local_steps."""

    local_epochs: float | None = None
    local_steps: int | None = None
    batch_size: int = 16
    optimizer: str = field(default="sgd", metadata=_choices("sgd", "adam"))
    lr: float = 0.05
    # Round r trains at lr x lr_decay^(r - 1): late rounds take smaller steps, so the shared
    # model settles instead of being pushed around by each round's local epochs (decaying step
    # sizes are what FedAvg's convergence results assume). 1.0 = a constant rate.
    lr_decay: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0

    def at_round(self, server_round: int) -> TrainConfig:
        """These settings with round ``server_round``'s learning rate (rounds count from 1)."""
        if self.lr_decay == 1.0:
            return self
        return replace(self, lr=self.lr * self.lr_decay ** max(server_round - 1, 0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"train.lr_decay must be in (0, 1] (got {self.lr_decay}); 1 = off")
        if self.local_epochs is not None and self.local_steps is not None:
            raise ConfigError(
                "set only one of train.local_epochs and train.local_steps "
                "(e.g. --set train.local_epochs=none to use local_steps)"
            )
        if self.local_epochs is None and self.local_steps is None:
            object.__setattr__(self, "local_epochs", 1.0)


@dataclass(frozen=True)
class StrategyConfig(_Frozen):
    """Coordinator-side aggregation. ``server_lr`` feeds FedAdam/FedYogi/FedAdagrad/FedAvgM."""

    name: str = "fedavg"
    min_sites: int = 0  # 0 = every configured site must reply
    server_lr: float = 0.01
    server_momentum: float = 0.9
    # FedAdam/FedYogi's first/second-moment decay and FedOpt's adaptivity (also FedAdagrad);
    # Flower's defaults (FLamby's differ: beta_2 = 0.999). FedAdagrad keeps no first moment and
    # no decay, so beta_1/beta_2 other than these defaults are refused with it.
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    proximal_mu: float = 0.01  # fedprox
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end, per coordinate
    num_malicious: int = 1  # krum / multikrum: sites assumed hostile
    krum_select: int = 0  # multikrum: updates averaged (0 = sites - num_malicious)
    # Update validation before aggregation (keys, shapes, dtypes, NaN/Inf, outlying norm).
    validate_updates: bool = True
    max_norm_ratio: float = 10.0  # reject an update whose norm exceeds this x the round median
    # Seconds the coordinator waits for a phase's replies; a site that has not answered by then
    # is recorded as failed for that round (and asked again the next round).
    round_timeout: float = 600.0  # seconds; a site gone offline is dropped sooner (see PromptGrid)
    # SecAgg+ (fedmed.coordinator.secure): the coordinator sees only the sum of updates (FedAvg).
    secure_aggregation: bool = False
    # Tail averaging (Polyak-Ruppert / SWA across rounds): the model each round evaluates, and
    # the one the study saves and serves, is the mean of the last ``average_last`` rounds'
    # global models; the sites keep training from the latest one. 1 = off.
    average_last: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.average_last < 1:
            raise ConfigError(
                f"strategy.average_last must be >= 1 (got {self.average_last}); 1 = evaluate "
                "and save the latest global model, 5 = the mean of the last 5 rounds' models"
            )
        changed = [
            f"strategy.{key} = {value:g}"
            for key, value, default in (("beta_1", self.beta_1, 0.9), ("beta_2", self.beta_2, 0.99))
            if value != default
        ]
        if self.name == "fedadagrad" and changed:  # Flower's FedAdagrad fixes beta_1 = beta_2 = 0
            raise ConfigError(
                f'{changed[0]} has no effect with strategy.name = "fedadagrad" (it keeps no '
                "moment decay); remove it, or use fedadam or fedyogi"
            )


@dataclass(frozen=True)
class PrivacyConfig(_Frozen):
    """Local DP-SGD at every site, calibrated for the WHOLE planned study (all rounds)."""

    enabled: bool = False
    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = field(default="rdp", metadata=_choices("rdp", "prv"))
    # How Opacus computes per-example gradients (benchmarks/dp_speed.py measures each). "ew" is
    # ~15 % faster on tabular models but fails on the empty batches Poisson sampling can draw.
    grad_sample_mode: str = field(default="hooks", metadata=_choices("hooks", "functorch", "ew"))
    # Central (site-level) DP at the coordinator with Flower's fixed-clipping wrappers: each
    # site's update is clipped to central_clipping_norm (at the site for "client-side") and
    # Gaussian noise of std central_noise_multiplier * norm / sites is added to the mean.
    central: str = field(default="off", metadata=_choices("off", "client-side", "server-side"))
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0


@dataclass(frozen=True)
class PersonalizeConfig(_Frozen):
    """Optional fine-tuning of the final global model at each site, on its own train split.

    The fine-tuned model stays at the site; only its before/after test metrics are reported.
    Refused under DP (local or central): those steps would fall outside the study's privacy
    calibration, so the ε reported for the study would no longer be true.
    """

    local_epochs: float = 0.0  # 0 = no personalization
    lr: float = 0.0  # 0 = train.lr
    # FedBN (fedmed.local_layers): each site keeps its own normalization layers across rounds;
    # they are never sent, so it composes with DP (no extra release) and with any strategy.
    local_normalization: bool = False


@dataclass(frozen=True)
class SimulationConfig(_Frozen):
    """Where simulated sites run on Ray (``--engine ray``): resources, not what a site computes.

    Each site's ClientApp runs in a Ray actor that reserves ``cpus_per_site`` CPUs and
    ``gpus_per_site`` GPUs. Flower's engine starts, on each node of the cluster, as many actors
    as fit (node CPUs // cpus_per_site, and node GPUs // gpus_per_site when sites ask for GPUs)
    and queues every site's messages over them: 1,000 sites on a 2-CPU cluster share 2 actors.
    ``gpus_per_site`` unset: a node's GPU is shared by all sites (1 / sites each) when the
    cluster has one and the study's device is not "cpu", else 0.

    The same study on a laptop or on a cluster computes the same thing, so none of this is in
    the plan hash a hospital approves, nor in the checkpoint's config hash (a killed run may
    resume on another cluster), and it is left off the plan's wire JSON at its defaults.
    """

    cpus_per_site: float = 1.0
    gpus_per_site: float | None = None  # None = share a visible GPU, see above

    def __post_init__(self) -> None:
        super().__post_init__()
        # Ray refuses a fraction finer than 0.0001 of a resource; 1024 CPUs is no one's node.
        _in_range(
            "simulation.cpus_per_site",
            self.cpus_per_site,
            1e-4,
            1024,
            fix="CPUs each site's Ray actor reserves; 0.5 = two sites per core",
        )
        if self.gpus_per_site is not None:
            _in_range(
                "simulation.gpus_per_site",
                self.gpus_per_site,
                0,
                64,
                fix="GPUs each site's Ray actor reserves; 0.25 = four sites per GPU, 0 = none",
            )
            if 0 < self.gpus_per_site < 1e-4:
                raise ConfigError(
                    f"simulation.gpus_per_site = {self.gpus_per_site:g} is finer than Ray's "
                    "0.0001 of a GPU; give at least 0.0001, or 0 for no GPU"
                )


@dataclass(frozen=True)
class StatsConfig(_Frozen):
    """``fedmed stats``: federated descriptive statistics before any training (docs/statistics.md).

    Simulated sites take their privacy controls from here; a deployed site applies its own
    (SiteConfig.statistics_min_cell / statistics_epsilon), never less strict than these.
    """

    # A count (cohort, missing, category, bin, outcome, Kaplan-Meier step) from 1 to
    # min_cell - 1 leaves a site as null, never as the number.
    min_cell: int = 10
    # Gaussian noise on every released count, calibrated so the whole release costs this ε at
    # the site's δ (recorded in the site's privacy ledger); 0 = no noise.
    epsilon: float = 0.0
    bins: int = 20  # histogram bins between the shared edges (plus two open tails)
    km_bins: int = 12  # Kaplan-Meier time intervals (survival studies)
    # Sum the sites' counts under SecAgg+: the coordinator sees only pooled counts, and the
    # minimum cell count applies to the pooled cell. Also on when strategy.secure_aggregation
    # is (RunConfig.secure_statistics): a study whose sites mask their updates masks its counts.
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_range("stats.min_cell", self.min_cell, 1, 1_000_000, fix="10 = the default")
        _in_range("stats.epsilon", self.epsilon, 0, 1000, fix="0 = no noise")
        _in_range("stats.bins", self.bins, 2, 1000)
        _in_range("stats.km_bins", self.km_bins, 2, 1000)


@dataclass(frozen=True)
class SchemaConfig(_Frozen):
    """What a site's table looks like and how it becomes tensors.

    ``features`` empty means every column except the outcome columns (and the split column).
    ``categorical`` maps a column to its allowed values; the values are declared (not inferred)
    so every hospital produces the same one-hot layout without revealing which values it has.

    The outcome depends on the task: ``target`` (0/1) for classification; ``time`` + ``event``
    for survival, where the event column is coded with ``event_value`` (the event happened) and
    ``censored_value`` (followed up to ``time`` without it), e.g. 2 and 1 in R's lung table.
    Any other code is an error, never silently "censored".
    """

    target: str = "target"
    time: str = ""  # survival: follow-up time column (>= 0, any unit)
    event: str = ""  # survival: event indicator column
    event_value: Any = 1  # number or text; Any so that "dead"/"alive" codes work too
    censored_value: Any = 0
    min_events: int = 5  # survival: a site needs this many events among its usable rows
    # survival: horizons (in `time` units) for Uno's time-dependent AUC at each, and the
    # integrated Brier score over [0, last horizon] (fedmed.tasks.survival_metrics); () = off
    horizons: tuple[float, ...] = ()
    features: tuple[str, ...] = ()
    categorical: FrozenMap = field(default_factory=FrozenMap)  # column -> tuple of its values
    drop_first: bool = False
    column_names: tuple[str, ...] = ()  # for header-less files (e.g. UCI)
    na_values: tuple[str, ...] = ()
    drop_columns: tuple[str, ...] = ()
    positive_above: float | None = None  # label = target > this; None = target is already 0/1
    missing: str = field(default="drop", metadata=_choices("drop", "mean", "error"))
    standardize: str = field(default="numeric", metadata=_choices("numeric", "all", "none"))
    test_fraction: float = 0.3
    split_seed: int = 43
    stratify: bool = True
    split_column: str = ""  # values "train"/"test"; overrides test_fraction when set
    min_rows: int = 10
    # > 0 (image, series and text sites): carve this share of the TRAIN rows (stratified,
    # split_seed) and evaluate on it instead of the test rows, to choose settings without seeing
    # the test set.
    validation_fraction: float = 0.0


@dataclass(frozen=True)
class ImageConfig(_Frozen):
    """Image sites (task imaging-classification): a MedMNIST-style .npz or a labels CSV.

    In a labels CSV, ``column`` names the PNG paths (relative to the CSV's folder) and
    data.schema.target the 0/1 label. ``size`` > 0 resizes every image to size x size.
    """

    size: int = 0
    column: str = "image"


@dataclass(frozen=True)
class SeriesConfig(_Frozen):
    """Time-series sites (task sequence-classification): a long table + an outcomes table.

    The long table has one observation per row (patient, time in minutes, variable, value); the
    outcomes table one row per patient with data.schema.target. Only the target is read from it,
    so scores derived from the outcome (e.g. PhysioNet's SAPS-I, SOFA) never reach the model.
    data.schema.features lists the variables (same order at every site).
    """

    outcomes: str = ""  # path; {data_dir} is expanded
    id_column: str = "record_id"
    time_column: str = "time_min"
    variable_column: str = "parameter"
    value_column: str = "value"
    outcome_id_column: str = "RecordID"
    hours: int = 48  # observation window from admission
    bin_minutes: int = 60
    missing_code: float | None = -1.0  # a value that means "not measured" (PhysioNet: -1)
    # Right-skewed variables (urine output, creatinine, lactate...) read as log(1 + value) before
    # binning and standardization: otherwise a few extreme patients set the scale and +-5 sd
    # clipping flattens the range that separates the sick from the very sick. Negative values
    # (artefacts) count as 0.
    log_variables: tuple[str, ...] = ()
    # "site": each site standardizes with its own train patients' statistics (nothing leaves the
    # site, but a shared model sees every ICU centred on its own mean). "consortium": before
    # round 1 the coordinator asks every site for its per-variable count/mean/sd, combines them
    # exactly as the union's, and every site standardizes with that (fedmed.coordinator.app);
    # needs every site to share statistics. mean/std: that reference, one per feature, filled
    # in by the coordinator (or agreed by a consortium and written here).
    standardize: str = field(default="site", metadata=_choices("site", "consortium"))
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class TextConfig(_Frozen):
    """Text sites (task text-classification): a table with a text column and a label column.

    The label column is data.schema.target; ``classes`` declares its values in order (class 0,
    1, ...), so every site builds the same output layer without revealing which classes it has,
    and a value outside them is an error naming the row. Texts are cut to ``max_tokens`` tokens
    (the count of cut texts is reported).

    The vocabulary is fitted before round 1 without any download (fedmed.data.text): each site
    counts the words of its own TRAIN texts and shares only words it counts at least
    ``min_count`` times; the coordinator sums those counts and builds a WordPiece vocabulary of
    ``vocab_size`` tokens from them (the shared words' characters, then the most frequent shared
    words; more if the characters alone exceed it: every character is kept), so no word rarer
    than that at every site (a name, a record number) enters it. ``vocabulary`` is that result,
    filled in by the coordinator (or written here by a consortium that agreed on one).

    ``duplicates`` (texts repeated within a table or file): "drop" keeps one copy of a text that
    always carries the same label and drops every copy of a text that carries two labels (it
    has no single true class); "error" refuses such a table, naming the rows; "keep" uses them
    as they are (copies may then sit in train and test).
    """

    column: str = "text"
    max_tokens: int = 256
    min_count: int = 5
    vocab_size: int = 4000
    classes: tuple[Any, ...] = ()
    duplicates: str = field(default="drop", metadata=_choices("drop", "error", "keep"))
    vocabulary: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_range("data.text.max_tokens", self.max_tokens, 1, 8192)
        _in_range(
            "data.text.min_count",
            self.min_count,
            1,
            1_000_000,
            fix="a word is shared only if a site counts it this often; 5 = default",
        )
        _in_range("data.text.vocab_size", self.vocab_size, 16, 1_000_000)


# A database identifier a config may name (the CDM schema): checked against this pattern and
# then quoted by SQLAlchemy, never formatted into SQL (fedmed.data.omop.cohort).
SQL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
CREDENTIALS = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]{0,127}|file:.+)$")
# What a feature of each CDM domain may summarize (OmopFeature.aggregate).
OMOP_AGGREGATES = {
    "measurement": ("last", "first", "mean", "min", "max", "count"),
    "observation": ("last", "first", "mean", "min", "max", "count"),
    "condition": ("presence",),
    "person": ("age", "male"),
}


@dataclass(frozen=True)
class OmopFeature(_Frozen):
    """One model input read from a site's OMOP CDM database (docs/omop.md).

    ``domain = "measurement"``: the rows of ``measurement`` with one of ``concept_ids`` and a
    numeric value, from ``start_hours`` to ``end_hours`` after the index time (the index
    visit's or condition's start; no end_hours: data.omop.window_hours), summarized by
    ``aggregate`` (last, first, mean, min, max, count) for a table; a sequence study reads
    every one of them, at its minute. ``domain = "observation"``: the same from the
    ``observation`` table's value_as_number, except that ``count`` counts every row of the
    concepts in the window, with a number or not (an observation is often a coded fact
    without one); the other aggregates, and a sequence study, read the rows that have a
    number. ``domain = "condition"`` (``aggregate = "presence"``): 1 if
    ``condition_occurrence`` has one of ``concept_ids`` starting in the window (a negative
    ``start_hours`` looks back before the index, e.g. -8760 for the year before), else 0; a
    sequence study sees a 1 at its minute. ``domain = "person"``: ``aggregate = "age"``
    (years at the index date) or ``"male"`` (1 for gender concept 8507, 0 for 8532, missing
    otherwise). ``name`` is the column (and the sequence's variable) the study uses; it
    never enters SQL.
    """

    name: str
    domain: str = field(
        default="measurement",
        metadata=_choices("measurement", "observation", "condition", "person"),
    )
    concept_ids: tuple[int, ...] = ()
    aggregate: str = "last"
    start_hours: float = 0.0
    end_hours: float | None = None  # None: data.omop.window_hours

    def __post_init__(self) -> None:
        super().__post_init__()
        where = f"data.omop.features '{self.name}'"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError('data.omop.features: every feature needs a name = "..."')
        if self.domain not in OMOP_AGGREGATES:
            raise ConfigError(
                f"{where}: domain = {echo(self.domain)} is not one of: {', '.join(OMOP_AGGREGATES)}"
            )
        allowed = OMOP_AGGREGATES[self.domain]
        if self.aggregate not in allowed:
            raise ConfigError(
                f"{where}: aggregate = {echo(self.aggregate)} is not valid for domain "
                f"'{self.domain}'; choose one of: {', '.join(allowed)}"
            )
        if self.domain != "person" and not self.concept_ids:
            raise ConfigError(f"{where}: list its concept_ids (the {self.domain} concepts to read)")
        if self.domain == "person" and self.concept_ids:
            raise ConfigError(f"{where}: a person feature reads no concept_ids; remove them")
        if any(isinstance(c, bool) or not isinstance(c, int) for c in self.concept_ids):
            raise ConfigError(f"{where}: concept_ids must be whole numbers (OMOP concept ids)")
        start, end = self.start_hours, self.end_hours
        if end is not None and end <= start:
            raise ConfigError(
                f"{where}: the window start_hours = {start:g} .. end_hours = {end:g} must "
                "have start < end (hours from the index's start; without end_hours: "
                "data.omop.window_hours)"
            )


@dataclass(frozen=True)
class OmopConfig(_Frozen):
    """A study's cohort, features and outcome, read from each site's OMOP CDM v5.4 database.

    Active when the index concepts are set (``visit_concept_ids``, or ``condition_concept_ids``
    with ``index = "condition"``): each [[sites]] path (or each site's registered dataset) is
    then a database URL, ``duckdb:///FILE`` or ``postgresql://USER@HOST/DB``.

    Cohort: each person's first index event, ``index = "visit"`` (the default) a visit with one
    of ``visit_concept_ids``, ``index = "condition"`` a condition_occurrence with one of
    ``condition_concept_ids``; its start (datetime, else 00:00 of its date) is the index time
    every feature window counts hours from and the sequence task's minute 0. The person is kept
    if the age that year is within ``min_age`` .. ``max_age`` and an observation period covers
    the index date with ``prior_observation_days`` before it. Outcome: a death
    (``outcome = "death"``), or the first condition with one of ``outcome_concept_ids``
    (``outcome = "condition"``), dated on or after the index date and at most
    ``horizon_days`` after it (0 = no limit); a survival study reads the days to it, censored
    at the end of the observation period (or at the horizon). ``features`` are the inputs
    (OmopFeature), in order. ``schema`` is the CDM schema ("" = the connection's default:
    DuckDB's main, PostgreSQL's search_path).
    """

    schema: str = ""
    visit_concept_ids: tuple[int, ...] = ()
    min_age: int = 0
    max_age: int = 150
    prior_observation_days: int = 0
    window_hours: float = 48.0
    outcome: str = field(default="death", metadata=_choices("death", "condition"))
    outcome_concept_ids: tuple[int, ...] = ()
    horizon_days: int = 0
    features: tuple[OmopFeature, ...] = ()
    # Added with condition indexes: left out of the plan and of a registered definition when
    # unused (OMOP_ADDED), so a visit-indexed study keeps its hashes and registrations.
    index: str = field(default="visit", metadata=_choices("visit", "condition"))
    condition_concept_ids: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.visit_concept_ids or self.condition_concept_ids)

    @property
    def index_concept_ids(self) -> tuple[int, ...]:
        """The concepts whose first occurrence is each person's index event."""
        return self.condition_concept_ids if self.index == "condition" else self.visit_concept_ids

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schema and not SQL_IDENTIFIER.match(self.schema):
            raise ConfigError(
                f"data.omop.schema = {echo(self.schema)} is not a plain schema name; use letters, "
                "digits and '_' (e.g. cdm), at most 63 characters"
            )
        for key in ("visit_concept_ids", "condition_concept_ids"):
            if any(isinstance(c, bool) or not isinstance(c, int) for c in getattr(self, key)):
                raise ConfigError(f"data.omop.{key} must be whole numbers (concept ids)")
        self._check_index()
        _in_range("data.omop.min_age", self.min_age, 0, 150)
        _in_range("data.omop.max_age", self.max_age, self.min_age, 150)
        _in_range("data.omop.prior_observation_days", self.prior_observation_days, 0, 36_500)
        _in_range("data.omop.window_hours", self.window_hours, 0, 24 * 36_500, low_open=True)
        _in_range("data.omop.horizon_days", self.horizon_days, 0, 36_500, fix="0 = any death")
        for f in self.features:
            if f.end_hours is None and f.start_hours >= self.window_hours:
                raise ConfigError(
                    f"data.omop.features '{f.name}': start_hours = {f.start_hours:g} is not "
                    f"before its window's end (data.omop.window_hours = {self.window_hours:g}); "
                    "give it an end_hours"
                )
        if any(isinstance(c, bool) or not isinstance(c, int) for c in self.outcome_concept_ids):
            raise ConfigError("data.omop.outcome_concept_ids must be whole numbers (concept ids)")
        if (self.outcome == "condition") != bool(self.outcome_concept_ids):
            raise ConfigError(
                'data.omop.outcome_concept_ids go with outcome = "condition" (the conditions '
                'that are the outcome); set both, or neither for outcome = "death"'
            )
        names = [f.name for f in self.features]
        twice = sorted(n for n, k in Counter(names).items() if k > 1)
        if twice:
            raise ConfigError(f"data.omop.features: '{twice[0]}' is named twice; rename one")
        if self.features and not self.active:
            raise ConfigError(
                "data.omop.features are read from the cohort's index events: set "
                "data.omop.visit_concept_ids (e.g. [32037] for Intensive Care), or index = "
                '"condition" with data.omop.condition_concept_ids'
            )

    def _check_index(self) -> None:
        """One kind of index event, and its concepts: a visit's or a condition's, not both."""
        if self.index not in ("visit", "condition"):
            raise ConfigError(
                f"data.omop.index = {echo(self.index)} is not valid; choose one of: visit, "
                "condition"
            )
        if self.index == "condition":
            if self.visit_concept_ids:
                raise ConfigError(
                    'data.omop.index = "condition" enters each person at a condition, not a '
                    "visit: remove data.omop.visit_concept_ids"
                )
            if not self.condition_concept_ids:
                raise ConfigError(
                    'data.omop.index = "condition" needs the conditions that enter a person: set '
                    "data.omop.condition_concept_ids (e.g. [201826] for type 2 diabetes)"
                )
            shared = sorted(set(self.condition_concept_ids) & set(self.outcome_concept_ids))
            if shared:
                raise ConfigError(
                    f"data.omop.outcome_concept_ids share concept {shared[0]} with the index's "
                    "condition_concept_ids: every person would have the outcome at the index; "
                    "choose another outcome"
                )
        elif self.condition_concept_ids:
            raise ConfigError(
                'data.omop.condition_concept_ids go with index = "condition" (the cohort\'s '
                'entry); set index = "condition", or remove them for a visit index'
            )


# Keys of [data.omop] added after it first shipped, with their defaults as plain JSON: left
# out of a plan (RunConfig.to_dict) and of a registered cohort definition when at the default,
# so a study that does not use them keeps its plan hash and a site's registration still holds.
OMOP_ADDED: dict[str, Any] = {"index": "visit", "condition_concept_ids": []}


def omop_dict(omop: OmopConfig) -> dict[str, Any]:
    """[data.omop] as plain JSON values, without the added keys left at their defaults."""
    out = plain(omop)
    for key, default in OMOP_ADDED.items():
        if out[key] == default:
            del out[key]
    return out


@dataclass(frozen=True)
class DataConfig(_Frozen):
    """Where the sites' tables come from.

    ``builtin`` names a table shipped inside an installed package (e.g. ``sklearn:breast_cancer``)
    which is then partitioned across the sites: simulation only, for demos and tests.
    """

    builtin: str = ""
    # One file on disk split across the simulated sites like a builtin table (e.g. an image
    # .npz that holds one hospital's data): simulation only.
    partition_file: str = ""
    # Deployment: the name each site registered its table under (`fedmed site data add`). Runs
    # name datasets, never paths: the site maps the name to its own file.
    dataset: str = ""
    # Sites chosen by a column (e.g. lung's institution code) instead of a random partition: each
    # [[sites]] lists its site_values; rows no site claims are left out.
    site_column: str = ""
    partition_sizes: tuple[float, ...] = ()
    dirichlet_alpha: float = 1.0  # label skew across sites: lower = more skewed
    partition_seed: int = 0
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # The cohort a site's OMOP CDM database yields (docs/omop.md); inactive by default.
    omop: OmopConfig = field(default_factory=OmopConfig)


@dataclass(frozen=True)
class SiteSpec(_Frozen):
    """One hospital in a simulation: a name and either a table path or a builtin shard."""

    name: str
    path: str = ""
    site_values: tuple[Any, ...] = ()  # with data.site_column: this site's rows
    # Sequence studies: this site's outcomes table (else data.series.outcomes). In a deployment
    # it comes from the site's registered dataset, never from the coordinator.
    outcomes: str = ""
    # The site's own cap on ε for its dataset, over all studies (see fedmed.ledger). In a
    # deployment it comes from the site's own config, never from the coordinator.
    epsilon_cap: float | None = None
    # OMOP sites on a database server: where the password comes from, "env:VARIABLE" or
    # "file:PATH" (a file only its owner may read), never the password itself. In a deployment
    # it comes from the site's registered dataset, never from the coordinator.
    credentials: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_name("sites.name", self.name)
        if self.credentials and not CREDENTIALS.match(self.credentials):
            raise ConfigError(
                f'site \'{self.name}\': credentials must be "env:VARIABLE" or "file:PATH" (where '
                "the database password is kept), never the password itself"
            )


@dataclass(frozen=True)
class RunConfig(_Frozen):
    """A whole study: what to train, where, how, and where results go."""

    name: str = "run"
    task: str = "tabular-classification"
    mode: str = field(default="federated", metadata=_choices("federated", "pooled", "local"))
    rounds: int = 5
    seed: int = 0
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda", "mps"))
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sites: tuple[SiteSpec, ...] = ()
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_run(self)

    # -- serialization (the wire format to sites and the model card) --------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values; ``simulation`` only when it is not the default.

        A study that leaves [simulation] alone keeps the wire JSON (and so every hash over it)
        it had before the section existed, and sites of an older fedmed still parse its plan.
        """
        out = plain(self)
        if self.simulation == SimulationConfig():
            del out["simulation"]
        if self.stats == StatsConfig():  # added with `fedmed stats`: the same reason
            del out["stats"]
        # Added with the text task: left off at their defaults for the same reason.
        if self.data.text == TextConfig():
            del out["data"]["text"]
        if self.data.omop == OmopConfig():  # added with OMOP sites: likewise
            del out["data"]["omop"]
        else:
            out["data"]["omop"] = omop_dict(self.data.omop)
        for site in out["sites"]:
            if not site["credentials"]:
                del site["credentials"]
        if self.model.heads == ModelConfig.heads:
            del out["model"]["heads"]
        if not self.model.frozen_embedding:  # added for DP text models, same reason
            del out["model"]["frozen_embedding"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return parse_run_config(json.loads(text))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def secure_statistics(self) -> bool:
        """Whether `fedmed stats` sums the sites' counts under SecAgg+ (docs/statistics.md)."""
        return self.stats.secure_aggregation or self.strategy.secure_aggregation


@functools.lru_cache(maxsize=8)
def plan_from_json(text: str) -> RunConfig:
    """The study plan a message carries (RunConfig JSON), parsed once per text in a process.

    Every message to a site carries the whole plan; the site's audit and policy mods, its
    handlers (fedmed.site.app, the SecAgg+ client in fedmed.site.secure_app) and the coordinator's
    ServerApp all read it through here, so one process parses (and validates) a plan once, not
    once per reader and message. Keyed by the text itself: a different plan is parsed afresh,
    and one that fails to parse raises every time (errors are not cached). The RunConfig is
    immutable, so every reader may share it.
    """
    return RunConfig.from_json(text)


@dataclass(frozen=True)
class SiteConfig(_Frozen):
    """A hospital's own site daemon config (sites/<name>.toml): owned by the site, never sent.

    It decides what may run on the site's data: the approved plans (``fedmed plan hash``), the
    privacy cap, a minimum cohort size, whether DP is mandatory. Relative paths in the file are
    resolved against the file's folder.
    """

    name: str
    coordinator: str = "127.0.0.1:9092"  # the SuperLink's address, host:port
    ca_certificate: str = ""  # the consortium CA (pki/sites/<name>/ca.crt)
    node_key: str = ""  # the site's node-authentication private key
    insecure: bool = False  # plain-text gRPC, no node auth: local experiments only
    runtime_port: int = 9094  # the SuperNode's local ClientApp API port on this machine
    state_dir: str = ""  # dataset registry, audit log, privacy ledger; default ~/.fedmed/sites/NAME
    approved_plans: tuple[str, ...] = ()
    epsilon_cap: float | None = None
    # The δ at which this site accounts its ε (and checks its cap); None = min(1e-5, 1 / the
    # training rows), computed when it trains. A plan whose noise is calibrated at a larger δ
    # is refused: its ε would be stated at a failure probability the site does not accept.
    delta: float | None = None
    min_rows: int = 20
    require_privacy: bool = False  # refuse any plan that trains without local DP-SGD
    # refuse any plan whose coordinator would see this site's update in the clear (SecAgg+ only)
    require_secure_aggregation: bool = False
    # Send the coordinator this site's feature means/stds (train split) once per study, so the
    # served model can preprocess a clinic's raw rows. Aggregates, but outside the DP accounting.
    share_statistics: bool = False
    # The fewest times this site must count a word before a text study may put it in the shared
    # vocabulary. The plan's data.text.min_count decides, but a plan below this floor is refused
    # even if approved by hash: one approval slip must not send single-patient words (a name, a
    # record number) to the coordinator.
    min_word_count: int = 5
    # Federated statistics (`fedmed run --stats`, docs/statistics.md): a count from 1 to
    # statistics_min_cell - 1 is sent as null (a plan asking for a larger minimum gets it), and
    # with statistics_epsilon every count gets Gaussian noise costing that ε at the site's δ,
    # recorded in its privacy ledger against epsilon_cap. Also gated by share_statistics.
    statistics_min_cell: int = 10
    statistics_epsilon: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_range("statistics_min_cell", self.statistics_min_cell, 1, 1_000_000)
        if self.statistics_epsilon is not None:
            _in_range("statistics_epsilon", self.statistics_epsilon, 0, 1000, low_open=True)

        check_site_name(self.name)
        if self.min_word_count < 1:
            raise ConfigError(
                f"site '{self.name}': min_word_count must be >= 1, got {self.min_word_count}; "
                "5 = default"
            )
        if not self.insecure and not (self.ca_certificate and self.node_key):
            raise ConfigError(
                f"site '{self.name}': set ca_certificate and node_key (from `fedmed pki "
                "issue-site`), or insecure = true for a local experiment"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(
                f"site '{self.name}': delta must be in (0, 1), got {self.delta}; e.g. 1e-6, or "
                "remove it for min(1e-5, 1 / training rows)"
            )
        if self.epsilon_cap is not None and not self.epsilon_cap >= 0:
            raise ConfigError(
                f"site '{self.name}': epsilon_cap must be >= 0, got {self.epsilon_cap}"
            )
        bad = [p for p in self.approved_plans if not p.startswith("sha256:")]
        if bad:
            raise ConfigError(
                f"approved_plans entry '{bad[0]}' is not a plan hash; copy the line printed by "
                "`fedmed plan hash CONFIG` (sha256:...)"
            )

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or Path.home() / ".fedmed" / "sites" / self.name)


def load_site_config(path: Path | str) -> SiteConfig:
    """Read sites/<name>.toml; relative file paths become absolute (next to the file)."""
    path = Path(path)
    raw = read_toml(path, "site config")
    for key in ("ca_certificate", "node_key", "state_dir"):
        value = raw.get(key)
        if isinstance(value, str) and value:
            raw[key] = str((path.parent / Path(value).expanduser()).resolve())
    return _build(SiteConfig, raw, "")


# ----------------------------------------------------------------------------------------------
# Checks that span several fields
# ----------------------------------------------------------------------------------------------


def _check_run(cfg: RunConfig) -> None:
    check_name("name", cfg.name)
    _check_ranges(cfg)
    if cfg.privacy.central != "off":
        _positive("privacy.central_noise_multiplier", cfg.privacy.central_noise_multiplier)
        _positive("privacy.central_clipping_norm", cfg.privacy.central_clipping_norm)
    if cfg.personalize.local_epochs < 0 or cfg.personalize.lr < 0:
        raise ConfigError(
            "personalize.local_epochs and personalize.lr must be >= 0 (0 = off/default)"
        )
    if cfg.personalize.local_epochs and (cfg.privacy.enabled or cfg.privacy.central != "off"):
        raise ConfigError(
            "personalize.local_epochs under differential privacy would train outside the study's "
            "privacy calibration (the reported ε would be wrong); set personalize.local_epochs = 0 "
            'or turn privacy off (privacy.enabled = false, privacy.central = "off")'
        )
    if cfg.strategy.secure_aggregation:
        _check_secure(cfg)
    schema = cfg.data.schema
    if schema.horizons:
        _check_horizons(cfg)
    if not 0 <= schema.validation_fraction < 1:
        raise ConfigError(
            "data.schema.validation_fraction must be in [0, 1) (0 = evaluate on the test rows), "
            f"got {schema.validation_fraction}"
        )
    if not cfg.sites:
        raise ConfigError("no [[sites]] in the config: list at least one site (name + path)")
    # One pass (a Counter), not names.count per name: O(N²) at 1,000s of simulated sites.
    dupes = sorted(n for n, k in Counter(s.name for s in cfg.sites).items() if k > 1)
    if dupes:
        raise ConfigError(f"site names must be unique; repeated: {', '.join(dupes)}")
    if cfg.data.builtin or cfg.data.partition_file:
        if cfg.data.partition_sizes and len(cfg.data.partition_sizes) != len(cfg.sites):
            raise ConfigError(
                f"data.partition_sizes has {len(cfg.data.partition_sizes)} entries but there are "
                f"{len(cfg.sites)} sites: give one size per site"
            )
    elif not cfg.data.dataset:
        missing = [s.name for s in cfg.sites if not s.path]
        if missing:
            raise ConfigError(
                f"sites without a path: {', '.join(missing)}; give each [[sites]] a path, "
                "set data.builtin to a packaged table, or data.dataset to a registered dataset"
            )
    if cfg.mode == "federated" and len(cfg.sites) < 2:
        raise ConfigError("a federated run needs at least 2 sites; use --mode local for one site")
    sites = len(cfg.sites)
    _in_range("strategy.min_sites", cfg.strategy.min_sites, 0, sites, fix=f"0 = all {sites} sites")
    if cfg.strategy.name in ("krum", "multikrum"):
        # Krum keeps the updates of the sites - num_malicious most central sites: at least one.
        _in_range(
            "strategy.num_malicious",
            cfg.strategy.num_malicious,
            0,
            sites - 1,
            fix=f"fewer than the {sites} sites",
        )
        _in_range(
            "strategy.krum_select",
            cfg.strategy.krum_select,
            0,
            sites - cfg.strategy.num_malicious,
            fix="0 = sites - num_malicious",
        )
    for col in schema.categorical:
        if not schema.categorical[col]:
            raise ConfigError(f"data.schema.categorical.{col} lists no categories")
    _check_site_column(cfg)
    if cfg.data.omop.active:
        _check_omop(cfg)


def _check_site_column(cfg: RunConfig) -> None:
    """Sites chosen by a column: every site names its values, no value belongs to two sites."""
    column = cfg.data.site_column
    if not column:
        given = [s.name for s in cfg.sites if s.site_values]
        if given:
            raise ConfigError(
                f"site_values given for {', '.join(given)} but data.site_column is not set; "
                "set data.site_column to the column that holds them"
            )
        return
    owner: dict[Any, str] = {}
    for site in cfg.sites:
        if not site.site_values:
            raise ConfigError(
                f"site '{site.name}' has no site_values; with data.site_column='{column}' each "
                "site lists the values of that column that are its rows"
            )
        for value in site.site_values:
            if value in owner:
                raise ConfigError(
                    f"value {value!r} of data.site_column='{column}' is listed by both "
                    f"'{owner[value]}' and '{site.name}'; give each value to one site"
                )
            owner[value] = site.name


OMOP_TASKS = ("tabular-classification", "survival", "sequence-classification")


def _check_omop(cfg: RunConfig) -> None:
    """A cohort from OMOP databases: a task that reads it, features, and no other data source."""
    omop, data = cfg.data.omop, cfg.data
    if cfg.task not in OMOP_TASKS:
        raise ConfigError(
            f"data.omop yields a table or a series; task '{cfg.task}' reads neither: use one of "
            f"{', '.join(OMOP_TASKS)}, or remove [data.omop]"
        )
    if data.builtin or data.partition_file or data.site_column:
        raise ConfigError(
            "with [data.omop] each site is its own database: remove data.builtin, "
            "data.partition_file and data.site_column"
        )
    if not omop.features:
        raise ConfigError("data.omop lists no features: add [[data.omop.features]] entries")
    names = {f.name for f in omop.features}
    unknown = [f for f in data.schema.features if f not in names]
    if unknown:
        raise ConfigError(
            f"data.schema.features names '{unknown[0]}', which is not a data.omop feature "
            f"(features: {', '.join(f.name for f in omop.features)}); add it or remove it"
        )


def _check_horizons(cfg: RunConfig) -> None:
    horizons = cfg.data.schema.horizons
    if cfg.task != "survival":
        raise ConfigError(
            f"data.schema.horizons is for task = 'survival' (this study is '{cfg.task}'); remove it"
        )
    if horizons[0] <= 0 or list(horizons) != sorted(set(horizons)):
        raise ConfigError(
            f"data.schema.horizons must be positive and increasing (in data.schema.time units), "
            f"got {list(horizons)}; e.g. horizons = [180, 365]"
        )


def _check_secure(cfg: RunConfig) -> None:
    """What SecAgg+ composes with (fedmed.coordinator.secure says why); refusals name the fix."""
    s = cfg.strategy
    conflicts = [
        (
            s.name != "fedavg",
            f"strategy.name = \"fedavg\" (not '{s.name}': the coordinator only "
            "sees the sum of the updates)",
        ),
        (s.validate_updates, "strategy.validate_updates = false (individual updates are masked)"),
        (
            cfg.privacy.central == "server-side",
            'privacy.central = "client-side" or "off" (server-side clipping cannot work: the '
            "coordinator never sees an individual update to clip)",
        ),
        (cfg.personalize.local_epochs > 0, "personalize.local_epochs = 0"),
        (cfg.personalize.local_normalization, "personalize.local_normalization = false"),
        (
            s.average_last > 1,
            "strategy.average_last = 1 (Flower's legacy SecAgg+ loop evaluates the model it "
            "aggregated; averaging rounds is not wired into it)",
        ),
    ]
    for conflict, fix in conflicts:
        if conflict:
            raise ConfigError(f"strategy.secure_aggregation = true needs {fix}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {echo(value)}")


U32 = 2**32 - 1  # seeds: numpy's and torch's generators take 0 .. 2**32 - 1


def _check_ranges(cfg: RunConfig) -> None:
    """Every numeric study setting is finite and inside a range that means something.

    The bounds are generous (they refuse nonsense, not unusual studies): a value outside them
    is a typo or a unit slip (ε = 300000, δ = 0.5) that would otherwise run for hours or
    report a privacy guarantee that is none. Each error names the key, the value and the range.
    """
    t, s, p, m, sc = cfg.train, cfg.strategy, cfg.privacy, cfg.model, cfg.data.schema
    _in_range("rounds", cfg.rounds, 1, 100_000)
    _in_range("seed", cfg.seed, 0, U32)
    _in_range("data.partition_seed", cfg.data.partition_seed, 0, U32)
    _in_range("data.schema.split_seed", sc.split_seed, 0, U32)
    _in_range("data.schema.test_fraction", sc.test_fraction, 0, 0.9, low_open=True)
    _in_range("data.dirichlet_alpha", cfg.data.dirichlet_alpha, 0, 1e6, low_open=True)
    _in_range("train.batch_size", t.batch_size, 1, 1_000_000)
    _in_range("train.lr", t.lr, 0, 100, low_open=True)
    _in_range("train.momentum", t.momentum, 0, 1, high_open=True)
    _in_range("train.weight_decay", t.weight_decay, 0, 100)
    if t.local_epochs is not None:
        _in_range("train.local_epochs", t.local_epochs, 0, 10_000, low_open=True)
    if t.local_steps is not None:
        _in_range("train.local_steps", t.local_steps, 1, 10_000_000)
    _in_range("model.members", m.members, 1, 64, fix="1 = one network, 5 = an ensemble of 5")
    _in_range("model.dropout", m.dropout, 0, 1, high_open=True)
    for i, size in enumerate(m.hidden):
        _in_range(f"model.hidden[{i}]", size, 1, 65_536)
    _in_range("strategy.round_timeout", s.round_timeout, 1, 7 * 24 * 3600, fix="in seconds")
    _in_range("strategy.max_norm_ratio", s.max_norm_ratio, 1, 1e6, low_open=True)
    _in_range("strategy.trim_beta", s.trim_beta, 0, 0.5, high_open=True)
    _in_range("strategy.num_malicious", s.num_malicious, 0, 1_000)
    _in_range("strategy.krum_select", s.krum_select, 0, 1_000)
    _in_range("strategy.server_lr", s.server_lr, 0, 100, low_open=True)
    _in_range("strategy.beta_1", s.beta_1, 0, 1, high_open=True, fix="FedAdam/FedYogi: 0.9")
    _in_range("strategy.beta_2", s.beta_2, 0, 1, high_open=True, fix="FedAdam/FedYogi: 0.99")
    _in_range("strategy.tau", s.tau, 0, 1, low_open=True, fix="FedOpt's adaptivity: 1e-3")
    # ε below 0.01 cannot be calibrated to any useful noise; above 1000 it protects no one.
    _in_range("privacy.target_epsilon", p.target_epsilon, 0.01, 1000)
    # δ must stay far below 1/n (a mechanism that leaks one record in ten is not private).
    _in_range("privacy.delta", p.delta, 0, 0.1, low_open=True, high_open=True)
    _in_range("privacy.max_grad_norm", p.max_grad_norm, 0, 1e6, low_open=True)


def _in_range(
    key: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> None:
    """A ConfigError unless ``low <= value <= high`` (strict at an open end) and finite."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if math.isfinite(value) and above and below:
        return
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, int) and not low_open and not high_open:
        interval = f"{low} .. {high}"
    hint = f" ({fix})" if fix else ""
    raise ConfigError(
        f"{key} = {echo(value)} is out of range; it must be in {interval}{hint}: "
        f"fix it in the config or with --set {key}=VALUE"
    )


# ----------------------------------------------------------------------------------------------
# Generic dict -> frozen dataclass parsing with key checking
# ----------------------------------------------------------------------------------------------


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a plain dict (TOML or JSON), naming any bad key or value."""
    return _build(RunConfig, raw, "")


def parse_omop(raw: dict[str, Any]) -> OmopConfig:
    """A cohort definition ([data.omop]) from plain values, e.g. as a site registered it."""
    return _build(OmopConfig, raw, "data.omop.")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "top level"
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' at {where}; valid keys: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        f = fields[name]
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", f.metadata.get("choices"))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field (e.g. a site's name) is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _coerce(tp: Any, value: Any, key: str, choices: tuple[str, ...] | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, choices)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {echo(value)}")
        if args and dataclasses.is_dataclass(args[0]):  # [[sites]], [[data.omop.features]]
            return tuple(_build(args[0], v, f"{key}[{i}].") for i, v in enumerate(value))
        item = args[0] if args and args[0] is not Any else None
        return tuple(
            _coerce(item, v, f"{key}[{i}]", None) if item else v for i, v in enumerate(value)
        )
    if tp is FrozenMap:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table, got {echo(value)}")
        return _freeze({str(k): v for k, v in value.items()})
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {echo(value)}")
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or int(value) != value
        ):
            raise ConfigError(f"{key} must be an integer, got {echo(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {echo(value)}")
        try:
            number = float(value)
        except OverflowError:  # a TOML integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(
                f"{key} must be a finite number, got {echo(value)}; give a plain number"
            )
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {echo(value)}")
        if choices and value not in choices:
            raise ConfigError(
                f"{key}={echo(value)} is not valid; choose one of: {', '.join(choices)}"
            )
        return value
    return value


def plain(obj: Any) -> Any:
    """A config dataclass as plain JSON values (dicts, lists, scalars), as sent to sites."""
    return _jsonable(dataclasses.asdict(obj))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):  # dicts and FrozenMap
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Files and command-line overrides
# ----------------------------------------------------------------------------------------------


def resolve_config_path(name: str | None) -> Path:
    """A path as given, else a config shipped with fedmed (``demo`` -> simulations/demo.toml)."""
    if name is None:
        name = "demo"
    path = Path(name)
    if path.is_file():
        return path
    stem = path.stem if path.suffix == ".toml" else path.name
    packaged = resources.files("fedmed.simulations").joinpath(f"{stem}.toml")
    if packaged.is_file():
        return Path(str(packaged))
    shipped = sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("fedmed.simulations").iterdir()
        if p.name.endswith(".toml")
    )
    raise ConfigError(
        f"config file '{name}' not found; give a path to a TOML file or one of the shipped "
        f"configs: {', '.join(shipped)}"
    )


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing, binary or malformed file is a one-line ConfigError."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{what} {echo(str(path))} is not a text file (not UTF-8); give a TOML config file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {echo(str(path))}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{echo(str(path))} is not valid TOML ({echo(str(exc))}); fix the file"
        ) from None


def load_run_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML run config and apply ``key.sub=value`` overrides, then validate once."""
    raw = read_toml(Path(path), "config")
    for item in overrides:
        apply_override(raw, item)
    return parse_run_config(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``--set a.b=value`` in place; the value is read as TOML, else as a string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. --set rounds=20), got '{item}'")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a table")
        node = child
    node[parts[-1]] = value


SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_site_name(name: str) -> str:
    """Site names become file names and node names: keep them plain."""
    if not SITE_NAME.match(name):
        raise ConfigError(
            f"site name '{name}' is not allowed; use lower-case letters, digits, '-' and '_' "
            "(e.g. st-marys)"
        )
    return name


def ledger_dir() -> Path:
    """$FEDMED_LEDGER_DIR, else ~/.fedmed/ledger."""
    return Path(_env("FEDMED_LEDGER_DIR") or Path.home() / ".fedmed" / "ledger")


def key_dir() -> Path:
    return Path(_env("FEDMED_KEY_DIR") or Path.home() / ".fedmed" / "keys")
