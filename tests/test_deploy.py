"""The deployment files, checked without building anything: the Dockerfile (slim, non-root, a
HEALTHCHECK that really probes /healthz, an entrypoint that is our command), compose.yaml (the bot,
PostgreSQL, migrations once, two replicas behind one port), the nginx config, the systemd unit."""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot.cli import build_parser

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parent.parent


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) for every Dockerfile line, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_the_image_is_slim_runs_as_a_user_and_starts_our_command():
    stage = final_stage()
    ops = dict(stage)
    assert all(re.fullmatch(r"python:3\.1[1-9]-slim( AS \w+)?", args) for op, args in dockerfile() if op == "FROM")
    user = [args for op, args in stage if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    entrypoint = json.loads(ops["ENTRYPOINT"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert entrypoint == ["chatops"] and scripts["chatops"] == "bot.cli:main"
    assert build_parser().parse_args(json.loads(ops["CMD"])).command == "serve"
    assert "CHATOPS_HOST=0.0.0.0" in ops["ENV"]  # reachable from outside the container
    assert any("-c constraints.txt '.[postgres]'" in args for op, args in dockerfile() if op == "RUN")
    for path in ("bot", "tools", "storage", "pyproject.toml", "constraints.txt"):
        assert (ROOT / path).exists()
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".env", ".git"} <= set(ignored)


async def test_the_healthcheck_command_probes_healthz_of_a_running_bot(bots):
    spec = dict(final_stage())["HEALTHCHECK"]
    command = json.loads(spec[spec.index("CMD") + 3 :].strip())
    assert command[0] == "python"
    app = await bots.run(await bots.start(serve_http=True))

    async def probe(port: int) -> int:
        env = {**os.environ, "CHATOPS_PORT": str(port)}
        proc = await asyncio.create_subprocess_exec(sys.executable, *command[1:], env=env, stderr=asyncio.subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 30)

    assert await probe(app.port) == 0
    assert await probe(9) != 0  # nothing listens there: unhealthy


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))


def test_compose_runs_migrations_once_then_two_replicas_behind_one_port(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "bot", "proxy"}
    postgres, migrate, bot, proxy = (services[n] for n in ("postgres", "migrate", "bot", "proxy"))
    assert postgres["image"].startswith("postgres:") and "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert migrate["command"] == ["db", "upgrade"] and migrate["build"] == "."
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert bot["command"] == ["serve"] and bot["deploy"]["replicas"] == 2
    assert bot["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert (
        bot["environment"]["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in bot["environment"]["DATABASE_URL"]
    )
    assert bot["environment"]["CHATOPS_PORT"] == "3000"
    for args in (migrate["command"], bot["command"]):
        build_parser().parse_args(args)
    assert proxy["ports"] == ["3000:80"]  # the one public port
    assert proxy["depends_on"]["bot"]["condition"] == "service_healthy"
    mount = proxy["volumes"][0].split(":")
    assert (ROOT / mount[0]).is_file()
    nginx = (ROOT / mount[0]).read_text(encoding="utf-8")
    assert re.search(r"server bot:3000\b", nginx) and "proxy_pass http://chatops_bots" in nginx
    assert bot["stop_grace_period"] == "15s"  # above the bot's own 10 s stop bound


def test_compose_gives_every_replica_the_same_audit_key(compose):
    """Each container has its own /data volume, so without a shared key each replica made its own key
    file there; two such serves on one PostgreSQL recorded the first staged row as
    `audit_staged_tampered` and `chatops audit verify` failed (measured with two `chatops serve`)."""
    services = compose["services"]
    for name in ("migrate", "bot"):
        key = services[name]["environment"].get("CHATOPS_AUDIT_KEY", "")
        assert key.startswith("${CHATOPS_AUDIT_KEY:?"), name  # one value for all, refused when unset
        assert "CHATOPS_AUDIT_KEY_FILE" not in services[name]["environment"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    compose_steps = readme[readme.index("### Compose") : readme.index("### systemd")]
    assert "CHATOPS_AUDIT_KEY=" in compose_steps


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_validates_the_file_when_available():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip("docker compose is not installed here; the structural checks above stand in")
    env = {**os.environ, "POSTGRES_PASSWORD": "x", "CHATOPS_AUDIT_KEY": "k" * 32}
    result = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_systemd_unit_runs_serve_and_stops_with_sigterm():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(ROOT / "deploy" / "chatops.service", encoding="utf-8")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/bin/chatops")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and str(args.env_file).startswith("/etc/")
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 10
    assert service["User"] != "root" and service["Restart"] == "on-failure"  # a watchdog timeout is a failure
    assert service["RestartPreventExitStatus"] == "2"  # a configuration mistake (`bot.core.errors.EXIT_CONFIG`) is not looped
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) >= 10  # `bot.sdnotify`, tests/test_sdnotify.py
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_units_install_steps_are_the_readmes():
    """The unit's header said `install -m 600 … /etc/chatops/chatops.env` without -D: on a fresh
    machine /etc/chatops does not exist and the step failed."""
    header = (ROOT / "deploy" / "chatops.service").read_text(encoding="utf-8").split("[Unit]")[0]
    steps = [line.removeprefix("#").strip() for line in header.splitlines() if line.startswith("#   sudo ")]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    systemd = readme[readme.index("### systemd") : readme.index("### Installing")]
    assert steps and all(step in systemd for step in steps), steps


async def test_backup_copies_a_live_sqlite_database_and_refuses_postgres(tmp_path, terminal_bot):
    from storage.models import CrmLead
    from tests.test_cli import chatops

    bot = await terminal_bot(database_url=f"sqlite:///{tmp_path / 'live.db'}")
    await bot.say("/new")
    async with bot.app.ctx.db.transaction() as session:
        now = bot.app.ctx.clock()
        session.add(CrmLead(name="A", email="a@example.com", need="x", created_at=now, updated_at=now))
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'live.db'}"}
    code, out, err = await chatops("backup", str(tmp_path / "copy.db"), env=env, cwd=tmp_path)  # the bot is still running
    assert code == 0 and "backed up" in out, err
    copy = sa.create_engine(f"sqlite:///{tmp_path / 'copy.db'}")
    with copy.connect() as conn:
        assert conn.execute(sa.text("SELECT email FROM crm_lead")).scalars().all() == ["a@example.com"]
    copy.dispose()
    code, _, err = await chatops("backup", str(tmp_path / "copy.db"), env=env, cwd=tmp_path)
    assert code == 2 and "already exists" in err
    missing = tmp_path / "backups" / "copy.db"  # the README's /backups/… on a machine without /backups
    code, _, err = await chatops("backup", str(missing), env=env, cwd=tmp_path)
    assert code == 2 and f"the directory {missing.parent} does not exist" in err, err
    code, _, err = await chatops(
        "backup", str(tmp_path / "pg.db"), env={"DATABASE_URL": "postgresql://u:pw-secret@127.0.0.1:1/x"}, cwd=tmp_path
    )
    assert code == 2 and "pg_dump" in err and "pw-secret" not in err
