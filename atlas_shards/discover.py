"""Find the scans of an ATLAS release on disk, whatever its layout.

One rule covers every release: a scan folder holds one T1 image and one or
more lesion masks (file names containing ``lesion``); an optional brain mask
(``brain`` and ``mask`` in the name) is used instead of an estimated one.
Hidden files and folders, macOS ``._*`` debris and ``__MACOSX`` are ignored.
Identities (subject, session, cohort) come from the naming scheme of the
release the folder belongs to:

- R1.1: ``Site{n}/{id:06d}/t0{k}/{id}_t1w_deface_stx.nii.gz``
- R1.2 standard: ``c00XX/c00XXsYYYYtZZ/c00XXsYYYYtZZ_t1w_stx.nii.gz``
- R1.2 native: ``native/native_{1,2}/c00XX/c00XXsYYYYtZZ/<any T1 name>``
- v2.0: ``{Training,Testing}/R0XX/sub-r0XXsYYY/ses-1/anat/sub-..._T1w.nii.gz``
  (``Testing`` scans have no masks and stay out of the split)
- anything else with the same folder rule: a generic scan named by its folder.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

_V20 = re.compile(r"^(sub-[A-Za-z0-9]+)_(ses-[A-Za-z0-9]+)_")
_R12 = re.compile(r"^(c\d{4}s\d{4})(t\d{2})$")
_R11_SITE = re.compile(r"^Site\d+$", re.IGNORECASE)
_R11_SESSION = re.compile(r"^t\d{2}$")
_V20_COHORT = re.compile(r"^R\d{3}$")


class DiscoveryError(Exception):
    """The directory holds no recognisable release, or an ambiguous one."""


@dataclass
class ScanSource:
    """Where one scan's files are and who it belongs to.

    Paths are relative to the release root. ``problem`` is set when the scan
    cannot be used whatever its contents (no T1, no mask, duplicate id).
    """

    scan_id: str
    subject_id: str
    session: str
    cohort: str
    layout: str  # r1.1, r1.2, native, r2.0 or generic
    space: str  # mni or native
    t1: str | None
    masks: list[str] = field(default_factory=list)
    brain_mask: str | None = None
    labelled: bool = True
    ignored: list[str] = field(default_factory=list)
    problem: str | None = None


def is_nifti(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(".nii") or lower.endswith(".nii.gz")


def is_hidden(name: str) -> bool:
    """Dot files (``.DS_Store``), macOS AppleDouble ``._x`` and ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


def escaped(name: str) -> str:
    """A file name as text that can be printed and stored: bytes that are not UTF-8 as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def discover(root: str | os.PathLike, space: str = "auto", skipped: list[str] | None = None) -> list[ScanSource]:
    """List every scan folder under ``root``, sorted by scan id.

    Args:
        root: the release directory (or any folder above it).
        space: ``auto``, ``mni`` or ``native``; with ``auto`` a tree holding
            the same scans in both spaces (R1.2 unpacked whole) is refused, so
            the caller must choose.
        skipped: gets a line for each file or folder whose name is not UTF-8
            (escaped: ``escaped``), which is left out: such a name would break
            the store's JSON attributes and every later build.

    Raises:
        DiscoveryError: missing directory, no scans, or mixed spaces under auto.
    """
    root = Path(root)
    if not root.is_dir():
        raise DiscoveryError(f"{root}: not a directory")
    folders: dict[Path, list[str]] = defaultdict(list)
    skipped = [] if skipped is None else skipped
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if not is_hidden(name) and not _utf8(name):
                skipped.append(f"{escaped(os.path.join(dirpath, name))}: skipped, its name is not UTF-8")
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d) and _utf8(d))
        for name in sorted(filenames):
            if not is_hidden(name) and is_nifti(name) and _utf8(name):
                folders[Path(dirpath).relative_to(root)].append(name)
    scans = [_describe(rel, names) for rel, names in sorted(folders.items())]
    if not scans:
        raise DiscoveryError(
            f"{root}: no NIfTI scans found; expected an ATLAS release (R1.1, R1.2 standard/native or v2.0)"
        )
    twice = {s.scan_id for s in scans if s.space == "mni"} & {s.scan_id for s in scans if s.space == "native"}
    if space == "auto" and twice:
        raise DiscoveryError(
            f"{root}: holds the same scans in standard (MNI) and native space (e.g. {sorted(twice)[0]}); "
            "choose one with --space mni|native"
        )
    if space != "auto":
        scans = [s for s in scans if s.space == space]
        if not scans:
            raise DiscoveryError(f"{root}: no {space}-space scans found")
    _mark_duplicates(scans)
    return sorted(scans, key=lambda s: (s.scan_id, s.t1 or ""))


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk gives undecodable bytes as surrogates
        return False
    return True


def release_layout(scans: list[ScanSource]) -> str:
    """The most common layout among the scans (the release's layout)."""
    return Counter(s.layout for s in scans).most_common(1)[0][0]


def _describe(rel: Path, names: list[str]) -> ScanSource:
    lesion = [n for n in names if "lesion" in n.lower()]
    brain = [n for n in names if n not in lesion and "brain" in n.lower() and "mask" in n.lower()]
    others = [n for n in names if n not in lesion and n not in brain]
    t1, ignored, problem = _pick_t1(others)
    scan = _identify(rel, t1 or (lesion + brain + others)[0])
    scan.t1 = str(rel / t1) if t1 else None
    scan.masks = [str(rel / n) for n in lesion]
    scan.brain_mask = str(rel / brain[0]) if brain else None
    scan.ignored = [str(rel / n) for n in ignored + brain[1:]]
    if problem is None and t1 is None:
        problem = f"lesion mask(s) {', '.join(lesion)} but no T1 image in the folder"
    if problem is None and scan.labelled and not lesion:
        problem = "no lesion mask in the folder"
    scan.problem = problem
    return scan


def _pick_t1(candidates: list[str]) -> tuple[str | None, list[str], str | None]:
    """One candidate is the T1; among several, the single one naming T1 wins."""
    if len(candidates) <= 1:
        return (candidates[0] if candidates else None), [], None
    named = [n for n in candidates if "t1" in n.lower()]
    if len(named) == 1:
        return named[0], [n for n in candidates if n != named[0]], None
    return None, [], f"several candidate T1 images ({', '.join(candidates)}); cannot tell which is the T1"


def _identify(rel: Path, name: str) -> ScanSource:
    """Subject, session, cohort and layout from the folder path and file name."""
    parts = rel.parts
    m = _V20.match(name)
    if m:
        subject, session = m.groups()
        cohort = next((p for p in parts if _V20_COHORT.match(p)), "")
        return ScanSource(
            f"{subject}_{session}",
            subject,
            session,
            cohort,
            "r2.0",
            "mni" if "space-mni" in name.lower() else "native",
            None,
            labelled="Testing" not in parts,
        )
    for i, part in enumerate(parts):
        m = _R12.match(part)
        if m:
            native = any(p.lower().startswith("native") for p in parts[:i]) or "_stx" not in name.lower()
            cohort = parts[i - 1] if i else m.group(1)[:5]
            layout, space = ("native", "native") if native else ("r1.2", "mni")
            return ScanSource(part, m.group(1), m.group(2), cohort, layout, space, None)
    if len(parts) >= 3 and _R11_SITE.match(parts[-3]) and _R11_SESSION.match(parts[-1]):
        site, subject, session = parts[-3:]
        return ScanSource(
            f"{subject}_{session}", subject, session, site, "r1.1", "mni" if "_stx" in name.lower() else "native", None
        )
    scan_id = "_".join(parts) if parts else Path(name).name.split(".")[0]
    space = "mni" if ("_stx" in name.lower() or "space-mni" in name.lower()) else "native"
    return ScanSource(scan_id, scan_id, "", "", "generic", space, None)


def _mark_duplicates(scans: list[ScanSource]) -> None:
    """The first folder (by path) keeps a scan id; later ones are excluded."""
    first: dict[str, ScanSource] = {}
    for scan in sorted(scans, key=lambda s: s.t1 or (s.masks[0] if s.masks else "")):
        if scan.scan_id in first:
            other = first[scan.scan_id]
            scan.problem = scan.problem or f"duplicate scan id {scan.scan_id} (first found at {other.t1})"
        else:
            first[scan.scan_id] = scan
