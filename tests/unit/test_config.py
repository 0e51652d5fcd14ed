from __future__ import annotations

import pytest

from tasks.lib.config import DEFAULT_PARAMS, apply_overrides, load_section, read_params_file
from tasks.lib.errors import ConfigError
from tasks.mirror import MirrorParams
from tasks.sample import SampleParams
from tasks.validate import ValidateParams


def test_every_section_of_params_yaml_loads_into_its_model():
    from tasks.baseline import BaselineParams
    from tasks.download import DownloadParams
    from tasks.evaluate import EvaluateParams
    from tasks.ingest import IngestParams
    from tasks.lib.backends import BackendsParams
    from tasks.lib.gate_rules import GateParams
    from tasks.lib.model import ModelParams
    from tasks.lib.pipeline import PipelineParams
    from tasks.lib.training_runs import CostParams
    from tasks.monitor import MonitorParams
    from tasks.screen import ScreenParams
    from tasks.search import SearchParams
    from tasks.serve import ServeParams
    from tasks.tile import TileParams
    from tasks.train import TrainParams
    from tasks.versioning import VersioningParams

    models = {
        "mirror": MirrorParams,
        "download": DownloadParams,
        "ingest": IngestParams,
        "validate": ValidateParams,
        "tile": TileParams,
        "sample": SampleParams,
        "versioning": VersioningParams,
        "model": ModelParams,
        "train": TrainParams,
        "cost": CostParams,
        "baseline": BaselineParams,
        "evaluate": EvaluateParams,
        "gate": GateParams,
        "search": SearchParams,
        "screen": ScreenParams,
        "monitor": MonitorParams,
        "serve": ServeParams,
        "pipeline": PipelineParams,
        "backends": BackendsParams,
    }
    assert set(read_params_file(DEFAULT_PARAMS)) == set(models)
    for section, model in models.items():
        assert isinstance(load_section(section, model), model)


def test_override_parses_value_as_yaml_and_leaves_the_original_untouched():
    data = {"validate": {"max_bad_fraction": 0.05, "workers": 2}}
    merged = apply_overrides(data, ["validate.max_bad_fraction=0.5", "validate.workers=1"])
    assert merged["validate"] == {"max_bad_fraction": 0.5, "workers": 1}
    assert data["validate"]["max_bad_fraction"] == 0.05


def test_nested_override_reaches_into_sub_sections():
    data = {"download": {"sources": {"embedded": {"url": "a"}}}}
    merged = apply_overrides(data, ["download.sources.embedded.url=b"])
    assert merged["download"]["sources"]["embedded"]["url"] == "b"
    assert data["download"]["sources"]["embedded"]["url"] == "a"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("validate", "expected SECTION.KEY=VALUE"),
        ("nosuch.key=1", "no section 'nosuch'"),
        ("validate.max_bad_fraction=[1", "not valid YAML"),
    ],
)
def test_bad_override_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_section("validate", ValidateParams, overrides=[override])


def test_unknown_key_and_bad_value_are_named_with_section_and_key():
    with pytest.raises(ConfigError, match=r"validate\.max_bad_fractoin: Extra inputs"):
        load_section("validate", ValidateParams, overrides=["validate.max_bad_fractoin=0.1"])
    with pytest.raises(ConfigError, match=r"validate\.max_bad_fraction: Input should be less than or equal to 1"):
        load_section("validate", ValidateParams, overrides=["validate.max_bad_fraction=3"])


def test_inconsistent_range_is_rejected():
    with pytest.raises(ConfigError, match="cloud_fraction_min is greater"):
        load_section("validate", ValidateParams, overrides=["validate.cloud_fraction_min=0.9"])


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_section("validate", ValidateParams, path=tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("validate: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_section("validate", ValidateParams, path=broken)
    broken.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_section("validate", ValidateParams, path=broken)
    broken.write_text("mirror: {}\n")
    with pytest.raises(ConfigError, match="no section 'validate'"):
        load_section("validate", ValidateParams, path=broken)
