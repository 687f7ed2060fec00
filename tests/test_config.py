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


# -- sites by name: kinds, regions, prices and their sources --------------------------------

PARIS = {"tiers": {"edge-paris": {"kind": "edge", "region": "eu-west", "usd_per_hour": 0.5,
                                  "price_source": "a colo quote, 2026"}},
         "links": {"edge-paris": {"bandwidth_up": "1MB/s", "bandwidth_down": "2MB/s",
                                  "rtt_ms": 8, "usd_per_gb_down": 0.01,
                                  "price_source": "transit, 2026"}}}


def test_sites_have_names_kinds_and_their_own_prices() -> None:
    from tierwise.planner.cost import PriceTable

    config = config_from_dict(PARIS, "test")
    assert config.sites() == ["edge", "cloud", "edge-paris"]
    assert config.sites("edge") == ["edge", "edge-paris"] and config.kind("edge-paris") == "edge"
    table = PriceTable.of(config)
    paris, edge, cloud = (table.site(name) for name in ("edge-paris", "edge", "cloud"))
    assert paris.per_ms == pytest.approx(0.5 / 3.6e6)  # its own hour
    assert edge.per_ms == pytest.approx(0.17 / 3.6e6)  # the price book's edge default
    assert paris.per_byte_down == pytest.approx(0.01 / 1e9)  # its own link's price
    assert paris.per_byte_up == 0.0  # the edge kind's default: free
    assert cloud.per_byte_down == pytest.approx(0.09 / 1e9)
    assert table.site("device").per_ms == 0.0 and table.site("nowhere").per_ms == 0.0


def test_a_site_and_its_link_come_together() -> None:
    with pytest.raises(ConfigError, match=r"links\.edge-x: a site needs its link"):
        config_from_dict({"tiers": {"edge-x": {"kind": "edge"}}}, "test")
    with pytest.raises(ConfigError, match=r"links\.edge-y: no such site"):
        config_from_dict({"links": {"edge-y": {"bandwidth_up": "1MB/s",
                                               "bandwidth_down": "1MB/s", "rtt_ms": 1}}},
                         "test")


def test_a_site_not_named_after_a_kind_must_say_which_it_is() -> None:
    with pytest.raises(ConfigError, match=r"tiers\.paris\.kind"):
        config_from_dict({"tiers": {"paris": {}}, "links": {"paris": PARIS["links"][
            "edge-paris"]}}, "test")
    with pytest.raises(ConfigError, match=r"tiers\.phone\.kind"):
        config_from_dict({"tiers": {"phone": {"kind": "device"}}}, "test")


def test_the_policy_predicts_the_cost_the_trace_bills() -> None:
    from tierwise.planner.cost import PriceTable
    from tierwise.planner.estimators import LinkEstimate
    from tierwise.planner.plans import Local, Remote
    from tierwise.planner.policy import SLO, Candidate, PlanningState, Policy

    config = config_from_dict(PARIS, "test")
    prices = PriceTable.of(config)
    policy = Policy([
        Candidate(Local("small"), accuracy=0.80, device_model="small", device_ms=2.0),
        Candidate(Remote("edge-paris", "big"), accuracy=0.95, device_model="big",
                  device_ms=0.0, tier="edge-paris", server_model="big", server_ms=5.0,
                  payload_mean_bytes=1000, payload_p95_bytes=1000),
    ], prices)
    link = LinkEstimate(rtt_ms=8.0, bandwidth_up=1e6, bandwidth_down=2e6,
                        overhead_up_bytes=200.0, response_bytes=300.0)
    decision = policy.choose(SLO(deadline_ms=500, min_accuracy=0.9),
                             PlanningState(links={"edge-paris": link}))
    assert decision.plan == Remote("edge-paris", "big")
    billed = prices.compute_usd("edge-paris", 5.0) + prices.transfer_usd("edge-paris",
                                                                        1000 + 200, 300)
    assert decision.cost_usd == pytest.approx(billed, rel=1e-9)
    assert billed > 0


def test_serve_takes_any_configured_site_and_config_show_names_its_sources(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tomli_w

    file = tmp_path / "tierwise.toml"
    file.write_text(tomli_w.dumps(PARIS))
    assert main(["--config", str(file), "config", "show"]) == 0
    out = capsys.readouterr().out
    assert "tiers.edge-paris: a colo quote, 2026" in out
    assert "links.edge-paris: transit, 2026" in out
    assert main(["--config", str(file), "serve", "--tier", "device"]) == 2
    assert "['edge', 'cloud', 'edge-paris']" in capsys.readouterr().err
    assert main(["--config", str(file), "serve", "--tier", "edge-lyon"]) == 2
    assert "tiers.edge-lyon: no such tier" in capsys.readouterr().err


def test_the_shared_database_url_may_come_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://tierwise:secret@db:5432/tierwise"
    monkeypatch.setenv("TIERWISE_DATABASE_URL", url)
    config = load_config(None)
    assert config.registry.database == url and config.telemetry.collector_db == url
    file = tmp_path / "tierwise.toml"
    file.write_text('[telemetry]\ncollector_db = "/var/traces.db"\n')  # the file's wins
    config = load_config(str(file))
    assert config.registry.database == url and config.telemetry.collector_db == "/var/traces.db"


def test_a_written_config_reads_back_equal_wherever_the_file_is(tmp_path, monkeypatch) -> None:
    from tierwise.config import Config, load_config, write_config

    monkeypatch.chdir(tmp_path)
    config = Config(data_dir="runs/data")  # relative to where this process runs
    written = write_config(config, (tmp_path / "elsewhere").mkdir() or
                           tmp_path / "elsewhere" / "tierwise.toml")
    again = load_config(written)
    assert again.data_dir == str(tmp_path / "runs" / "data")
    assert again.model_dump(exclude={"data_dir"}) == config.model_dump(exclude={"data_dir"})
