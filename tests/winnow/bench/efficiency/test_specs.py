"""Strategies by name: the short form, JSON files, and the settings they become."""

import json
import logging
from pathlib import Path

import pytest

from service.config import PolicySettings
from winnow.bench.efficiency.specs import (
    STRATEGIES,
    SpecError,
    StrategySpec,
    load_specs,
    parse_spec,
    resolve,
)


def test_short_form_names_policy_utility_filters_and_selector() -> None:
    name, spec = parse_spec("mine=split:margin:dedup+balance:coreset")
    assert name == "mine"
    settings = spec.policy_settings(budget=0.1, window=200, seed=3)
    assert settings.name == "split"
    assert settings.utility == "margin"
    assert list(settings.filters) == ["dedup", "balance"]
    assert settings.selector == "coreset"
    assert (settings.budget, settings.window, settings.seed) == (0.1, 200, 3)


def test_short_form_empty_parts_keep_the_defaults() -> None:
    _, spec = parse_spec("m=:bald")
    settings = spec.policy_settings(budget=0.1)
    defaults = PolicySettings.model_fields
    assert settings.utility == "bald"
    assert settings.name == defaults["name"].default
    assert settings.selector == defaults["selector"].default


@pytest.mark.parametrize("text", ["no-equals", "=variable", "x=a:b:c:d:e"])
def test_short_form_errors(text: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(text)


def test_an_unknown_utility_or_field_is_refused_not_ignored() -> None:
    _, spec = parse_spec("bad=variable:nonsense")
    with pytest.raises(SpecError, match="utility"):
        spec.policy_settings(budget=0.1)
    with pytest.raises(SpecError, match="typo"):
        StrategySpec(settings={"typo": 1}).policy_settings(budget=0.1)


def test_a_spec_cannot_change_the_budget_it_is_compared_at() -> None:
    with pytest.raises(SpecError, match="budget"):
        StrategySpec(settings={"budget": 0.5}).policy_settings(budget=0.1)


def test_environment_does_not_leak_into_a_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    default = PolicySettings.model_fields["utility"].default
    monkeypatch.setenv("WINNOW_POLICY_UTILITY", "entropy" if default == "bald" else "bald")
    assert STRATEGIES["default"].policy_settings(budget=0.1).utility == default


def test_builtin_names_keep_their_meaning_and_random_is_random() -> None:
    margin = STRATEGIES["margin"].policy_settings(budget=0.1)
    assert (margin.name, margin.utility, list(margin.filters)) == ("variable", "margin", [])
    for name in ("random", "skal-split"):
        settings = STRATEGIES[name].policy_settings(budget=0.1)
        assert (settings.name, settings.cold_start, list(settings.filters)) == (
            "random",
            "random",
            [],
        )


def test_json_specs_take_any_policy_setting_and_peers(tmp_path: Path) -> None:
    path = tmp_path / "specs.json"
    path.write_text(
        json.dumps(
            {
                "quantile-margin": {"policy": "quantile", "utility": "margin", "params": {}},
                "peer": {"peer": "Split"},
            }
        )
    )
    specs = load_specs(path)
    assert specs["quantile-margin"].policy_settings(budget=0.1).name == "quantile"
    assert specs["peer"].peer == "Split"
    path.write_text(json.dumps({"p": {"peer": "Split", "utility": "margin"}}))
    with pytest.raises(SpecError, match="peer"):
        load_specs(path)
    path.write_text("[1, 2]")
    with pytest.raises(SpecError):
        load_specs(path)


def test_resolve_puts_random_first_and_adds_given_specs_to_the_defaults() -> None:
    extra = dict([parse_spec("mine=variable:margin")])
    chosen = resolve(None, extra, ("margin", "aift"))
    assert list(chosen) == ["random", "margin", "aift", "mine"]
    assert list(resolve(["mine", "aift"], extra, ())) == ["random", "mine", "aift"]
    with pytest.raises(SpecError, match="unknown"):
        resolve(["nope"], extra, ())


def test_a_given_spec_left_out_of_the_names_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Catches a spec that silently does not run (``--strategies random,default
    --strategy-spec mine=...`` ran 20 minutes without ``mine``)."""
    extra = dict([parse_spec("mine=variable:margin"), parse_spec("also=variable:entropy")])
    with caplog.at_level(logging.WARNING, logger="winnow.bench.efficiency.specs"):
        assert list(resolve(["also"], extra, ())) == ["random", "also"]
    (record,) = caplog.records
    assert "not run: mine" in record.getMessage()
    caplog.clear()
    resolve(None, extra, ())
    assert caplog.records == []
