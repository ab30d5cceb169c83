"""deploy/compose, the laptop full stack, as Compose reads it and as far as it starts here.

Rendered by ``docker-compose config`` (v1.29) with the default variables and with a test .env, and by
``docker compose config`` where the v2 plugin is installed (it is not, and cannot be, on this kind of
machine: that part skips, saying so, under CI too). The compose copies of the Prometheus, Alertmanager and
Grafana configs are checked against deploy/monitoring, so they cannot drift apart. The PostgreSQL init script
runs on a real server, and the passwordless database URLs connect through PGPASSWORD as the stack's do.

Then what can start without a public registry starts: mlflow (SQLite on its volume instead of PostgreSQL),
serve, monitor and loop (SQLite prediction store on the shared home volume) from our images, Prometheus and
Alertmanager from small images of the host's Debian binaries; postgres, grafana and train do not (no image,
and no training here to stay fast). Missing docker-compose, promtool, amtool or PostgreSQL: skip, or fail
under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localhost import free_port  # tests/localhost.py (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE / ".env.example"
MONITORING = ROOT / "deploy" / "monitoring"
HOME = "/var/lib/visionloop"

ALL_SERVICES = {"postgres", "mlflow", "train", "serve", "monitor", "loop", "prometheus", "alertmanager", "grafana"}
OURS = {"mlflow", "train", "serve", "monitor", "loop"}  # our images: non-root, read-only root, tmpfs /tmp
# service -> (variable of its host port, its default, the container port)
PUBLISHED = {
    "mlflow": ("MLFLOW_PORT", 5000, 5000),
    "serve": ("SERVE_PORT", 8000, 8000),
    "monitor": ("MONITOR_PORT", 8001, 8001),
    "loop": ("LOOP_PORT", 8002, 8002),
    "prometheus": ("PROMETHEUS_PORT", 9090, 9090),
    "alertmanager": ("ALERTMANAGER_PORT", 9093, 9093),
    "grafana": ("GRAFANA_PORT", 3000, 3000),
}
# service -> (what it waits for, with which condition)
DEPENDS = {
    "mlflow": {"postgres": "service_healthy"},
    "train": {"mlflow": "service_healthy"},
    "serve": {"postgres": "service_healthy", "mlflow": "service_healthy"},
    "monitor": {"postgres": "service_healthy", "mlflow": "service_healthy"},
    "loop": {"postgres": "service_healthy", "mlflow": "service_healthy", "serve": "service_started"},
    "grafana": {"prometheus": "service_started"},
}
HEALTH_URLS = {
    "mlflow": "http://127.0.0.1:5000/health",
    "serve": "http://127.0.0.1:8000/healthz",
    "monitor": "http://127.0.0.1:8001/healthz",
    "loop": "http://127.0.0.1:8002/healthz",
}
# the compose copies' targets, and what deploy/monitoring has in their place
COMPOSE_TARGETS = {
    "serve:8000": "127.0.0.1:8000",
    "monitor:8001": "127.0.0.1:8001",
    "loop:8002": "127.0.0.1:8002",
    "alertmanager:9093": "127.0.0.1:9093",
}
TEST_ENV = {
    "POSTGRES_PASSWORD": "pg-secret-from-env",
    "SERVE_ADMIN_TOKEN": "admin-secret-from-env",
    "SERVE_FEEDBACK_TOKEN": "feedback-secret-from-env",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret-from-env",
    "VISIONLOOP_SERVE_IMAGE": "registry.test/visionloop-serve:9.9.9",
    "VISIONLOOP_TRAIN_IMAGE": "registry.test/visionloop-train:9.9.9",
    "PROMETHEUS_IMAGE": "registry.test/prometheus:1",
    "MLFLOW_PORT": "15000",
    "SERVE_PORT": "18000",
    "MONITOR_PORT": "18001",
    "LOOP_PORT": "18002",
    "PROMETHEUS_PORT": "19090",
    "ALERTMANAGER_PORT": "19093",
    "GRAFANA_PORT": "13000",
    "PREDICTION_STORE_URL": "postgresql+psycopg://visionloop@db.example:5432/predictions",
}
SECRETS = ("POSTGRES_PASSWORD", "SERVE_ADMIN_TOKEN", "SERVE_FEEDBACK_TOKEN", "GRAFANA_ADMIN_PASSWORD")
V2_MISSING = (
    "the Compose v2 plugin (`docker compose`) is not installed, and cannot be on this machine (no public "
    "registry here, and Debian 12 packages compose v1 only): rendered with docker-compose v1.29 only"
)


def missing(message: str) -> None:
    """A tool this module needs is not installed: a failure under CI (it installs them), else a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def compose_variables() -> dict[str, str]:
    """Every ${VAR:-default} of docker-compose.yml, with its default."""
    found = re.findall(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}", COMPOSE_FILE.read_text())
    variables: dict[str, str] = {}
    for name, default in found:
        assert variables.setdefault(name, default) == default, f"${{{name}}} has two different defaults"
    return variables


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a compose command gets: none of the stack's variables from the developer's shell."""
    names = compose_variables()
    env = {k: v for k, v in os.environ.items() if k not in names and k != "COMPOSE_PROJECT_NAME"}
    env.update(extra)
    return env


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


# ------------------------------------------------------------------------------------------------ render


@pytest.fixture(scope="module", params=["docker-compose", "docker compose"])
def compose_client(request: pytest.FixtureRequest) -> list[str]:
    """docker-compose (v1.29: must be there) and docker compose (v2: skipped, with the reason, where absent)."""
    if request.param == "docker-compose":
        path = shutil.which("docker-compose")
        if path is None:
            missing("docker-compose is not installed (apt-get install -y --no-install-recommends docker-compose)")
        return [path]
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip(V2_MISSING)
    return [docker, "compose"]


def render(client: list[str], env_file: Path, env: dict[str, str] | None = None) -> dict:
    out = run([*client, "--file", str(COMPOSE_FILE), "--env-file", str(env_file), "config"], env or clean_env())
    return yaml.safe_load(out)


@pytest.fixture(scope="module")
def default_config(compose_client: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    # an empty env file: a developer's deploy/compose/.env must not change what the test sees
    return render(compose_client, write_env_file(tmp_path_factory.mktemp("env") / "empty.env", {}))


@pytest.fixture(scope="module")
def test_env_config(compose_client: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return render(compose_client, write_env_file(tmp_path_factory.mktemp("env") / "test.env", TEST_ENV))


def published(service: dict) -> set[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port, as v1 ("a:b:c/tcp") or v2 (a map) renders it."""
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            address, host, container = str(port).split("/")[0].rsplit(":", 2)
            ports.add((address, int(host), int(container)))
    return ports


def depends_on(service: dict) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in (service.get("depends_on") or {}).items()}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def volume_targets(service: dict) -> dict[str, str]:
    """container path -> source (a named volume or a host path), for v1's short and v2's long syntax."""
    targets = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets[volume["target"]] = str(volume["source"])
        else:
            source, target = volume.split(":")[:2]
            targets[target] = source
    return targets


def test_renders_the_whole_stack_with_the_defaults(default_config):
    services = default_config["services"]
    assert set(services) == ALL_SERVICES
    variables = compose_variables()
    for name, (variable, default, container) in PUBLISHED.items():
        assert published(services[name]) == {("127.0.0.1", default, container)}, name
        assert variables[variable] == str(default)
    assert not services["postgres"].get("ports"), "the database stays on the compose network"
    for name in OURS:
        service = services[name]
        assert service["init"] is True, name
        assert service["read_only"] is True, name
        assert str(service["user"]) == "10001:10001", name
        assert "/tmp" in service["tmpfs"], name
        assert volume_targets(service)[HOME] == ("mlflow-data" if name == "mlflow" else "visionloop-home"), name
    for name, conditions in DEPENDS.items():
        assert depends_on(services[name]) == conditions, name
    for name in ALL_SERVICES - set(DEPENDS):
        assert not depends_on(services[name]), name
    assert services["train"]["profiles"] == ["train"], "only `docker compose run train` starts the training"
    assert all("profiles" not in s for n, s in services.items() if n != "train")

    for name, url in HEALTH_URLS.items():
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python3", "-c"] and f"urlopen('{url}'" in test[3], name
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert volume_targets(services["postgres"])["/docker-entrypoint-initdb.d"] == str(COMPOSE / "postgres" / "initdb")

    serve_image, train_image = "visionloop-serve:0.1.0", "visionloop-train:0.1.0"
    assert {n: services[n]["image"] for n in OURS} == {
        "mlflow": train_image,
        "train": train_image,
        "serve": serve_image,
        "monitor": serve_image,
        "loop": train_image,  # executor local retrains in the loop's process: torch
    }
    assert services["postgres"]["image"] == "postgres:16-bookworm"
    assert services["prometheus"]["image"] == "prom/prometheus:v2.53.0"
    assert services["alertmanager"]["image"] == "prom/alertmanager:v0.27.0"
    assert services["grafana"]["image"].startswith("grafana/grafana:11.")
    assert [services[n]["command"] for n in ("train", "serve", "monitor", "loop")] == [
        ["run"],
        ["serve"],
        ["monitor"],
        ["loop"],
    ]

    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"]
    assert mlflow["command"][0] == "server"
    assert {
        "--backend-store-uri=postgresql+psycopg://visionloop@postgres:5432/mlflow",
        "--serve-artifacts",
        f"--artifacts-destination={HOME}/mlartifacts",
        "--host=0.0.0.0",
        "--port=5000",
    } <= set(mlflow["command"])
    allowed = next(a for a in mlflow["command"] if a.startswith("--allowed-hosts="))
    assert "mlflow:5000" in allowed.split("=", 1)[1].split(","), "the other services' Host header"

    store = "postgresql+psycopg://visionloop@postgres:5432/predictions"
    for name in ("train", "serve", "monitor", "loop"):
        env = environment(services[name])
        assert env["VISIONLOOP_REGISTRY__TRACKING_URI"] == "http://mlflow:5000", name
        assert env["VISIONLOOP_MONITOR__STORE_URL"] == store, name
        assert env["VISIONLOOP_HOME"] == HOME, name
        assert env["PGPASSWORD"] == "visionloop-dev-password", name
    assert environment(mlflow)["PGPASSWORD"] == environment(services["postgres"])["POSTGRES_PASSWORD"]
    loop = environment(services["loop"])
    assert loop["VISIONLOOP_LOOP__EXECUTOR"] == "local"
    assert json.loads(loop["VISIONLOOP_LOOP__RELOAD_URLS"]) == ["http://serve:8000"]
    assert loop["VISIONLOOP_LOOP__PROMETHEUS_URL"] == "http://prometheus:9090"
    for token in ("VISIONLOOP_SERVE__ADMIN_TOKEN", "VISIONLOOP_SERVE__FEEDBACK_TOKEN"):
        assert loop[token] == environment(services["serve"])[token], token
    for name, port in (("serve", 8000), ("monitor", 8001), ("loop", 8002)):
        env = environment(services[name])
        assert env[f"VISIONLOOP_{name.upper()}__HOST"] == "0.0.0.0", name
        assert env[f"VISIONLOOP_{name.upper()}__PORT"] == str(port), name
    for name in ("monitor", "train", "mlflow"):  # the tokens only where they are used
        assert not any(k.endswith("_TOKEN") for k in environment(services[name])), name


def test_a_test_env_file_sets_secrets_images_ports_and_stores(test_env_config):
    services = test_env_config["services"]
    for name, (variable, _default, container) in PUBLISHED.items():
        assert published(services[name]) == {("127.0.0.1", int(TEST_ENV[variable]), container)}, name
    assert environment(services["postgres"])["POSTGRES_PASSWORD"] == "pg-secret-from-env"
    for name in ("mlflow", "serve", "monitor", "loop", "train"):
        assert environment(services[name])["PGPASSWORD"] == "pg-secret-from-env", name
    assert environment(services["serve"])["VISIONLOOP_SERVE__ADMIN_TOKEN"] == "admin-secret-from-env"
    assert environment(services["loop"])["VISIONLOOP_SERVE__ADMIN_TOKEN"] == "admin-secret-from-env"
    for name in ("serve", "loop"):
        assert environment(services[name])["VISIONLOOP_SERVE__FEEDBACK_TOKEN"] == "feedback-secret-from-env", name
    assert environment(services["grafana"])["GF_SECURITY_ADMIN_PASSWORD"] == "grafana-secret-from-env"
    for name in ("serve", "monitor"):
        assert services[name]["image"] == TEST_ENV["VISIONLOOP_SERVE_IMAGE"], name
    for name in ("mlflow", "train", "loop"):
        assert services[name]["image"] == TEST_ENV["VISIONLOOP_TRAIN_IMAGE"], name
    assert services["prometheus"]["image"] == TEST_ENV["PROMETHEUS_IMAGE"]
    for name in ("serve", "monitor", "loop", "train"):
        assert environment(services[name])["VISIONLOOP_MONITOR__STORE_URL"] == TEST_ENV["PREDICTION_STORE_URL"]
    # a secret is where it is used, and nowhere else
    rendered = {name: yaml.safe_dump(service) for name, service in services.items()}
    where = {secret: {n for n, text in rendered.items() if TEST_ENV[secret] in text} for secret in SECRETS}
    assert where == {
        "POSTGRES_PASSWORD": {"postgres", "mlflow", "train", "serve", "monitor", "loop"},
        "SERVE_ADMIN_TOKEN": {"serve", "loop"},
        "SERVE_FEEDBACK_TOKEN": {"serve", "loop"},
        "GRAFANA_ADMIN_PASSWORD": {"grafana"},
    }


def test_no_secret_is_written_into_the_compose_file():
    """Passwords and tokens come from the environment or .env; the only literals are the dev defaults."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    secret_keys = re.compile(r"PASSWORD|TOKEN(?!S$)")  # not http.allow_public_without_tokens: a switch, no secret
    checked = 0
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secret_keys.search(key):
                match = re.fullmatch(r"\$\{([A-Z_]+):-([^}]*)\}", str(value))
                assert match, f"{name}: {key} is not a ${{VARIABLE:-dev default}}"
                assert "dev" in match.group(2), f"{name}: {key}'s default {match.group(2)!r} does not say it is dev"
                checked += 1
    assert checked >= 7
    # no password inside a database URL: libpq takes it from PGPASSWORD
    for url in re.findall(r"postgresql\+psycopg://[^\s}'\"]+", COMPOSE_FILE.read_text()):
        assert re.match(r"postgresql\+psycopg://[^:@/]+@", url), url


def test_env_example_documents_every_variable_with_its_default():
    documented = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    assert documented == compose_variables()
    assert ".env" in (COMPOSE / ".gitignore").read_text().split()


# ----------------------------------------------------------------------- the copies of deploy/monitoring


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (apt-get install -y --no-install-recommends {package})")
    return path


def to_monitoring_targets(text: str) -> str:
    for ours, theirs in COMPOSE_TARGETS.items():
        text = text.replace(f'"{ours}"', f'"{theirs}"')
    return text


def test_prometheus_config_is_deploy_monitoring_with_compose_targets(tmp_path):
    compose_text = (COMPOSE / "prometheus.yml").read_text()
    ours = yaml.safe_load(compose_text)
    theirs = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    assert yaml.safe_load(to_monitoring_targets(compose_text)) == theirs
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in ours["scrape_configs"]}
    assert jobs == {
        "visionloop-serve": ["serve:8000"],
        "visionloop-monitor": ["monitor:8001"],
        "visionloop-loop": ["loop:8002"],
        "prometheus": ["127.0.0.1:9090"],
    }
    # the compose file mounts it and the rules where rule_files looks
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in raw["volumes"]
    assert "../monitoring/prometheus/rules:/etc/prometheus/rules:ro" in raw["volumes"]
    assert ours["rule_files"] == ["rules/*.rules.yml"]
    # promtool reads it as the container would: the config beside rules/
    promtool = tool("promtool", "prometheus")
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(MONITORING / "prometheus" / "rules", tmp_path / "rules")
    out = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert "SUCCESS: 1 rule files found" in out, out


def test_alertmanager_config_is_deploy_monitoring_with_the_loop_service():
    compose_text = (COMPOSE / "alertmanager.yml").read_text()
    ours = yaml.safe_load(compose_text)
    theirs = yaml.safe_load((MONITORING / "alertmanager" / "alertmanager.yml").read_text())
    webhooks = [w["url"] for r in ours["receivers"] for w in r.get("webhook_configs", [])]
    assert webhooks == ["http://loop:8002/alerts"]
    assert yaml.safe_load(compose_text.replace("http://loop:8002/alerts", "http://127.0.0.1:8002/alerts")) == theirs
    amtool = tool("amtool", "prometheus-alertmanager")
    run([amtool, "check-config", str(COMPOSE / "alertmanager.yml")])


def test_grafana_gets_the_compose_prometheus_and_the_dashboards_of_deploy_monitoring():
    ours = yaml.safe_load((COMPOSE / "grafana" / "datasources" / "prometheus.yml").read_text())
    theirs = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ours["datasources"][0].pop("url") == "http://prometheus:9090"
    theirs["datasources"][0].pop("url")
    assert ours == theirs
    provider = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "visionloop.yml").read_text())
    mounts = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]["volumes"]
    assert f"../monitoring/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts
    assert "../monitoring/grafana/provisioning/dashboards:/etc/grafana/provisioning/dashboards:ro" in mounts
    assert "./grafana/datasources:/etc/grafana/provisioning/datasources:ro" in mounts
    home = environment(yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"])
    dashboard = home["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert dashboard.startswith(provider["providers"][0]["options"]["path"] + "/")
    assert (MONITORING / "grafana" / "dashboards" / Path(dashboard).name).is_file()


# ---------------------------------------------------------------------------------- PostgreSQL, for real


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[tuple[int, str]]:
    """A real PostgreSQL (password auth, user visionloop) initialised as the postgres image does: its
    POSTGRES_DB, then every file of deploy/compose/postgres/initdb through psql. Yields (port, password)."""
    binaries = {name: shutil.which(name) for name in ("initdb", "postgres", "psql")}
    if None in binaries.values():
        missing("PostgreSQL server and client binaries (initdb, postgres, psql) are not installed (Debian: postgresql)")
    password = "pg-" + uuid.uuid4().hex
    root = Path(tempfile.mkdtemp(prefix="visionloop-compose-pg-", dir="/tmp"))
    # postgres refuses to run as root: as root, the cluster belongs to the unprivileged 'postgres' user
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    (root / "pw").write_text(password)
    if run_as:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(root / "pw", "postgres", "postgres")
    run([*run_as, binaries["initdb"], "-D", f"{root}/db", "-U", "visionloop", "--auth=scram-sha-256",
         f"--pwfile={root}/pw", "-E", "UTF8"])  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [*run_as, binaries["postgres"], "-D", f"{root}/db", "-p", str(port), "-k", str(root),
         "-c", "listen_addresses=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    env = {**os.environ, "PGPASSWORD": password}
    psql = [binaries["psql"], "-v", "ON_ERROR_STOP=1", "--host=127.0.0.1", f"--port={port}", "--username=visionloop"]
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([*psql, "--dbname=postgres", "-c", "select 1"], env=env, capture_output=True).returncode:
            assert server.poll() is None, "postgres exited at start"
            assert time.monotonic() < deadline, "postgres did not accept connections within 60 s"
            time.sleep(0.3)
        run([*psql, "--dbname=postgres", "-c", "CREATE DATABASE visionloop"], env)  # the image's POSTGRES_DB
        for script in sorted((COMPOSE / "postgres" / "initdb").iterdir()):
            assert script.suffix == ".sql", f"{script.name}: the test runs .sql files only"
            run([*psql, "--dbname=visionloop", "-f", str(script)], env)
        yield port, password
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_the_stack_database_urls_reach_the_init_script_databases_through_pgpassword(
    postgres_server, default_config, monkeypatch
):
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    port, password = postgres_server
    services = default_config["services"]
    mlflow_uri = next(a for a in services["mlflow"]["command"] if a.startswith("--backend-store-uri="))
    urls = {
        "mlflow": mlflow_uri.split("=", 1)[1],
        "predictions": environment(services["serve"])["VISIONLOOP_MONITOR__STORE_URL"],
    }
    for database, text in urls.items():
        url = make_url(text)
        assert (url.host, url.port, url.database, url.password) == ("postgres", 5432, database, None)
        here = url.set(host="127.0.0.1", port=port)
        monkeypatch.setenv("PGPASSWORD", password)
        engine = sa.create_engine(here)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select current_database(), current_user")).one() == (database, "visionloop")
        engine.dispose()
        monkeypatch.setenv("PGPASSWORD", "not-the-password")
        engine = sa.create_engine(here)
        with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
            engine.connect()
        engine.dispose()


# ------------------------------------------------------------------------------------- start it, for real

JOBS = ("visionloop-serve", "visionloop-monitor", "visionloop-loop")
STARTED = ["mlflow", "serve", "monitor", "loop", "prometheus", "alertmanager"]
# images of the host's Debian binaries (Go, linked against glibc only: a bookworm base has it), entrypoints and
# data folders as in the official images (prom/prometheus, prom/alertmanager): name -> (Debian package, its
# binary, the binary in the image, the data folder, the port, folders the binary reads besides)
TOOL_IMAGES = {
    "prometheus": ("prometheus", "/usr/bin/prometheus", "/bin/prometheus", "/prometheus", 9090, []),
    # Debian's Alertmanager reads its notification templates from files rather than from the binary
    "alertmanager": (
        "prometheus-alertmanager",
        "/usr/bin/prometheus-alertmanager",
        "/bin/alertmanager",
        "/alertmanager",
        9093,
        ["/usr/share/prometheus/alertmanager"],
    ),
}


def tool_image(docker: str, base_image: str, name: str, workdir: Path) -> str:
    package, binary, inside, data, port, extras = TOOL_IMAGES[name]
    if not all(Path(p).exists() for p in (binary, *extras)):
        missing(f"{binary} is not installed (apt-get install -y --no-install-recommends {package})")
    context = workdir / name
    (context / "data").mkdir(parents=True)
    shutil.copy(binary, context / "binary")
    copies = ""
    for i, folder in enumerate(extras):
        shutil.copytree(folder, context / f"extra{i}")
        copies += f"COPY extra{i}/ {folder}/\n"
    (context / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        f"COPY binary {inside}\n"
        f"{copies}"
        f"COPY --chown=65534:65534 data/ {data}/\n"
        "USER 65534:65534\n"
        f"WORKDIR {data}\n"
        f"EXPOSE {port}\n"
        f'ENTRYPOINT ["{inside}"]\n'
    )
    tag = f"visionloop-test-{name}:compose"
    run([docker, "build", "--quiet", "--tag", tag, str(context)], timeout=300)
    return tag


def get(url: str, timeout: float = 5) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


class Stack:
    """A compose project of deploy/compose on free 127.0.0.1 ports."""

    def __init__(self, compose: str, env: dict[str, str], ports: dict[str, int]) -> None:
        self.project = f"vltest{uuid.uuid4().hex[:10]}"
        self.command = [compose, "--project-name", self.project, "--file", str(COMPOSE_FILE)]
        self.env, self.ports = env, ports

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def compose(self, *args: str, timeout: float = 300) -> str:
        return run([*self.command, *args], self.env, timeout)

    def logs(self) -> str:
        done = subprocess.run(
            [*self.command, "logs", "--no-color", "--tail=40"], capture_output=True, text=True, env=self.env
        )
        return done.stdout[-12000:] + done.stderr[-2000:]

    def wait_for(self, what: str, probe: Any, timeout: float = 180) -> Any:
        """Poll ``probe()`` until it returns something true (bounded); fail with the stack's logs."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                result = probe()
                if result:
                    return result
                last = "not yet"
            except (OSError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(1)
        pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last})\n{self.logs()}")


@pytest.fixture(scope="module")
def stack(docker_engine, base_image, serve_image, train_image, tmp_path_factory) -> Iterator[Stack]:
    compose = shutil.which("docker-compose")
    if compose is None:
        missing("docker-compose is not installed (apt-get install -y --no-install-recommends docker-compose)")
    workdir = tmp_path_factory.mktemp("compose-images")
    images = {name: tool_image(docker_engine, base_image, name, workdir) for name in TOOL_IMAGES}
    ports = {name: free_port() for name in PUBLISHED}
    values = {
        "VISIONLOOP_SERVE_IMAGE": serve_image,
        "VISIONLOOP_TRAIN_IMAGE": train_image,
        "PROMETHEUS_IMAGE": images["prometheus"],
        "ALERTMANAGER_IMAGE": images["alertmanager"],
        # no PostgreSQL image here: SQLite on the volumes (mlflow's own; the home that serve, monitor, loop share)
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{HOME}/mlflow.db",
        "PREDICTION_STORE_URL": f"sqlite:///{HOME}/predictions.db",
        "MLFLOW_WORKERS": "1",
        "MONITOR_INTERVAL_SECONDS": "5",
        **{PUBLISHED[name][0]: str(port) for name, port in ports.items()},
    }
    env_file = write_env_file(workdir / "stack.env", values)
    stack = Stack(compose, clean_env(), ports)
    stack.command += ["--env-file", str(env_file)]
    try:
        stack.compose("up", "--detach", "--no-deps", *STARTED)
        yield stack
    finally:
        subprocess.run([*stack.command, "down", "--volumes", "--remove-orphans", "--timeout", "15"],
                       env=stack.env, capture_output=True, timeout=300)  # fmt: skip
        subprocess.run([docker_engine, "rmi", *images.values()], capture_output=True, timeout=120)


def test_the_stack_starts_here_and_answers(stack):
    assert stack.wait_for("mlflow /health", lambda: get(stack.url("mlflow", "/health"))[0] == 200)
    for service in ("serve", "monitor", "loop"):
        status, body = stack.wait_for(f"{service} /healthz", lambda s=service: get(stack.url(s, "/healthz")))
        assert status == 200 and body["status"] == "alive", (service, body)

    # no training in this test: the server is up, not ready, and says why
    def not_ready_yet() -> Any:
        status, body = get(stack.url("serve", "/readyz"))
        return (status, body) if "no model registered" in str(body) else None

    status, body = stack.wait_for("serve /readyz naming the missing model", not_ready_yet)
    assert status == 503 and body["ready"] is False, body
    assert "visionloop-classifier@champion" in body["status"], body

    assert stack.wait_for("alertmanager /-/ready", lambda: get(stack.url("alertmanager", "/-/ready"))[0] == 200)

    status, body = get(stack.url("prometheus", "/api/v1/rules"))
    assert status == 200 and body["status"] == "success", body
    rules = [rule["name"] for group in body["data"]["groups"] for rule in group["rules"]]
    assert "VisionloopDriftDetected" in rules and "VisionloopNotReady" in rules, rules

    def targets_up() -> dict[str, str] | None:
        _, answer = get(stack.url("prometheus", "/api/v1/targets"))
        health = {t["labels"]["job"]: t["health"] for t in answer["data"]["activeTargets"]}
        return health if all(health.get(job) == "up" for job in JOBS) else None

    health = stack.wait_for("the three visionloop jobs up in Prometheus", targets_up, timeout=120)
    assert {job: health[job] for job in JOBS} == dict.fromkeys(JOBS, "up")

    # Prometheus found its Alertmanager by service name
    _, answer = get(stack.url("prometheus", "/api/v1/alertmanagers"))
    assert [a["url"] for a in answer["data"]["activeAlertmanagers"]] == ["http://alertmanager:9093/api/v2/alerts"]
