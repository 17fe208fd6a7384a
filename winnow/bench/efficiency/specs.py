"""The strategies a run compares: Winnow policy configurations by name, or scikit-activeml peers.

A Winnow strategy is a set of ``WINNOW_POLICY_*`` settings (``service.config.PolicySettings``
field names: ``name`` of the threshold policy, ``utility``, ``filters``, ``selector``,
``params``, ``filter_params``, ``cold_start_random`` and whatever fields are added
later), built into the scorer's own ``QueryPolicy`` and ``ScoringEngine``. A new
policy, utility, filter or selector can therefore be benchmarked without touching
the bench: name it on the command line

    --strategy-spec margin-core=variable:margin:dedup+balance:coreset

(``policy:utility:filters:selector``, empty parts keep the defaults, filters
joined by ``+``), or in a JSON file given to ``--strategy-specs``:

    {"vessal": {"policy": "vessal", "utility": "margin"}, "peer-split": {"peer": "Split"}}

A peer is a scikit-activeml stream strategy (``skactiveml.stream`` class name)
fed the same CNN's probabilities at the same budget.
"""

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.config import PolicySettings
from winnow.bench.efficiency.errors import BenchConfigError

log = logging.getLogger(__name__)

# Set by the bench for every strategy alike: a spec cannot change the budget it is compared at.
BENCH_FIELDS = frozenset({"budget", "window", "seed", "labels_per_hour"})


class SpecError(BenchConfigError):
    """A strategy spec that cannot be parsed or names settings the policy does not have."""


class BenchPolicySettings(PolicySettings):
    """``PolicySettings`` read from the spec alone: no ``WINNOW_POLICY_*`` variable leaks
    into a benchmark, and an unknown field is an error rather than ignored."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


@dataclass(frozen=True)
class StrategySpec:
    """One strategy of the benchmark.

    Attributes:
        settings: ``PolicySettings`` fields of a Winnow strategy (``policy`` is
            accepted for ``name``); empty for a peer.
        peer: a ``skactiveml.stream`` class name, or None for a Winnow strategy.
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    peer: str | None = None

    def policy_settings(self, **bench: Any) -> PolicySettings:
        """The scorer's settings of this strategy, with the bench's budget, window and seed.

        Raises:
            SpecError: a field the policy settings do not have, or a value they refuse.
        """
        fields = dict(self.settings)
        if "policy" in fields:
            fields["name"] = fields.pop("policy")
        if self.peer is not None:
            fields = dict(PEER_SETTINGS)  # only the cold start runs through the policy
        clash = sorted(BENCH_FIELDS & set(fields))
        if clash:
            raise SpecError(f"{clash} are set by the bench for every strategy alike")
        try:
            return BenchPolicySettings(**fields, **bench)
        except ValidationError as error:
            raise SpecError(str(error)) from None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record of the spec."""
        if self.peer is not None:
            return {"peer": self.peer}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()}


def _winnow(**settings: Any) -> StrategySpec:
    return StrategySpec(settings=settings)


def _classic(**settings: Any) -> StrategySpec:
    """A strategy as the bench first measured it, pinned so its name keeps its meaning when
    the scorer's defaults change: the variable threshold, a random cold start, no filter
    unless named."""
    return _winnow(**{"name": "variable", "cold_start": "random", "filters": (), **settings})


_FILTERS = ("dedup", "density", "balance")
PEER_SETTINGS: Mapping[str, Any] = {"name": "random", "cold_start": "random", "filters": ()}
"""A peer's policy: it only samples at random until the first model, like random itself."""
STRATEGIES: dict[str, StrategySpec] = {
    "random": _winnow(**PEER_SETTINGS),
    "default": _winnow(),  # the scorer as shipped: every WINNOW_POLICY_* at its default
    "entropy": _classic(utility="entropy"),
    "margin": _classic(utility="margin"),
    "least-confidence": _classic(utility="least_confidence"),
    "aift": _classic(utility="aift"),
    "aift-entropy": _classic(utility="aift_entropy"),
    "aift+filters": _classic(utility="aift", filters=_FILTERS),
    "margin+filters": _classic(utility="margin", filters=_FILTERS),
    "margin+dedup": _classic(utility="margin", filters=("dedup",)),
    "margin+balance": _classic(utility="margin", filters=("balance",)),
    "aift+dedup": _classic(utility="aift", filters=("dedup",)),
    "bald": _classic(utility="bald"),
    "coreset": _classic(utility="entropy", selector="coreset"),
    "badge": _classic(utility="entropy", selector="badge"),
    "skal-variable-uncertainty": StrategySpec(peer="VariableUncertainty"),
    "skal-split": StrategySpec(peer="Split"),
    "skal-pal": StrategySpec(peer="StreamProbabilisticAL"),
}
"""The built-in strategies; ``--strategy-spec`` and ``--strategy-specs`` add to them."""

# Seven strategies each (random, the scorer as shipped, two more of Winnow's, the three
# scikit-activeml peers), so that ten seeds of the default run fit in about 40 minutes on
# two CPU cores.
DEFAULT_STRATEGIES = (
    "random",
    "default",
    "margin",
    "aift",
    "skal-variable-uncertainty",
    "skal-split",
    "skal-pal",
)
VIDEO_DEFAULT_STRATEGIES = (
    "random",
    "default",
    "margin+dedup",
    "aift+dedup",
    "skal-variable-uncertainty",
    "skal-split",
    "skal-pal",
)
IMBALANCE_DEFAULT_STRATEGIES = (
    "random",
    "default",
    "margin",
    "margin+balance",
    "skal-variable-uncertainty",
    "skal-split",
    "skal-pal",
)


def parse_spec(text: str) -> tuple[str, StrategySpec]:
    """``name=policy:utility:filters:selector`` (filters joined by ``+``; empty parts default).

    Raises:
        SpecError: no name, or more than four parts.
    """
    name, sep, body = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise SpecError(f"expected name=policy:utility:filters:selector, not {text!r}")
    parts = body.split(":")
    if len(parts) > 4:
        raise SpecError(f"{text!r} has more than policy:utility:filters:selector")
    parts += [""] * (4 - len(parts))
    policy, utility, filters, selector = (part.strip() for part in parts)
    settings: dict[str, Any] = {}
    if policy:
        settings["name"] = policy
    if utility:
        settings["utility"] = utility
    if filters:
        settings["filters"] = tuple(f for f in filters.split("+") if f)
    if selector:
        settings["selector"] = selector
    return name, StrategySpec(settings=settings)


def load_specs(path: Path) -> dict[str, StrategySpec]:
    """Strategies from a JSON object of name to settings (or to ``{"peer": class}``).

    Raises:
        SpecError: the file is not such an object.
    """
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SpecError(f"cannot read strategy specs from {path}: {error}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SpecError(f"{path}: expected an object of name to settings object")
    specs: dict[str, StrategySpec] = {}
    for name, settings in raw.items():
        settings = dict(settings)
        peer = settings.pop("peer", None)
        if peer is not None and settings:
            raise SpecError(f"{path}: {name} is a peer; it takes no policy settings")
        specs[name] = StrategySpec(settings=settings, peer=peer)
    return specs


def given_specs(path: Path | None, texts: Sequence[str] | None) -> dict[str, StrategySpec]:
    """The strategies a command line gives: ``--strategy-specs`` (a file), then each
    ``--strategy-spec`` (a later one of the same name wins).

    Raises:
        SpecError: a file or a spec that cannot be read.
    """
    specs = load_specs(path) if path is not None else {}
    for text in texts or ():
        name, spec = parse_spec(text)
        specs[name] = spec
    return specs


def resolve(
    names: Sequence[str] | None,
    extra: Mapping[str, StrategySpec],
    default: Sequence[str],
) -> dict[str, StrategySpec]:
    """The strategies of a run, random first: the named ones (built-in or given), else the
    defaults plus every given spec. A given spec that the names leave out is not run; a
    warning says so.

    Raises:
        SpecError: an unknown name.
    """
    known = {**STRATEGIES, **extra}
    chosen = list(names) if names else [*default, *(n for n in extra if n not in default)]
    if left := [n for n in extra if n not in chosen]:
        log.warning(
            "given but not named in --strategies, so not run: %s (name them there too)",
            ", ".join(left),
        )
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SpecError(f"unknown strategies {unknown}; known: {', '.join(known)}")
    ordered = ["random", *(n for n in chosen if n != "random")]
    return {name: known[name] for name in dict.fromkeys(ordered)}
