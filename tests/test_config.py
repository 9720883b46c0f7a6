"""One configuration object: TOML < environment < --set; every error names its field."""

from __future__ import annotations

import pytest

from streamfilter.config import load_config
from streamfilter.errors import ConfigError


def test_layers_override_in_order(tmp_path):
    path = tmp_path / "sf.toml"
    path.write_text('[policy]\nname = "density"\nkeep_rate = 0.3\n[kafka]\nbootstrap_servers = "a:1"\n'
                    'security_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
                    'sasl_plain_username = "u"\nsasl_plain_password = "p"\n')
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
    (["models.inference_batch_tokens=-1"], {}, "models.inference_batch_tokens"),
    ([], {"STREAMFILTER_MODELS_INFERENCE_BATCH_TOKENS": "many"}, "models.inference_batch_tokens"),
    (["justakey"], {}, "justakey"),
])
def test_bad_settings_fail_naming_the_field(overrides, env, field):
    with pytest.raises(ConfigError) as info:
        load_config(env=env, overrides=overrides)
    assert field in str(info.value)


def test_kubernetes_service_link_variables_are_not_settings():
    """Kubernetes sets <SERVICE>_SERVICE_HOST/_PORT/... for every Service: a Service named
    `streamfilter-metrics` (or `streamfilter-route`) must not stop the daemon from starting."""
    env = {
        "STREAMFILTER_METRICS_SERVICE_HOST": "10.0.0.7", "STREAMFILTER_METRICS_SERVICE_PORT": "9308",
        "STREAMFILTER_METRICS_SERVICE_PORT_HTTP": "9308", "STREAMFILTER_METRICS_PORT": "tcp://10.0.0.7:9308",
        "STREAMFILTER_METRICS_PORT_9308_TCP": "tcp://10.0.0.7:9308", "STREAMFILTER_METRICS_PORT_9308_TCP_ADDR": "10.0.0.7",
        "STREAMFILTER_METRICS_PORT_9308_TCP_PORT": "9308", "STREAMFILTER_METRICS_PORT_9308_TCP_PROTO": "tcp",
        "STREAMFILTER_ROUTE_SERVICE_HOST": "10.0.0.8", "STREAMFILTER_ROUTE_PORT": "tcp://10.0.0.8:9308",
        # a Service named streamfilter-daemon-metrics: named like a setting, valued like a service link
        "STREAMFILTER_DAEMON_METRICS_PORT": "tcp://10.0.0.9:9308",
        "STREAMFILTER_BATCH_MAX_WAIT_MS": "20",  # a real setting beside them still applies
    }
    config = load_config(env=env)
    assert config.batch.max_wait_ms == 20
    assert config.daemon.metrics_port == 9308
    assert load_config(env={"STREAMFILTER_DAEMON_METRICS_PORT": "9400"}).daemon.metrics_port == 9400


def test_a_typo_in_a_section_still_fails_fast_and_suggests_the_section():
    with pytest.raises(ConfigError, match=r"polici\.keep_rate.*did you mean 'policy'"):
        load_config(env={"STREAMFILTER_POLICI_KEEP_RATE": "0.1"})
    with pytest.raises(ConfigError, match="route.min_snapshot_doc"):
        load_config(env={"STREAMFILTER_ROUTE_MIN_SNAPSHOT_DOC": "10"})


@pytest.mark.parametrize("env, field", [
    ({"STREAMFILTER_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol"),
    ({"STREAMFILTER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "STREAMFILTER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-1"},
     "kafka.sasl_mechanism"),
    ({"STREAMFILTER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "kafka.sasl_mechanism"),
    ({"STREAMFILTER_KAFKA_SASL_MECHANISM": "PLAIN"}, "kafka.sasl_mechanism"),
    ({"STREAMFILTER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "STREAMFILTER_KAFKA_SASL_MECHANISM": "PLAIN"},
     "kafka.sasl_plain_username"),
    ({"STREAMFILTER_KAFKA_REQUEST_TIMEOUT_MS": "soon"}, "kafka.request_timeout_ms"),
    ({"STREAMFILTER_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "kafka.ssl_cafile"),
])
def test_kafka_pass_through_settings_are_checked_at_start(env, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(env=env)


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
