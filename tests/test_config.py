"""One configuration object: TOML < environment < --set; every error names its field."""

from __future__ import annotations

import pytest

from streamfilter.config import load_config
from streamfilter.errors import ConfigError


def test_layers_override_in_order(tmp_path):
    path = tmp_path / "sf.toml"
    path.write_text('[policy]\nname = "density"\nkeep_rate = 0.3\n[kafka]\nbootstrap_servers = "a:1"\n'
                    'security_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n')
    config = load_config(path, env={"STREAMFILTER_POLICY_KEEP_RATE": "0.25", "STREAMFILTER_BATCH_MAX_WAIT_MS": "20"},
                         overrides=["policy.keep_rate=0.1"])
    assert config.policy.name == "density"
    assert config.policy.keep_rate == 0.1
    assert config.batch.max_wait_ms == 20
    assert config.kafka.bootstrap_servers == "a:1"
    assert config.kafka_client_settings()["security_protocol"] == "SASL_SSL"
    assert config.kafka_client_settings()["sasl_mechanism"] == "PLAIN"


@pytest.mark.parametrize("overrides, env, field", [
    (["policy.keep_rate=1.5"], {}, "policy.keep_rate"),
    (["policy.keep_rate=lots"], {}, "policy.keep_rate"),
    (["policy.name=best"], {}, "policy.name"),
    (["batch.max_batch_docs=0"], {}, "batch.max_batch_docs"),
    (["batch.base_batch_docs=0"], {}, "batch.base_batch_docs"),
    (["batch.max_batch_bytes=0"], {}, "batch.max_batch_bytes"),
    (["batch.target_batch_ms=0"], {}, "batch.target_batch_ms"),
    (["kafka.producer_batch_bytes=10"], {}, "kafka.producer_batch_bytes"),
    (["nosuch.key=1"], {}, "nosuch.key"),
    (["batch.nosuch=1"], {}, "batch.nosuch"),
    ([], {"STREAMFILTER_ROUTE_EMIT_REJECTED": "maybe"}, "route.emit_rejected"),
    ([], {"STREAMFILTER_SKETCH_ROWS": "-3"}, "sketch.rows"),
    (["models.variant=fp8"], {}, "models.variant"),
    (["justakey"], {}, "justakey"),
])
def test_bad_settings_fail_naming_the_field(overrides, env, field):
    with pytest.raises(ConfigError) as info:
        load_config(env=env, overrides=overrides)
    assert field in str(info.value)


def test_toml_type_errors_name_the_field(tmp_path):
    path = tmp_path / "sf.toml"
    path.write_text('[batch]\nmax_wait_ms = "soon"\n')
    with pytest.raises(ConfigError, match="batch.max_wait_ms"):
        load_config(path, env={})
    path.write_text("[batch\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={})


def test_defaults_come_from_the_paper():
    config = load_config(env={})
    assert (config.sketch.rows, config.sketch.buckets) == (1000, 20000)
    assert config.models.max_tokens == 512
