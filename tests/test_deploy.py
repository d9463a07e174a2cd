"""The deployment files (examples/deploy, Dockerfile, .dockerignore) checked without running them.

No container engine runs here, so nothing is started as a container. What is checked:

- every YAML file under examples/deploy parses;
- the OpenTelemetry Collector configurations (compose's file and the one in the
  Kubernetes ConfigMap) pass ``validate`` of a Collector built from
  ``examples/deploy/otelcol/builder.yaml``, and Jaeger's passes Jaeger v2's own
  ``validate``; both binaries come from ``tests.e2e.binaries``;
- the otel-dl collector configurations load with the collector's own ``load_config``;
- docker-compose.yaml against the Compose specification's JSON schema (as vendored by
  check-jsonschema), and its cross references: services named by ``depends_on``,
  ``network_mode`` and by every host:port in the mounted configs exist and listen on
  that port, static load-balancing backends are the otel-dl collectors' OTLP/gRPC port,
  mounted files exist, images are pinned;
- the Grafana dashboard: its data source uids are provisioned, every PromQL metric and
  label is one the collector exports (read from ``CollectorMetrics``), every TraceQL
  attribute is in ``otel_dl.semconv`` with a value of its type;
- the Dockerfile (dockerfile-parse): a pinned base, COPY sources that exist and that
  .dockerignore keeps, a non-root user, the collector's ports exposed and its data
  directory a volume, the entrypoint a console script of pyproject.toml;
- the Kubernetes manifests against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict) and their wiring: selectors, the headless Service, ports, the resolver, RBAC.

The binary-backed tests skip only when a binary is not cached and no ``go`` command can
build it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import promql_parser
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME
from prometheus_client.metrics import MetricWrapperBase

from otel_dl import semconv
from otel_dl.collector.config import CollectorConfig, load_config
from otel_dl.collector.metrics import UNKNOWN_METHOD, BatchHistogram, CollectorMetrics
from tests.e2e.binaries import BUILD_TIMEOUT_SECONDS, NoGoToolchain, jaeger_binary, otelcol_binary
from tests.support import promql_parts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "examples" / "deploy"
COMPOSE = DEPLOY / "docker-compose.yaml"
OTELCOL_CONFIG = DEPLOY / "otelcol" / "config.yaml"
JAEGER_CONFIG = DEPLOY / "jaeger" / "config.yaml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
LB_EXPORTER_TYPES = ("load_balancing", "loadbalancing")  # the second: its deprecated name
# A validate run may first have to build its binary (tests.e2e.binaries caches it).
BINARY_TIMEOUT = BUILD_TIMEOUT_SECONDS + 120

# Ports that Prometheus and Grafana listen on when their configuration does not say.
PROMETHEUS_DEFAULT_PORT = 9090
GRAFANA_DEFAULT_PORT = 3000
# Series Prometheus adds to every scrape target, and the labels it attaches to them.
PROMETHEUS_TARGET_SERIES = {"up"}
PROMETHEUS_TARGET_LABELS = {"instance", "job"}
# Values a dashboard may select for the collector's bounded labels.
PROMETHEUS_LABEL_VALUES = {
    "kind": set(semconv.FAULT_KINDS),
    "status": set(semconv.DRIFT_STATUSES),
    "method": {*semconv.DRIFT_METHODS, UNKNOWN_METHOD},
}
# Grafana's range variables, replaced by a duration before a query is parsed.
GRAFANA_RANGE_VARIABLES = re.compile(r"\$(?:__rate_interval|__interval|__range)\b")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _host_port(text: str) -> tuple[str, int]:
    """``host:port`` or a URL with a port, as (host, port)."""
    parsed = urlparse(text if "://" in text else f"//{text}")
    if parsed.hostname is None or parsed.port is None:
        raise AssertionError(f"{text!r} names no host and port")
    return parsed.hostname, parsed.port


# --- every YAML file ------------------------------------------------------------------------


def test_deploy_folder_has_yaml_files() -> None:
    assert len(YAML_FILES) >= 10, YAML_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert any(doc is not None for doc in documents), f"{path} holds no YAML document"


# --- OpenTelemetry Collector and Jaeger v2: their own validate command ----------------------


def _k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return docs


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in {K8S}, found {len(found)}"
    return found[0]


def _k8s_otelcol_config() -> str:
    return str(_k8s("ConfigMap", "otelcol")["data"]["config.yaml"])


def _binary(build: Any) -> Path:
    try:
        return Path(build())
    except NoGoToolchain as exc:
        pytest.skip(str(exc))


def _validate(binary: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), "validate", f"--config={config}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def otelcol() -> Path:
    return _binary(otelcol_binary)


@pytest.fixture(scope="module")
def jaeger_v2() -> Path:
    return _binary(jaeger_binary)


@pytest.fixture
def k8s_otelcol_file(tmp_path: Path) -> Path:
    path = tmp_path / "otelcol-configmap.yaml"
    path.write_text(_k8s_otelcol_config(), encoding="utf-8")
    return path


@pytest.mark.timeout(BINARY_TIMEOUT)
def test_compose_otelcol_config_passes_validate(otelcol: Path) -> None:
    result = _validate(otelcol, OTELCOL_CONFIG)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(BINARY_TIMEOUT)
def test_k8s_otelcol_config_passes_validate(otelcol: Path, k8s_otelcol_file: Path) -> None:
    result = _validate(otelcol, k8s_otelcol_file)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(BINARY_TIMEOUT)
def test_otelcol_validate_refuses_a_broken_config(otelcol: Path, tmp_path: Path) -> None:
    # The same file with a key the load_balancing exporter does not have: validate must
    # fail, or passing it above would mean nothing.
    config = _yaml(OTELCOL_CONFIG)
    config["exporters"][_lb_exporter_id(config)]["routing_keys"] = "traceID"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = _validate(otelcol, broken)
    assert result.returncode != 0
    assert "routing_keys" in result.stderr


@pytest.mark.timeout(BINARY_TIMEOUT)
def test_jaeger_config_passes_jaeger_validate(jaeger_v2: Path) -> None:
    result = _validate(jaeger_v2, JAEGER_CONFIG)
    assert result.returncode == 0, result.stderr


def test_jaeger_config_names_existing_storage() -> None:
    # validate does not check that the storage names refer to a declared backend.
    config = _yaml(JAEGER_CONFIG)
    backends = set(config["extensions"]["jaeger_storage"]["backends"])
    assert config["extensions"]["jaeger_query"]["storage"]["traces"] in backends
    for exporter in config["exporters"].values():
        assert exporter["trace_storage"] in backends


# --- the otel-dl collector configurations ---------------------------------------------------


def _compose() -> dict[str, Any]:
    return dict(_yaml(COMPOSE))


def _services() -> dict[str, dict[str, Any]]:
    return dict(_compose()["services"])


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (relative to compose)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _is_otel_dl_collector(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("otel-dl-collector:")


def _otel_dl_collectors() -> dict[str, dict[str, Any]]:
    found = {n: s for n, s in _services().items() if _is_otel_dl_collector(s)}
    assert found, "docker-compose.yaml runs no otel-dl collector"
    return found


def _collector_config(service: dict[str, Any]) -> CollectorConfig:
    """What an otel-dl collector service of the compose file runs with."""
    config_path = _option([str(a) for a in service.get("command", [])], "--config")
    assert config_path, "the otel-dl collector service passes no --config"
    host_file = _bind_mounts(service).get(config_path)
    assert host_file is not None, f"{config_path} is not mounted from examples/deploy"
    return load_config(host_file, env=_environment(service))


def _k8s_collector_config(tmp_path: Path) -> CollectorConfig:
    path = tmp_path / "collector.yaml"
    path.write_text(_k8s("ConfigMap", "otel-dl-collector")["data"]["collector.yaml"])
    return load_config(path, env={})


def test_compose_collectors_are_two_or_more_and_forward() -> None:
    collectors = _otel_dl_collectors()
    assert len(collectors) >= 2
    for name, service in collectors.items():
        config = _collector_config(service)
        assert config.host == "0.0.0.0", f"{name} listens only inside its container"
        assert config.export_endpoint, f"{name} forwards its enriched traces nowhere"


def test_compose_collectors_keep_their_data_in_their_own_volume() -> None:
    volumes = []
    for name, service in _otel_dl_collectors().items():
        config = _collector_config(service)
        named = {
            target: source
            for source, target in (str(v).split(":")[:2] for v in service.get("volumes", []))
            if not source.startswith((".", "/"))
        }
        data = [t for t in named if Path(config.queue_dir).is_relative_to(t)]
        assert data, f"{name}: queue_dir {config.queue_dir} is on no named volume"
        assert config.store and Path(config.store).is_relative_to(data[0])
        volumes.append(named[data[0]])
    assert len(set(volumes)) == len(volumes), "two collectors share one data volume"


# --- docker-compose.yaml --------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    schema = ["--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *schema, str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_references_name_existing_services() -> None:
    services = _services()
    for name, service in services.items():
        depends = service.get("depends_on", [])
        for other in depends if isinstance(depends, list) else list(depends):
            assert other in services, f"{name} depends on unknown service {other!r}"
        mode = str(service.get("network_mode", ""))
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in services, f"{name}: network_mode {mode}"


def test_compose_named_volumes_are_declared_and_mounted_files_exist() -> None:
    declared = set(_compose().get("volumes") or {})
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts undeclared volume {source!r}"


def test_compose_builds_from_existing_files() -> None:
    for name, service in _services().items():
        build = service.get("build")
        if build is None:
            continue
        context = (COMPOSE.parent / build["context"]).resolve()
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for arg in (build.get("args") or {}).values():
            # Build arguments are pinned requirements or plain words, never floating.
            for requirement in str(arg).split():
                assert "latest" not in requirement, f"{name}: {requirement}"


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_images_are_pinned() -> None:
    for name, service in _services().items():
        image = str(service.get("image", ""))
        assert _pinned(image), f"{name}: image {image!r} is not pinned to a tag"
    for doc in _k8s_documents():
        for container in _pod_spec(doc).get("containers", []):
            assert _pinned(container["image"]), container["image"]
    assert _pinned(DockerfileParser(str(DOCKERFILE)).baseimage or "")


def test_compose_host_ports_are_published_once() -> None:
    published: dict[str, str] = {}
    for name, service in _services().items():
        for port in service.get("ports", []):
            host = str(port).split(":")[0] if ":" in str(port) else str(port)
            assert host not in published, f"{name} and {published[host]} both publish {host}"
            published[host] = name


def _otel_ports(config: dict[str, Any]) -> set[int]:
    """Ports an OpenTelemetry Collector (or Jaeger v2) configuration listens on."""
    ports = set()

    def collect(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                collect(v, k)
        elif key == "endpoint" and isinstance(node, str) and ":" in node:
            ports.add(int(node.rsplit(":", 1)[1]))

    collect(config.get("receivers", {}))
    collect(config.get("extensions", {}))
    for reader in config["service"].get("telemetry", {}).get("metrics", {}).get("readers", []):
        ports.add(int(reader["pull"]["exporter"]["prometheus"]["port"]))
    return ports


def _tempo_ports(config: dict[str, Any]) -> set[int]:
    ports = {int(config["server"]["http_listen_port"])}
    for receiver in config["distributor"]["receivers"].values():
        for protocol in receiver["protocols"].values():
            ports.add(_host_port(protocol["endpoint"])[1])
    return ports


def _mounted_config(service: dict[str, Any], argv_option: str) -> dict[str, Any]:
    argv = [str(a) for a in service.get("command", [])]
    path = _option(argv, argv_option)
    assert path, f"no {argv_option} in {argv}"
    return dict(_yaml(_bind_mounts(service)[path]))


def _listening(service: dict[str, Any]) -> set[int]:
    """The ports a compose service listens on, read from the configuration it mounts."""
    image = str(service.get("image", ""))
    if _is_otel_dl_collector(service):
        config = _collector_config(service)
        return {config.grpc_port, config.http_port, config.api_port}
    if image.startswith(("otel/opentelemetry-collector", "jaegertracing/jaeger:")):
        return _otel_ports(_mounted_config(service, "--config"))
    if image.startswith("grafana/tempo:"):
        return _tempo_ports(_mounted_config(service, "-config.file"))
    if image.startswith("prom/prometheus:"):
        return {PROMETHEUS_DEFAULT_PORT}
    if image.startswith("grafana/grafana:"):
        return {GRAFANA_DEFAULT_PORT}
    return set()


def _mounted(service_name: str, suffix: str) -> Path:
    mounts = _bind_mounts(_services()[service_name])
    found = [host for target, host in mounts.items() if target.endswith(suffix)]
    assert found, f"{service_name} mounts nothing ending in {suffix}"
    return found[0]


def _service_named(image_prefix: str) -> str:
    """The service that runs the image's own program (not, say, a chown of its volume)."""
    names = [
        n
        for n, s in _services().items()
        if str(s.get("image", "")).startswith(image_prefix) and "entrypoint" not in s
    ]
    assert len(names) == 1, f"expected one service running {image_prefix}*, found {names}"
    return names[0]


def _lb_exporter_id(config: dict[str, Any]) -> str:
    found = [k for k in config["exporters"] if k.split("/")[0] in LB_EXPORTER_TYPES]
    assert len(found) == 1, f"expected one load_balancing exporter, found {found}"
    return found[0]


def _endpoint_references() -> Iterator[tuple[str, str, int]]:
    """(where, host, port) for every host:port the compose stack's configs point at."""
    services = _services()
    otelcol = _yaml(OTELCOL_CONFIG)
    for exporter_id, exporter in otelcol["exporters"].items():
        if exporter_id == _lb_exporter_id(otelcol):
            for hostname in exporter["resolver"]["static"]["hostnames"]:
                yield (f"otelcol {exporter_id}", *_host_port(hostname))
        elif "endpoint" in exporter:
            yield (f"otelcol {exporter_id}", *_host_port(exporter["endpoint"]))
    prometheus = _yaml(_mounted(_service_named("prom/prometheus:"), "prometheus.yaml"))
    for job in prometheus["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                yield (f"prometheus job {job['job_name']}", *_host_port(target))
    tempo = _yaml(_mounted(_service_named("grafana/tempo:"), "tempo.yaml"))
    for remote in tempo["metrics_generator"]["storage"].get("remote_write", []):
        yield ("tempo remote_write", *_host_port(remote["url"]))
    for datasource in _yaml(DATASOURCES)["datasources"]:
        yield (f"grafana datasource {datasource['uid']}", *_host_port(datasource["url"]))
    for name, service in services.items():
        env = _environment(service)
        for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_DL_COLLECTOR_EXPORT_ENDPOINT"):
            if key in env:
                yield (f"{name} {key}", *_host_port(env[key]))


def test_compose_hostnames_in_configs_are_services_listening_on_that_port() -> None:
    services = _services()
    references = list(_endpoint_references())
    assert len(references) >= 10
    for where, host, port in references:
        assert host in services, f"{where} points at {host!r}, which is no compose service"
        listening = _listening(services[host])
        assert port in listening, f"{where} sends to {host}:{port}; {host} listens on {listening}"


def test_static_resolver_lists_every_collector_on_its_otlp_grpc_port() -> None:
    otelcol = _yaml(OTELCOL_CONFIG)
    exporter = otelcol["exporters"][_lb_exporter_id(otelcol)]
    assert exporter["routing_key"] == "traceID"
    backends = [_host_port(h) for h in exporter["resolver"]["static"]["hostnames"]]
    collectors = _otel_dl_collectors()
    assert sorted(host for host, _ in backends) == sorted(collectors)
    for host, port in backends:
        assert port == _collector_config(collectors[host]).grpc_port


def test_collectors_forward_to_an_otelcol_pipeline_that_reaches_tempo_and_jaeger() -> None:
    otelcol = _yaml(OTELCOL_CONFIG)
    tempo, jaeger = _service_named("grafana/tempo:"), _service_named("jaegertracing/jaeger:")
    for service in _otel_dl_collectors().values():
        target = _collector_config(service).export_endpoint
        assert target is not None
        host, port = _host_port(target)
        assert host == _service_named("otel/opentelemetry-collector")
        # The receiver on that port, and the pipeline it feeds.
        receiver = [
            rid
            for rid, r in otelcol["receivers"].items()
            if any(_host_port(p["endpoint"])[1] == port for p in r["protocols"].values())
        ]
        assert len(receiver) == 1
        pipelines = [
            p for p in otelcol["service"]["pipelines"].values() if receiver[0] in p["receivers"]
        ]
        assert len(pipelines) == 1
        reached = {
            _host_port(otelcol["exporters"][e]["endpoint"])[0]
            for e in pipelines[0]["exporters"]
            if "endpoint" in otelcol["exporters"][e]
        }
        assert reached == {tempo, jaeger}
        # Enriched traces must not loop back into the load balancer.
        assert _lb_exporter_id(otelcol) not in pipelines[0]["exporters"]


def test_prometheus_scrapes_every_collector_api_port() -> None:
    prometheus = _yaml(_mounted(_service_named("prom/prometheus:"), "prometheus.yaml"))
    targets = {
        _host_port(t)
        for job in prometheus["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]
        for t in static["targets"]
    }
    for name, service in _otel_dl_collectors().items():
        assert (name, _collector_config(service).api_port) in targets


# --- Grafana: provisioning and the dashboard ------------------------------------------------


def _datasources() -> dict[str, str]:
    return {d["uid"]: d["type"] for d in _yaml(DATASOURCES)["datasources"]}


def _dashboards() -> list[Path]:
    found = sorted(DASHBOARDS.glob("*.json"))
    assert found, f"no dashboard in {DASHBOARDS}"
    return found


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _targets(datasource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
    datasources = _datasources()
    for path in _dashboards():
        for panel in _panels(json.loads(path.read_text(encoding="utf-8"))):
            for target in panel.get("targets", []):
                uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
                if datasources.get(str(uid)) == datasource_type:
                    yield f"{path.name}: {panel['title']} {target['refId']}", target


def test_dashboard_provider_loads_the_mounted_dashboards() -> None:
    provider = _yaml(DASHBOARD_PROVIDERS)["providers"][0]
    grafana = _service_named("grafana/grafana:")
    mounts = _bind_mounts(_services()[grafana])
    assert mounts.get(provider["options"]["path"]) == DASHBOARDS.resolve()
    assert mounts.get("/etc/grafana/provisioning") == DATASOURCES.parents[1].resolve()


def test_dashboard_panels_use_provisioned_datasources() -> None:
    datasources = _datasources()
    for path in _dashboards():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["uid"] and dashboard["title"]
        ids = [p["id"] for p in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in _panels(dashboard):
            if panel["type"] == "row":
                continue
            refs = [panel.get("datasource")] + [t.get("datasource") for t in panel["targets"]]
            for ref in filter(None, refs):
                assert ref["uid"] in datasources, f"{panel['title']}: unknown uid {ref['uid']}"
                assert ref["type"] == datasources[ref["uid"]], panel["title"]
            assert panel["targets"], f"{panel['title']} queries nothing"


def _exported_metrics() -> tuple[set[str], dict[str, set[str]]]:
    """Series names the collector's /metrics serves, and the labels of each."""
    metrics = CollectorMetrics()
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    labels: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            # prometheus_client keeps a metric's label names only on the metric itself.
            label_names = set(metric._labelnames)
        elif isinstance(metric, BatchHistogram):
            label_names = set(metric.labelnames)
        else:
            continue
        for family in metric.describe():
            for suffix in suffixes[family.type]:
                if suffix == "_created" and isinstance(metric, BatchHistogram):
                    continue  # served by prometheus_client's own metrics only
                labels[family.name + suffix] = set(label_names)
            if family.type == "histogram":
                labels[family.name + "_bucket"].add("le")
    assert labels, "CollectorMetrics holds no metric"
    # Unlabelled series are in the exposition right away: the suffix rules above hold.
    rendered = set(re.findall(r"^(\w+)", metrics.render().decode(), re.MULTILINE))
    for name, names in labels.items():
        if not names - {"le"}:
            assert name in rendered, f"{name} is not served on /metrics"
    return set(labels), labels


def _promql(expr: str) -> Any:
    return promql_parser.parse(GRAFANA_RANGE_VARIABLES.sub("5m", expr))


def test_dashboard_promql_uses_only_exported_metrics_and_labels() -> None:
    exported, labels = _exported_metrics()
    targets = list(_targets("prometheus"))
    assert targets, "the dashboard has no Prometheus panel"
    used: set[str] = set()
    per_service: set[str] = set()
    for where, target in targets:
        selectors, groupings = promql_parts(_promql(target["expr"]))
        allowed = set(PROMETHEUS_TARGET_LABELS)
        for selector in selectors:
            assert selector.name in exported | PROMETHEUS_TARGET_SERIES, (
                f"{where}: {selector.name} is not a metric of collector/metrics.py"
            )
            used.add(selector.name)
            allowed |= labels.get(selector.name, set())
            for matcher in selector.matchers.matchers:
                assert matcher.name in allowed, f"{where}: label {matcher.name}"
                if matcher.op == promql_parser.MatchOp.Equal:
                    values = PROMETHEUS_LABEL_VALUES.get(matcher.name)
                    assert values is None or matcher.value in values, f"{where}: {matcher}"
        assert groupings <= allowed, f"{where}: unknown labels {groupings - allowed}"
        if "service_name" in groupings:
            per_service.update(s.name for s in selectors)
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
            assert label in groupings, f"{where}: legend label {label} is aggregated away"
    # The dashboard shows the collectors' spans, backlog and attribution time, and per
    # service their fault counts, drift alerts, drift scores and confidence.
    for wanted in (
        "otel_dl_collector_spans_received_total",
        "otel_dl_collector_spans_queued",
        "otel_dl_collector_attribution_seconds_bucket",
    ):
        assert wanted in used
    assert per_service >= {
        "otel_dl_collector_faults_total",
        "otel_dl_collector_drift_status_total",
        "otel_dl_collector_drift_score_bucket",
        "otel_dl_collector_confidence_mean_bucket",
    }


# TraceQL: attribute references, comparisons and pipeline functions.
_TRACEQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_TRACEQL_ATTRIBUTE = re.compile(
    r"(?<![\w.])(span|resource|event|link|instrumentation)?\.([A-Za-z_][\w.]*[\w])"
)
_TRACEQL_COMPARISON = re.compile(
    r"(?<![\w.])(span|resource)?\.([A-Za-z_][\w.]*[\w])\s*(=~|!~|!=|>=|<=|=|>|<)\s*"
    r'("(?:[^"\\]|\\.)*"|true|false|-?\d+(?:\.\d+)?|nil)'
)
_TRACEQL_FUNCTION = re.compile(r"\|\s*([a-z_]+)\s*\(")
TRACEQL_METRICS_FUNCTIONS = {
    "rate",
    "count_over_time",
    "sum_over_time",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "quantile_over_time",
    "histogram_over_time",
}
TRACEQL_NUMERIC_FUNCTIONS = {
    "sum_over_time",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "quantile_over_time",
    "histogram_over_time",
}
RESOURCE_ATTRIBUTES = {SERVICE_NAME}
ALLOWED_VALUES = {
    semconv.DL_DRIFT_STATUS: {
        getattr(semconv, n) for n in dir(semconv) if n.startswith("DRIFT_STATUS_")
    },
    semconv.DL_FAULT_KIND: {
        getattr(semconv, n) for n in dir(semconv) if n.startswith("FAULT_KIND_")
    },
}


def _check_traceql(query: str) -> None:
    """Fail unless ``query`` is well formed and names only otel-dl attributes, rightly typed."""
    depth = 0
    for char in _TRACEQL_STRING.sub('""', query):
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth in (0, 1), f"unbalanced or nested braces in {query!r}"
    assert depth == 0 and "{" in query, f"no span selector in {query!r}"
    bare = _TRACEQL_STRING.sub('""', query)
    attributes = _TRACEQL_ATTRIBUTE.findall(bare)
    assert attributes, f"{query!r} names no attribute"
    for scope, name in attributes:
        if scope == "resource":
            assert name in RESOURCE_ATTRIBUTES, f"{query!r}: resource.{name}"
        else:
            assert scope in ("", "span"), f"{query!r}: {scope}.{name}"
            assert name in semconv.ATTRIBUTES, f"{query!r}: {name} is not in otel_dl.semconv"
    for scope, name, op, value in _TRACEQL_COMPARISON.findall(query):
        if scope == "resource" or value == "nil":
            continue
        kind = semconv.ATTRIBUTES[name].type
        if value.startswith('"'):
            assert kind == "string", f"{query!r}: {name} is {kind}, compared to a string"
            if op == "=" and name in ALLOWED_VALUES:
                assert json.loads(value) in ALLOWED_VALUES[name], f"{query!r}: {value}"
        elif value in ("true", "false"):
            assert kind == "boolean", f"{query!r}: {name} is {kind}, compared to a boolean"
            assert op in ("=", "!="), f"{query!r}: {op} on a boolean"
        else:
            assert kind in ("int", "double"), f"{query!r}: {name} is {kind}, not a number"
    for function in _TRACEQL_FUNCTION.findall(query):
        assert function in TRACEQL_METRICS_FUNCTIONS, f"{query!r}: unknown {function}()"
        if function in TRACEQL_NUMERIC_FUNCTIONS:
            argument = re.search(rf"{function}\s*\(\s*(?:span)?\.([\w.]+)", query)
            assert argument, f"{query!r}: {function}() takes an attribute first"
            assert semconv.ATTRIBUTES[argument.group(1)].type in ("int", "double"), query


@pytest.mark.parametrize(
    "query",
    [
        '{ span.dl.fault.root_cause = "true" }',  # a boolean compared to a string
        "{ span.dl.drift.state = 1 }",  # no such attribute
        '{ span.dl.drift.status = "alarm" }',  # no such status
        '{ span.dl.fault.kind = "stale" }',  # no such fault kind
        "{ span.dl.drift.score > 0 } | quantile_over_time(span.dl.drift.status, 0.9)",
        "{ span.dl.drift.score > 0 | rate()",
        "{ resource.k8s.pod.name = 1 }",
    ],
)
def test_traceql_check_refuses_wrong_queries(query: str) -> None:
    with pytest.raises(AssertionError):
        _check_traceql(query)


def test_dashboard_traceql_uses_otel_dl_attributes() -> None:
    targets = list(_targets("tempo"))
    queries = [target["query"] for _, target in targets]
    for where, target in targets:
        assert target.get("queryType") == "traceql", where
        _check_traceql(target["query"])
    assert "{ span.dl.fault.root_cause = true }" in queries
    assert '{ span.dl.drift.status = "alert" }' in queries


def test_deploy_doc_traceql_uses_otel_dl_attributes() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    queries = re.findall(r"```traceql\n(.*?)\n```", doc, re.DOTALL)
    assert len(queries) >= 3
    for query in queries:
        _check_traceql(query)


RUNBOOK_PAGES = sorted(p for p in (ROOT / "docs" / "runbooks").glob("*.md") if p.stem != "README")


@pytest.mark.parametrize("page", RUNBOOK_PAGES, ids=lambda p: p.name)
def test_runbook_traceql_uses_otel_dl_attributes(page: Path) -> None:
    queries = re.findall(r"```traceql\n(.*?)\n```", page.read_text(encoding="utf-8"), re.DOTALL)
    assert queries, f"{page.name} has no TraceQL query"
    for query in queries:
        _check_traceql(query)


def test_tempo_serves_traceql_metrics_over_internal_spans() -> None:
    tempo = _yaml(_mounted(_service_named("grafana/tempo:"), "tempo.yaml"))
    assert "local-blocks" in tempo["overrides"]["defaults"]["metrics_generator"]["processors"]
    # otel-dl's spans are internal: filtering to server spans would drop them all.
    assert tempo["metrics_generator"]["processor"]["local_blocks"]["filter_server_spans"] is False


# --- Dockerfile and .dockerignore -----------------------------------------------------------


def _dockerfile() -> list[dict[str, Any]]:
    return list(DockerfileParser(str(DOCKERFILE)).structure)


def _instructions(name: str) -> list[str]:
    return [str(i["value"]) for i in _dockerfile() if i["instruction"] == name]


def _copies() -> list[tuple[list[str], str]]:
    copies = []
    for value in _instructions("COPY") + _instructions("ADD"):
        words = [w for w in value.split() if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line, in order; the last match decides."""
    patterns = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        text = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(text):
            if text.startswith("**", i):
                regex += ".*"
                i += 2
            elif text[i] == "*":
                regex += "[^/]*"
                i += 1
            elif text[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(text[i])
                i += 1
        patterns.append((not negated, re.compile(regex)))
    return patterns


def _ignored(relative: str) -> bool:
    """Docker's rule: a pattern matching a path or any of its parents applies to it."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exclude, regex in _ignore_patterns():
        if any(regex.fullmatch(c) for c in candidates):
            ignored = exclude
    return ignored


def test_dockerfile_base_image_and_user() -> None:
    parser = DockerfileParser(str(DOCKERFILE))
    assert (parser.baseimage or "").startswith("python:3.11"), parser.baseimage
    users = _instructions("USER")
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def _tracked(source: str) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", source], cwd=ROOT, capture_output=True, timeout=60
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, cannot list the files of {source}")
    return [f for f in listed.stdout.decode().split("\0") if f]


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored() -> None:
    copies = _copies()
    assert copies
    for sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
            # Every file of the project under it reaches the builder.
            tracked = _tracked(source)
            assert tracked, f"COPY {source}: no file of the repository"
            left_out = [f for f in tracked if _ignored(f)]
            assert not left_out, f"COPY {source}: .dockerignore leaves out {left_out}"


def test_dockerignore_keeps_the_build_context_small() -> None:
    for heavy in (".git/HEAD", ".venv/bin/python", "tests/test_deploy.py", "docs/img/report.png"):
        assert _ignored(heavy), f".dockerignore sends {heavy} to the builder"
    for needed in ("pyproject.toml", "collector/pipeline.py", "examples/pipeline/run.py"):
        assert not _ignored(needed), needed
    assert _ignored("collector/__pycache__/pipeline.cpython-311.pyc")


def test_dockerfile_entrypoint_is_a_console_script_of_the_project() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = json.loads(_instructions("ENTRYPOINT")[-1])
    assert entrypoint[0] in scripts, f"{entrypoint[0]} is not in [project.scripts]"
    assert scripts[entrypoint[0]] == "otel_dl.collector.__main__:main"


def test_dockerfile_installs_the_collector_extra_from_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    args = dict(a.split("=", 1) for a in _instructions("ARG") if "=" in a)
    for extra in args["EXTRAS"].split(","):
        assert extra in extras, f"EXTRAS names {extra!r}, which pyproject.toml lacks"
    for name, service in _services().items():
        build_args = (service.get("build") or {}).get("args") or {}
        for extra in str(build_args.get("EXTRAS", "collector")).split(","):
            assert extra in extras, f"{name}: EXTRAS names {extra!r}"
    assert any("${EXTRAS}" in run for run in _instructions("RUN"))


def test_dockerfile_default_config_exposes_ports_and_data_volume() -> None:
    cmd = json.loads(_instructions("CMD")[-1])
    config_path = _option(cmd, "--config")
    assert config_path, "CMD passes no --config"
    copied = [src for sources, dest in _copies() for src in sources if dest == config_path]
    assert len(copied) == 1, f"{config_path} is not copied into the image"
    config = load_config(ROOT / copied[0], env={})
    assert config.host == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for e in _instructions("EXPOSE") for p in e.split()}
    assert {config.grpc_port, config.http_port, config.api_port} <= exposed
    volumes = [v for e in _instructions("VOLUME") for v in json.loads(e)]
    assert config.store is not None
    for path in (config.queue_dir, config.store):
        assert any(Path(path).is_relative_to(v) for v in volumes), f"{path} is on no volume"


# --- Kubernetes ---------------------------------------------------------------------------


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        return dict(doc["spec"]["template"]["spec"])
    return {}


KUBERNETES_VERSIONS = sorted(set(kubernetes_validate.utils.all_versions()))


@pytest.mark.parametrize("version", [KUBERNETES_VERSIONS[0], KUBERNETES_VERSIONS[-1]])
def test_k8s_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = _k8s_documents()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "Role"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_everything_in_one_namespace() -> None:
    namespaces = [d for d in _k8s_documents() if d["kind"] == "Namespace"]
    assert len(namespaces) == 1
    name = namespaces[0]["metadata"]["name"]
    for doc in _k8s_documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == name, doc["metadata"]["name"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_workloads_select_their_own_pods_and_mount_what_exists() -> None:
    docs = _k8s_documents()
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert _matches(doc["spec"]["selector"]["matchLabels"], labels), doc["metadata"]["name"]
        spec = _pod_spec(doc)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']} mounts {mount['name']}"
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts


def _port_names(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}


def test_k8s_headless_service_selects_the_collector_pods_on_its_ports(tmp_path: Path) -> None:
    deployment = _k8s("Deployment", "otel-dl-collector")
    service = _k8s("Service", "otel-dl-collector")
    assert service["spec"]["clusterIP"] == "None", "the collectors' Service must be headless"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(service["spec"]["selector"], pod_labels)
    for other in _k8s_documents():
        if other["kind"] == "Deployment" and other["metadata"]["name"] != "otel-dl-collector":
            other_labels = other["spec"]["template"]["metadata"]["labels"]
            assert not _matches(service["spec"]["selector"], other_labels)
    (container,) = _pod_spec(deployment)["containers"]
    ports = _port_names(container)
    config = _k8s_collector_config(tmp_path)
    assert config.host == "0.0.0.0"
    assert sorted(ports.values()) == sorted([config.grpc_port, config.http_port, config.api_port])
    assert ports["otlp-grpc"] == config.grpc_port
    assert ports["otlp-http"] == config.http_port
    assert ports["api"] == config.api_port
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert (ports[target] if isinstance(target, str) else target) == port["port"]


def test_k8s_collector_runs_its_configmap_and_keeps_data_on_a_volume(tmp_path: Path) -> None:
    deployment = _k8s("Deployment", "otel-dl-collector")
    spec = _pod_spec(deployment)
    (container,) = spec["containers"]
    config_path = _option(container["args"], "--config")
    assert config_path is not None
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_dir = str(Path(config_path).parent)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == "otel-dl-collector"
    assert Path(config_path).name in _k8s("ConfigMap", "otel-dl-collector")["data"]
    config = _k8s_collector_config(tmp_path)
    assert config.export_endpoint, "the collectors forward their enriched traces nowhere"
    assert config.store is not None
    for path in (config.queue_dir, config.store):
        data = [m for m in mounts if Path(path).is_relative_to(m)]
        assert data, f"{path} is on no volume"
        volume = volumes[mounts[data[0]]]
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    # The image's user can write there: the pod runs as the image's uid, fsGroup too.
    uid = int(_instructions("USER")[-1].split(":")[0])
    assert spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["fsGroup"] == uid


def test_k8s_load_balancer_resolves_the_headless_service() -> None:
    config = yaml.safe_load(_k8s_otelcol_config())
    exporter = config["exporters"][_lb_exporter_id(config)]
    assert exporter["routing_key"] == "traceID"
    service = _k8s("Service", "otel-dl-collector")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    grpc = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "otlp-grpc")
    resolver = exporter["resolver"]
    assert len(resolver) == 1, "the exporter takes exactly one resolver"
    if "k8s" in resolver:
        assert resolver["k8s"]["service"] in (name, f"{name}.{namespace}")
        assert resolver["k8s"].get("ports", [4317]) == [grpc]
    else:
        host = resolver["dns"]["hostname"]
        assert host.split(".")[:2] == [name, namespace] or host == name
        assert int(resolver["dns"].get("port", 4317)) == grpc
    pipelines = config["service"]["pipelines"].values()
    assert any(_lb_exporter_id(config) in p["exporters"] for p in pipelines)


def test_k8s_otelcol_may_watch_the_endpointslices_it_resolves() -> None:
    config = yaml.safe_load(_k8s_otelcol_config())
    if "k8s" not in config["exporters"][_lb_exporter_id(config)]["resolver"]:
        pytest.skip("the DNS resolver needs no Kubernetes API access")
    deployment = _k8s("Deployment", "otelcol")
    account = _pod_spec(deployment)["serviceAccountName"]
    namespace = deployment["metadata"]["namespace"]
    bindings = [
        d
        for d in _k8s_documents()
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(
            s["kind"] == "ServiceAccount" and s["name"] == account and s["namespace"] == namespace
            for s in d["subjects"]
        )
    ]
    assert bindings, f"no binding for ServiceAccount {account}"
    granted = set()
    for binding in bindings:
        role = _k8s(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for rule in role["rules"]:
            if "discovery.k8s.io" in rule["apiGroups"] and "endpointslices" in rule["resources"]:
                granted |= set(rule["verbs"])
    assert granted >= {"get", "list", "watch"}


def test_k8s_otelcol_service_and_container_ports_agree() -> None:
    config = yaml.safe_load(_k8s_otelcol_config())
    listening = _otel_ports(config)
    deployment = _k8s("Deployment", "otelcol")
    (container,) = _pod_spec(deployment)["containers"]
    ports = _port_names(container)
    assert set(ports.values()) == listening
    config_path = _option(container["args"], "--config")
    assert config_path is not None
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
    assert volumes[mounts[str(Path(config_path).parent)]]["configMap"]["name"] == "otelcol"
    service = _k8s("Service", "otelcol")
    assert _matches(
        service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]
    )
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]] == port["port"]
