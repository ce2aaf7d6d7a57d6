"""Every option the docs name exists: each `--option` in README.md and docs/*.md is an option of some command
of atlas-shards, atlas-train or atlas-evaluate (or of a tool the docs name beside it)."""

from __future__ import annotations

import re
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
# The pages that describe the commands as they are now; docs/benchmarks-diary.md is a dated record that quotes
# each command as it was run that day (options since renamed or removed included), so it is not checked.
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks-diary.md")]
# Options of other programs the docs quote (torchrun, pip, docker, pytest, make...), not ours.
OTHERS = {
    "--nproc_per_node",
    "--nnodes",
    "--node_rank",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--rdzv_id",
    "--standalone",
    "--local-addr",
    "--index-url",
    "--upgrade",
    "--profile",
    "--rm",
    "--network",
    "--durations",
    "--help",
    "--gpus",
    "--build",
    "--exclude-editable",
    "--nproc-per-node",
    "--master_port",
    "--master-port",
    "--check",
}


def _options() -> set[str]:
    from atlas_shards.cli import main as shards
    from evaluate.cli import main as evaluate
    from trainer.cli import main as train

    found = set()
    for group in (shards, train, evaluate):
        for command in [group, *group.commands.values()]:
            for param in command.params:
                if isinstance(param, click.Option):
                    for opt in [*param.opts, *param.secondary_opts]:
                        found.add(opt)
    return found


def test_every_option_the_docs_name_exists():
    known = _options() | OTHERS
    unknown = {}
    for doc in DOCS:
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", doc.read_text()):
            if opt not in known:
                unknown.setdefault(opt, doc.name)
    assert len(DOCS) > 8  # the manual's pages are found
    assert not unknown, f"options named in the docs that no command has: {unknown}"


def _defaults() -> dict[str, set[str]]:
    """Each option's default, as text, over every command that has it."""
    from atlas_shards.cli import main as shards
    from evaluate.cli import main as evaluate
    from trainer.cli import main as train

    out: dict[str, set[str]] = {}
    for group in (shards, train, evaluate):
        for command in group.commands.values():
            for param in command.params:
                if isinstance(param, click.Option) and param.default is not None and not callable(param.default):
                    value = param.default
                    text = (
                        {"on" if value else "off"}
                        if isinstance(value, bool)
                        else {str(value), f"{value:g}"}
                        if (isinstance(value, float))
                        else {str(value)}
                    )
                    for opt in param.opts:
                        out.setdefault(opt, set()).update(text)
    return out


def test_the_defaults_the_docs_state_are_the_commands_defaults():
    known = _options()
    assert "--threshold" in known and "--no-such-option" not in known  # the check above can fail
    defaults = _defaults()
    wrong = []
    for doc in DOCS:
        for opt, value in re.findall(r"`(--[a-z][a-z0-9-]*)(?: [A-Z_]+)? \[([^\]]+)\]`", doc.read_text()):
            if opt in defaults and value not in defaults[opt]:
                wrong.append(f"{doc.name}: {opt} [{value}], the commands say {sorted(defaults[opt])}")
    assert not wrong, wrong
