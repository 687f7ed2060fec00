from pathlib import Path

import pytest

from tierwise.cli import main
from tierwise.config import ConfigError, config_from_dict, load_config, parse_rate


def test_rates_parse_in_decimal_and_binary_units() -> None:
    assert parse_rate("250KB/s") == 250_000
    assert parse_rate("1.5 MB/s") == 1_500_000
    assert parse_rate("8Mbit/s") == 1_000_000
    assert parse_rate("1KiB/s") == 1024
    assert parse_rate(1000) == 1000.0


def test_defaults_need_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TIERWISE_CONFIG", raising=False)
    config = load_config()
    assert set(config.tiers) == {"device", "edge", "cloud"}
    assert config.links["cloud"].bandwidth_up == 250_000
    assert config.prices.cloud_usd_per_hour > 0
    assert "g4dn" in config.prices.sources["cloud_usd_per_hour"]


def test_bad_rate_names_the_field_and_the_value() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict({"links": {"edge": {"bandwidth_up": "-3"}}})
    message = str(error.value)
    assert "links.edge.bandwidth_up" in message
    assert "expected a rate like '250KB/s'" in message
    assert "'-3'" in message


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError, match=r"tiers\.edge\.max_batch: unknown field"):
        config_from_dict({"tiers": {"edge": {"max_batch": 4}}})


def test_partial_tier_keeps_other_defaults() -> None:
    config = config_from_dict({"tiers": {"edge": {"max_batch_size": 4}}})
    assert config.tiers["edge"].max_batch_size == 4
    assert config.tiers["cloud"].max_batch_size == 64


def test_config_file_errors_name_file_and_field(tmp_path: Path) -> None:
    file = tmp_path / "tierwise.toml"
    file.write_text('[slo]\ndeadline_ms = "soon"\n')
    with pytest.raises(ConfigError) as error:
        load_config(file)
    assert str(file) in str(error.value) and "slo.deadline_ms" in str(error.value)
    file.write_text("[slo\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(file)


def test_config_show_prints_loadable_toml_with_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "tierwise.toml"
    file.write_text('[links.cloud]\nbandwidth_up = "1MB/s"\n')
    assert main(["--config", str(file), "config", "show"]) == 0
    out = capsys.readouterr().out
    import tomllib

    shown = tomllib.loads(out)
    assert shown["links"]["cloud"]["bandwidth_up"] == 1_000_000
    assert "price book sources" in out and "aws" in out.lower()


def test_cli_reports_bad_config_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "tierwise.toml"
    file.write_text('[tiers.edge]\nmax_batch_size = 0\n')
    assert main(["--config", str(file), "config", "show"]) == 2
    assert "tiers.edge.max_batch_size" in capsys.readouterr().err


def test_serve_flags_are_validated_like_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--tier", "edge", "--max-batch-size", "0", "--port", "1"]) == 2
    assert "tiers.edge.max_batch_size" in capsys.readouterr().err
    assert main(["serve", "--tier", "edge", "--models", str(tmp_path), "--port", "1"]) == 2
    assert "no models to serve" in capsys.readouterr().err
