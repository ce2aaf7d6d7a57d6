"""The service stack, checked without a Docker engine: compose file, commands, volumes, nginx config."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from atlas_shards.cli import main as shards_cli
from atlas_shards.serve import CONF, find_nginx, free_port
from conftest import need_nginx
from evaluate.cli import main as evaluate_cli
from trainer.cli import main as train_cli

ROOT = Path(__file__).resolve().parents[1]
CLIS = {
    "atlas-shards": shards_cli,
    "atlas-train": train_cli,
    "atlas-evaluate": evaluate_cli,
    "trainer.cli": train_cli,
    "atlas_shards.cli": shards_cli,
    "evaluate.cli": evaluate_cli,
}


def _defaults(value):
    """Compose's ${VAR:-default} interpolation with every variable unset."""
    if isinstance(value, str):
        return re.sub(r"(?<!\$)\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)  # $$ escapes: the container expands them
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


def command_of(svc: dict, **env: str) -> list[str]:
    """The argv a service runs, its shell or trainer script expanded as in the container (defaults, ``env``)."""
    argv = svc["command"]
    environ = {**os.environ, **{k: str(v) for k, v in (svc.get("environment") or {}).items() if v is not None}, **env}
    if argv == ["docker/train.sh"]:
        done = subprocess.run(
            ["bash", str(ROOT / "docker/train.sh")],
            capture_output=True,
            text=True,
            env={**environ, "TRAIN_DRY_RUN": "1"},
            check=True,
        )
        return done.stdout.splitlines()
    if argv[:2] == ["sh", "-c"]:
        script = argv[2].replace("$$", "$").replace("exec ", "printf '%s\\n' ", 1)
        return subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, env=environ, check=True
        ).stdout.splitlines()
    return argv


def test_every_project_service_runs_a_real_command_with_valid_options(compose):
    seen, builders = set(), []
    for name, svc in compose["services"].items():
        if svc.get("image", "").startswith("nginx"):
            continue
        assert svc["image"] == "atlas-lesion-shards:latest", name  # one image for every project service
        if "build" in svc:
            builders.append(name)
        cli, sub, _ = check_cli(command_of(svc))
        seen.add((cli, sub))
    assert builders == ["ingest"]  # built once, by a service every run starts
    assert {
        ("atlas-shards", "synth"),
        ("atlas-shards", "ingest"),
        ("atlas-shards", "build"),
        ("atlas-train", "fit"),
        ("atlas-evaluate", "run"),
        ("atlas-evaluate", "predict"),
    } <= seen
    segment = command_of(compose["services"]["segment"])
    assert segment[:2] == ["atlas-evaluate", "predict"] and segment[4:6] == ["/input", "/output"]  # folder in, out
    assert _mounts(compose["services"]["segment"])["/input"] == "ro"


def test_the_trainer_knobs_reach_its_command(compose):
    trainer = compose["services"]["trainer"]
    one = command_of(trainer, STEPS_PER_EPOCH="7", VAL_BATCHES="3", EVAL_EVERY="5", RUN_NAME="")
    assert one[:2] == ["atlas-train", "fit"]  # one process: no torchrun wrapped around its errors
    _, _, opts = check_cli(one)
    assert (opts["steps_per_epoch"], opts["val_batches"], opts["eval_every"]) == ("7", "3", "5")
    assert opts["out"] == "/runs/cnn3d-sym" and opts["resume"] is True  # RUN_NAME defaults to the model
    assert (opts["recipe"], opts.get("lr")) == ("modern", None)  # no LR: the recipe's own
    paper = check_cli(command_of(trainer, RECIPE="paper", LR="1e-4", RUN_NAME=""))[2]
    assert (paper["recipe"], paper["lr"]) == ("paper", "1e-4")
    assert check_cli(command_of(trainer, MODEL="cnn3d", RUN_NAME=""))[2]["out"] == "/runs/cnn3d"
    many = command_of(trainer, GPUS="8")
    assert many[0] == "torchrun" and "--nproc_per_node=8" in many
    check_cli(many)
    evaluator = check_cli(command_of(compose["services"]["evaluator"], MODEL="cnn3d", RUN_NAME=""))[2]
    assert list(evaluator["run_dir"]) == ["/runs/cnn3d"] and evaluator["out_dir"] == "/reports/cnn3d-test"


def test_cpu_hosts_by_default_gpus_and_nodes_by_file(compose):
    assert "deploy" not in compose["services"]["trainer"]  # no GPU reservation: `up` works on a CPU-only host
    gpu = _defaults(yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text()))["services"]["trainer"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "1"  # GPUS, not every GPU
    assert gpu["environment"]["DEVICE"] == "cuda"
    node = _defaults(yaml.safe_load((ROOT / "docker-compose.node.yml").read_text()))["services"]
    assert list(node) == ["trainer"] and node["trainer"]["network_mode"] == "host"
    argv = command_of(node["trainer"], SHARD_URL="http://10.1.2.3:8080", NODE_RANK="1", GPUS="4")
    assert argv[0] == "torchrun" and "--nnodes=2" in argv and "--node_rank=1" in argv
    assert check_cli(argv)[2]["shards"] == "http://10.1.2.3:8080/train/"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"compose-data", ".venv", ".git"} <= set(ignored)


def test_the_checker_rejects_bad_commands():
    with pytest.raises(click.exceptions.NoSuchOption):
        check_cli(
            ["atlas-shards", "build", "/data/store.zarr", "/srv/shards/train", "--split", "train", "--bogus", "1"]
        )
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
    assert server["ports"][0] == "127.0.0.1:8080:80"  # this host only, by default
    assert "access_log /dev/stdout" in CONF.read_text()  # streaming shows in `docker compose logs shard-server`
    conf = CONF.read_text()
    assert "listen 80;" in conf and "root /srv/shards;" in conf and "location = /healthz" in conf
    assert "/healthz" in " ".join(server["healthcheck"]["test"]) and "autoindex off;" in conf
    checked = set()
    for name, svc in services.items():
        if name == "shard-server":
            continue
        mounts = _mounts(svc)
        for arg in command_of(svc):
            for path in re.findall(r"^(/(?:data|srv/shards|runs|reports|release)\b\S*)", arg):
                root = "/srv/shards" if path.startswith("/srv/") else "/" + path.split("/")[1]
                assert root in mounts, f"{name} uses {path} but does not mount {root}"
                checked.add((name, root))
                if root != "/release":  # the release is only read; everything else is written somewhere
                    assert mounts[root] == "rw", (name, root)
            for url in re.findall(r"http://([\w-]+)/", arg):
                assert url in services, f"{name} streams from unknown host {url}"
    assert {
        ("ingest", "/data"),
        ("build-train", "/srv/shards"),
        ("trainer", "/runs"),
        ("evaluator", "/reports"),
    } <= checked
    trainer = services["trainer"]
    assert trainer["depends_on"]["shard-server"]["condition"] == "service_healthy"
    assert services["evaluator"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    store_writer = services["ingest"]["command"][3]
    assert all("/data/store.zarr" in command_of(services[s]) for s in ("build-train", "build-val", "evaluator"))
    assert store_writer == "/data/store.zarr"


def test_dockerfile_installs_every_package():
    text = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "setup.cfg").read_text()
    packages = re.findall(r"^    (\w+)$", setup.split("[options.packages.find]")[1].split("[")[0], re.M)
    assert packages and all(f"COPY {p} {p}" in text for p in packages)
    assert '"torch==${TORCH_VERSION}"' in text and "pip install -e '.[s3]'" in text and "TORCH_VARIANT" in text


def test_nginx_accepts_the_config():
    need_nginx()
    done = subprocess.run([find_nginx(), "-t", "-c", str(CONF)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


@pytest.mark.slow
def test_a_failing_trainer_under_torchrun_ends_with_its_one_line_error(tmp_path):
    """docker/train.sh with two ranks (real torchrun, gloo): the children's error is the log's last line."""
    import sys

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "GPUS": "2",
        "DEVICE": "cpu",
        "LOADER_WORKERS": "0",
        "SHARD_URL": str(tmp_path / "nowhere"),
        "RUNS_DIR": str(tmp_path / "runs"),
        "MASTER_PORT": str(free_port()),
    }
    done = subprocess.run(["bash", str(ROOT / "docker/train.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("trainer: exit status 1: Error: ") and "nowhere/train" in last, done.stderr[-3000:]
    assert "torchrun" in done.stdout.splitlines()[0]
