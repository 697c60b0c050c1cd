"""``metaflow-sandbox doctor [--backend NAME]``: is this machine ready to run sandboxes, and if not,
what fixes it.

Layer: core (bottom; the console script of metaflow-sandbox-core). Imports: the standard library
and core (``registry``, ``backend``, ``spec``, ``errors``, ``local.isolation``). Never Metaflow: the integration
adds its own checks through the entry point group ``metaflow_sandbox.doctor`` (each entry point is
a callable taking no argument and returning findings).

For each backend asked about it checks, in order, stopping at the first failure of a backend
(later checks could only fail for the same reason): the backend is installed, its SDK is in the
range its distribution declares, it is configured (credentials: constructing it raises the
backend's own ``ConfigurationError``, which names the variable), its API answers (one timed
``list``), and a sandbox can be created, run a command and be destroyed (and is no longer listed).
For ``local`` it also reports whether bubblewrap isolates. Then the code cache's size. The exit
status is 0 only when nothing failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backend import SandboxBackend
from .errors import BackendNotFound, ConfigurationError, SandboxError
from .provider import requirements, satisfies
from .registry import BACKEND_ENV, ENTRY_POINT_GROUP, backend_class, default_backend, get_backend
from .spec import SandboxSpec

CODE_CACHE_MB_ENV = "METAFLOW_SANDBOX_CODE_CACHE_MB"
CODE_CACHE_DEFAULT_MB = 1024
"""The Metaflow integration's code cache keeps at most this much (least recently used out first)."""
DOCTOR_ENTRY_POINT_GROUP = "metaflow_sandbox.doctor"
DOCTOR_LABEL = "metaflow-sandbox-doctor"
"""Label on the sandbox the doctor creates, so that it finds exactly that one again."""
OWN_PREFIX = "metaflow-sandbox"
"""Our own distributions: their versions move together, so only third-party requirements are checked."""


@dataclass(frozen=True)
class Finding:
    """One line of the report. ``status``: ``ok``, ``info`` (nothing to fix) or ``fail``."""

    check: str
    status: str
    detail: str
    fix: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def requirement_findings(dist: str, label: str, aliases: Mapping[str, str] | None = None) -> list[Finding]:
    """Each third-party requirement ``dist`` declares (``Requires-Dist``, extras left out) against
    the version installed; ``aliases``: another name a requirement may be installed under."""
    findings = []
    for name, specifier, marker in requirements(dist):
        if name.lower().startswith(OWN_PREFIX) or "extra" in marker:
            continue
        wanted = f"{name}{specifier}"
        installed = name
        for candidate in (name, (aliases or {}).get(name)):
            if candidate is None:
                continue
            try:
                version = importlib.metadata.version(candidate)
            except importlib.metadata.PackageNotFoundError:
                continue
            installed = candidate
            break
        else:
            fix = f"pip install '{wanted}'"
            findings.append(Finding(f"{label}: {name}", "fail", f"not installed ({dist} needs {wanted})", fix))
            continue
        shown = installed if installed == name else f"{installed} (an alias of {name})"
        if satisfies(version, specifier):
            findings.append(Finding(f"{label}: {name}", "ok", f"{shown} {version} (supported: {specifier or 'any'})"))
        else:
            detail = f"{shown} {version} is outside the supported range {specifier}"
            findings.append(Finding(f"{label}: {name}", "fail", detail, f"pip install '{wanted}'"))
    return findings


# -- the checks ------------------------------------------------------------------------------------


def installed_findings() -> list[Finding]:
    """The installed backends, the distribution providing each and its SDK requirements."""
    entries = {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    findings = []
    for name in sorted(entries):
        dist = entries[name].dist
        if dist is None:
            findings.append(Finding(f"{name}: installed", "ok", "registered (distribution unknown)"))
            continue
        dist_name = dist.metadata["Name"]
        findings.append(Finding(f"{name}: installed", "ok", f"{dist_name} {dist.version}"))
        try:
            aliases = backend_class(name).sdk_aliases
        except ConfigurationError:
            aliases = {}  # reported with its fix when the backend is checked in depth
        findings += requirement_findings(dist_name, name, aliases)
    return findings


def _userns_detail() -> str:
    """What the kernel says about unprivileged user namespaces (why bubblewrap may not work)."""
    facts = []
    for path, what in (
        ("/proc/sys/user/max_user_namespaces", "max_user_namespaces"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "unprivileged_userns_clone"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "apparmor_restrict_unprivileged_userns"),
    ):
        try:
            facts.append(f"{what}={Path(path).read_text().strip()}")
        except OSError:
            continue
    return ", ".join(facts) or "no user namespace settings readable"


def isolation_findings(backend: Any, options: Mapping[str, Any]) -> list[Finding]:
    """Whether the ``local`` backend isolates commands with bubblewrap here."""
    from .local.isolation import ISOLATION_ENV, bwrap_problem

    problem = bwrap_problem()
    userns = _userns_detail()
    if backend.isolation == "bwrap":
        return [Finding("local: isolation", "ok", f"bubblewrap works ({userns})")]
    requested = options.get("isolation") or os.environ.get(ISOLATION_ENV)
    if requested == "process":
        return [Finding("local: isolation", "ok", f"plain processes, as {ISOLATION_ENV}=process asks")]
    if problem and "not on PATH" in problem:
        fix = "sudo apt-get install -y bubblewrap (Fedora: sudo dnf install bubblewrap)"
    else:
        fix = (
            "enable unprivileged user namespaces (Ubuntu >= 24.04: sudo sysctl -w "
            "kernel.apparmor_restrict_unprivileged_userns=0; in a container: --privileged or a seccomp "
            f"profile allowing unshare); or export {ISOLATION_ENV}=process to accept no isolation"
        )
    return [Finding("local: isolation", "fail", f"commands run as plain processes: {problem} ({userns})", fix)]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _error_finding(check: str, error: SandboxError, fallback_fix: str) -> Finding:
    return Finding(check, "fail", error.message, error.remedy or fallback_fix)


NETWORK_FIX = "check the network and the backend's API URL, then run the doctor again"


def backend_findings(name: str, options: Mapping[str, Any] | None = None) -> list[Finding]:
    """Configuration, API, and a sandbox's whole life on the backend ``name``."""
    options = dict(options or {})
    try:
        backend_class(name)
    except BackendNotFound as e:
        return [_error_finding(f"{name}: installed", e, "")]
    except ConfigurationError as e:
        return [_error_finding(f"{name}: importable", e, "")]
    try:
        backend = get_backend(name, **options)
    except ConfigurationError as e:
        return [_error_finding(f"{name}: configured", e, f"see the {name} backend's documentation")]
    shown = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    accepted = f"credentials and options accepted{f' ({shown})' if shown else ''}"
    findings = [Finding(f"{name}: configured", "ok", accepted)]
    if name == "local":
        findings += isolation_findings(backend, options)
    labels = {DOCTOR_LABEL: uuid.uuid4().hex[:12]}
    started = time.monotonic()
    try:
        backend.list(labels)
    except SandboxError as e:
        return [*findings, _error_finding(f"{name}: API", e, NETWORK_FIX)]
    findings.append(Finding(f"{name}: API", "ok", f"listing sandboxes took {_ms(time.monotonic() - started)}"))
    return findings + lifecycle_findings(name, backend, labels)


def lifecycle_findings(name: str, backend: SandboxBackend, labels: dict[str, str]) -> list[Finding]:
    """Create a sandbox labelled ``labels``, run a command, destroy it and check it is gone."""
    started = time.monotonic()
    try:
        sandbox = backend.create(SandboxSpec(labels=labels, lifetime_s=600))
    except SandboxError as e:
        return [_error_finding(f"{name}: sandbox", e, NETWORK_FIX)]
    created = time.monotonic() - started
    findings = []
    try:
        started = time.monotonic()
        result = sandbox.run("echo metaflow-sandbox-doctor", timeout_s=120)
        ran = time.monotonic() - started
    except SandboxError as e:
        findings.append(_error_finding(f"{name}: sandbox", e, NETWORK_FIX))
    else:
        if (result.exit_code, result.stdout) == (0, "metaflow-sandbox-doctor\n"):
            timings = f"{sandbox.id} created in {_ms(created)}, ran a command in {_ms(ran)}"
            findings.append(Finding(f"{name}: sandbox", "ok", timings))
        else:
            answer = f"`echo` exited {result.exit_code} with {result.stdout + result.stderr!r}"
            findings.append(Finding(f"{name}: sandbox", "fail", answer, NETWORK_FIX))
    started = time.monotonic()
    try:
        sandbox.destroy()
        left = backend.list(labels)
    except SandboxError as e:
        return [*findings, _error_finding(f"{name}: destroyed", e, NETWORK_FIX)]
    if left:
        ids = ", ".join(info.id for info in left)
        fix = f"remove it in the provider's console; report this as a bug of the {name} backend"
        return [*findings, Finding(f"{name}: destroyed", "fail", f"{ids} is still listed after destroy", fix)]
    findings.append(Finding(f"{name}: destroyed", "ok", f"in {_ms(time.monotonic() - started)}, no longer listed"))
    return findings


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for file in files:
            try:
                total += os.lstat(os.path.join(root, file)).st_size
            except OSError:
                continue  # removed while we walk: a concurrent run's cache expiry
    return total


def code_cache_dir() -> Path:
    """Where the Metaflow integration caches code packages (unpacked, and as archives), per user."""
    return Path(tempfile.gettempdir()) / f"metaflow-sandbox-code-{os.getuid()}"


def code_cache_limit_mb() -> int:
    """The code cache's bound in MiB: ``$METAFLOW_SANDBOX_CODE_CACHE_MB`` or the default."""
    raw = os.environ.get(CODE_CACHE_MB_ENV, "").strip()
    if not raw:
        return CODE_CACHE_DEFAULT_MB
    if not raw.isdigit():
        raise ConfigurationError(
            f"${CODE_CACHE_MB_ENV} must be a whole number of MiB; got {raw!r}.",
            remedy=f"Set it to e.g. {CODE_CACHE_DEFAULT_MB}, or unset it for the default.",
        )
    return int(raw)


def cache_findings() -> list[Finding]:
    """The size of the code cache the Metaflow integration keeps per user."""
    cache = code_cache_dir()
    if not cache.exists():
        return [Finding("code cache", "info", f"{cache} does not exist yet")]
    size = _size(cache)
    return [
        Finding(
            "code cache",
            "info",
            f"{cache}: {size / 2**20:.1f} MiB",
            f"kept under ${CODE_CACHE_MB_ENV} MiB (default {CODE_CACHE_DEFAULT_MB}), least recently used out "
            f"first; to free the space now, when no run is going: rm -rf {cache}",
        )
    ]


def extension_findings() -> list[Finding]:
    """Checks other distributions add (the Metaflow integration: Metaflow's version, the datastore)."""
    findings = []
    for entry in importlib.metadata.entry_points(group=DOCTOR_ENTRY_POINT_GROUP):
        try:
            check: Callable[[], Iterable[Finding]] = entry.load()
            findings += list(check())
        except Exception as e:  # a broken extension is itself a finding, not a crash
            findings.append(
                Finding(
                    f"{entry.name}: checks",
                    "fail",
                    f"{entry.value} failed: {e!r}",
                    f"reinstall the distribution providing {entry.value}",
                )
            )
    return findings


def run_doctor(backends: Mapping[str, Mapping[str, Any]], *, extensions: bool = True) -> list[Finding]:
    """Every finding, for ``backends`` (name -> backend options)."""
    findings = installed_findings()
    if extensions:
        findings += extension_findings()
    for name, options in backends.items():
        findings += backend_findings(name, options)
    return findings + cache_findings()


def report(findings: Sequence[Finding], write: Callable[[str], None] = print) -> int:
    """Print ``findings`` one a line (a failure's fix below it); return the exit status."""
    marks = {"ok": "ok  ", "info": "info", "fail": "FAIL"}
    for finding in findings:
        write(f"{marks.get(finding.status, finding.status)}  {finding.check}: {finding.detail}")
        if finding.fix and finding.status != "ok":
            write(f"      {'fix' if finding.failed else 'note'}: {finding.fix}")
    failed = sum(finding.failed for finding in findings)
    write("All is well." if not failed else f"{failed} problem{'s' if failed > 1 else ''} found.")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metaflow-sandbox", description="metaflow-sandbox tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser(
        "doctor", help="Check that sandboxes work here; each problem comes with its fix (exit status 1 if any)."
    )
    doctor.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help=f"A backend to check in depth (repeatable; default: ${BACKEND_ENV} or local).",
    )
    args = parser.parse_args(argv)
    names = args.backend or [default_backend()]
    return report(run_doctor({name: {} for name in names}))


if __name__ == "__main__":
    sys.exit(main())
