"""The service stack, checked without a Docker engine: compose file, commands, volumes, nginx config."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from atlas_shards.cli import main as shards_cli
from atlas_shards.serve import CONF, find_nginx
from conftest import need_nginx
from evaluate.cli import main as evaluate_cli
from trainer.cli import main as train_cli

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"atlas-shards": shards_cli, "atlas-train": train_cli, "atlas-evaluate": evaluate_cli,
        "trainer.cli": train_cli, "atlas_shards.cli": shards_cli, "evaluate.cli": evaluate_cli}


def _defaults(value):
    """Compose's ${VAR:-default} interpolation with every variable unset."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.findall(r"\$\{[A-Z_]+\}", text), "every variable needs a default"
    return _defaults(yaml.safe_load(text))


def check_cli(argv: list[str]) -> tuple[str, str, dict]:
    """Parse a project command line with click, without running it: (cli, subcommand, options)."""
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        at = argv.index("-m")
        get_args_parser().parse_args(argv[1 : at + 2] + ["x"])  # torchrun's own options are valid
        argv = argv[at + 1 :]
    group = CLIS[argv[0]]
    name, args = argv[1], argv[2:]
    with click.Context(group) as ctx:
        cmd = group.get_command(ctx, name)
        assert cmd is not None, f"{argv[0]} has no command {name!r}"
        sub = click.Context(cmd, info_name=name)
        opts, leftover, _ = cmd.make_parser(sub).parse_args(list(args))  # unknown options raise here
    params = {p.name: p for p in cmd.params}
    for p in cmd.params:
        if p.required and opts.get(p.name) is None:
            raise AssertionError(f"{argv[0]} {name}: missing {p.name}")
        if isinstance(p.type, click.Choice) and opts.get(p.name) is not None:
            assert opts[p.name] in p.type.choices, f"{p.name}={opts[p.name]!r} not in {p.type.choices}"
        if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)) and opts.get(p.name) is not None:
            p.type.convert(opts[p.name], p, None)
    assert not leftover, f"unexpected arguments {leftover}"
    return argv[0], name, {**opts, "_params": params}


def test_every_project_service_runs_a_real_command_with_valid_options(compose):
    seen = set()
    for name, svc in compose["services"].items():
        if svc.get("image", "").startswith("nginx"):
            continue
        assert svc["build"] == "." and isinstance(svc["command"], list), name
        cli, sub, _ = check_cli(svc["command"])
        seen.add((cli, sub))
    assert {("atlas-shards", "synth"), ("atlas-shards", "ingest"), ("atlas-shards", "build"),
            ("trainer.cli", "fit"), ("atlas-evaluate", "run")} <= seen


def test_the_checker_rejects_bad_commands():
    with pytest.raises(click.exceptions.NoSuchOption):
        check_cli(["atlas-shards", "build", "/data/store.zarr", "/srv/shards/train", "--split", "train", "--bogus", "1"])
    with pytest.raises(AssertionError):
        check_cli(["atlas-shards", "build", "/data/store.zarr", "/out", "--split", "holdout"])
    with pytest.raises(AssertionError):
        check_cli(["atlas-train", "fitt", "--shards", "x"])


def _mounts(svc: dict) -> dict[str, str]:
    out = {}
    for vol in svc.get("volumes", []):
        host, container, *mode = vol.split(":")
        out[container] = mode[0] if mode else "rw"
    return out


def test_volumes_ports_and_urls_line_up(compose):
    services = compose["services"]
    server = services["shard-server"]
    assert _mounts(server)["/srv/shards"] == "ro" and _mounts(server)["/etc/nginx/nginx.conf"] == "ro"
    assert server["ports"][0].split(":")[-1] == "80"
    conf = CONF.read_text()
    assert "listen 80;" in conf and "root /srv/shards;" in conf and "location = /healthz" in conf
    assert "/healthz" in " ".join(server["healthcheck"]["test"]) and "autoindex off;" in conf
    checked = set()
    for name, svc in services.items():
        if name == "shard-server":
            continue
        mounts = _mounts(svc)
        for arg in svc["command"]:
            for path in re.findall(r"^(/(?:data|srv/shards|runs|reports|release)\b\S*)", arg):
                root = "/srv/shards" if path.startswith("/srv/") else "/" + path.split("/")[1]
                assert root in mounts, f"{name} uses {path} but does not mount {root}"
                checked.add((name, root))
                if root != "/release":  # the release is only read; everything else is written somewhere
                    assert mounts[root] == "rw", (name, root)
            for url in re.findall(r"http://([\w-]+)/", arg):
                assert url in services, f"{name} streams from unknown host {url}"
    assert {("ingest", "/data"), ("build-train", "/srv/shards"), ("trainer", "/runs"), ("evaluator", "/reports")} <= checked
    trainer = services["trainer"]
    assert trainer["depends_on"]["shard-server"]["condition"] == "service_healthy"
    assert services["evaluator"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    store_writer = services["ingest"]["command"][3]
    assert all("/data/store.zarr" in " ".join(services[s]["command"]) for s in ("build-train", "build-val", "evaluator"))
    assert store_writer == "/data/store.zarr"


def test_dockerfile_installs_every_package():
    text = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "setup.cfg").read_text()
    packages = re.findall(r"^    (\w+)$", setup.split("[options.packages.find]")[1].split("[")[0], re.M)
    assert packages and all(f"COPY {p} {p}" in text for p in packages)
    assert "torch==${TORCH_VERSION}" in text and "pip install -e ." in text


def test_nginx_accepts_the_config():
    need_nginx()
    done = subprocess.run([find_nginx(), "-t", "-c", str(CONF)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
