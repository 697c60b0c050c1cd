"""Every check of the metaflow-sandbox monorepo, as nox sessions (``nox -l`` lists them).

Test sessions install the *built wheels* of our distributions, the way users get them (editable
installs hide packaging mistakes, and older Metaflow loses extension ordering with them). Wheels
are built once per source state and shared by all sessions of a run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.error_on_missing_interpreters = True

# uv installs without bytecode; with PYTHONDONTWRITEBYTECODE set as well, every flow task of the
# e2e cells would compile Metaflow from source again (~0.5 s a process). Let the venvs cache it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

ROOT = Path(__file__).resolve().parent
WHEELHOUSE = ROOT / ".nox" / "_wheels"
PYTEST = ["pytest", "pytest-xdist"]
XDIST = ["-n", "auto", "-p", "no:cacheprovider"]

# Our distributions: short name -> directory under packages/ (the distribution name).
PACKAGES = {
    "core": "metaflow-sandbox-core",
    "daytona": "metaflow-sandbox-daytona",
    "e2b": "metaflow-sandbox-e2b",
    "modal": "metaflow-sandbox-modal",
    "plugins": "metaflow-sandbox",
}
# What a backend needs installed, and the SDK it wraps.
BACKEND_PACKAGES = {
    "local": ["core"],
    "daytona": ["core", "daytona"],
    "e2b": ["core", "e2b"],
    "modal": ["core", "modal"],
}
SDK = {"daytona": "daytona", "e2b": "e2b", "modal": "modal"}

# The supported SDK range of each provider backend: the oldest and the newest are tested. A cell
# whose requirement names another project (a deprecated alias) installs our backend without deps.
SDK_VERSIONS: dict[str, dict[str, str]] = {
    # 0.150: first SDK that routes toolbox calls through each sandbox's toolboxProxyUrl (what
    # Daytona serves today); 0.226.1: newest checked; the deprecated alias `daytona-sdk` alone.
    "daytona": {"oldest": "daytona==0.150.0", "latest": "daytona==0.226.1", "alias": "daytona-sdk==0.226.1"},
    # 2.7: first SDK with E2B_SANDBOX_URL (pointable at the emulator); 2.63: newest checked.
    "e2b": {"oldest": "e2b==2.7.0", "latest": "e2b==2.63.0"},
    # 1.5.0: oldest checked (creates through V1 only); 1.6.4: newest checked (V2 by default).
    "modal": {"oldest": "modal==1.5.0", "latest": "modal==1.6.4"},
}
# Extra test dependencies per backend (emulators, fixtures).
TEST_DEPS: dict[str, list[str]] = {"local": [], "daytona": ["aiohttp"], "e2b": ["aiohttp"], "modal": []}

# Metaflow releases every backend is tested against (one e2e cell each): the latest patch of every
# supported minor line, plus the releases where Metaflow internals our shims bridge change
# (plugins/compat.py names them). A new Metaflow release is one line here; `matrix_fresh` fails
# when PyPI has a minor line newer than this list.
METAFLOW_VERSIONS = [
    "2.12.0",  # oldest supported: `metaflow.metadata`, no configs, no Decorator.init
    "2.12.39",
    "2.13.10",
    "2.14.3",
    "2.15.0",  # last flat code package without the `flush_mflogs` bash helper
    "2.15.21",  # last flat code package
    "2.16.0",  # first `.mf_code`/`.mf_meta` code package, package metadata
    "2.16.8",
    "2.17.5",
    "2.18.13",
    "2.19.22",  # last release before the `*_ctx` decorator hooks
    "2.19.39",
]


def present(short: str) -> bool:
    return (ROOT / "packages" / PACKAGES[short] / "pyproject.toml").exists()


BACKENDS = [name for name, parts in BACKEND_PACKAGES.items() if all(map(present, parts))]


def _source_digest() -> str:
    digest = hashlib.sha256()
    for dist in sorted(PACKAGES.values()):
        base = ROOT / "packages" / dist
        for path in sorted(p for p in base.rglob("*") if p.is_file() and "tests" not in p.relative_to(base).parts):
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def wheels(session: nox.Session, *shorts: str) -> list[str]:
    """Paths of the built wheels of ``shorts``, each built once per source state of all our packages
    (a session that needs two packages does not wait for the other two to build)."""
    out = WHEELHOUSE / _source_digest()
    out.mkdir(parents=True, exist_ok=True)
    found = []
    for short in shorts:
        stem = PACKAGES[short].replace("-", "_")
        matches = sorted(out.glob(f"{stem}-*.whl"))
        if not matches:
            # Build beside the wheelhouse, then move the wheel in: a concurrent nox never sees half a file.
            tmp = out.with_name(f"{out.name}.{short}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            session.run(
                sys.executable, "-m", "uv", "build", "--wheel", "--quiet", "--out-dir", str(tmp),
                str(ROOT / "packages" / PACKAGES[short]), external=True,
            )  # fmt: skip
            for wheel in tmp.glob("*.whl"):
                os.replace(wheel, out / wheel.name)
            shutil.rmtree(tmp, ignore_errors=True)
            matches = sorted(out.glob(f"{stem}-*.whl"))
        if not matches:
            session.error(f"No wheel for {PACKAGES[short]} in {out}")
        found.append(str(matches[-1]))
    return found


def show_versions(session: nox.Session, *names: str) -> None:
    session.run("python", "-c", f"import importlib.metadata as m; [print(n, m.version(n)) for n in {list(names)!r}]")


@nox.session(tags=["quick"])
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["quick"])
def typecheck(session: nox.Session) -> None:
    """mypy: strict on core, checked everywhere else."""
    session.install("mypy", "pytest")
    srcs = [str(ROOT / "packages" / PACKAGES[s] / "src") for s in PACKAGES if present(s)]
    parts = [f"metaflow_extensions.sandbox.{s}" for s in PACKAGES if present(s)]
    args = [arg for part in parts for arg in ("-p", part)]
    session.run("mypy", *args, env={"MYPYPATH": os.pathsep.join(srcs)})


@nox.session(tags=["quick"])
def structural(session: nox.Session) -> None:
    """Layer rules, module docstrings, lazy SDK imports and wheel metadata."""
    shorts = [s for s in PACKAGES if present(s)]
    ours = wheels(session, *shorts)
    session.install(*PYTEST, "metaflow", *ours)
    session.run("pytest", *XDIST, "tests-shared/structural", env={"MFSBX_WHEELHOUSE": str(Path(ours[0]).parent)})


@nox.session(tags=["portable"])
@nox.parametrize(
    "package",
    [nox.param(s, id=s) for s in PACKAGES if present(s) and (ROOT / "packages" / PACKAGES[s] / "tests").is_dir()],
)
def unit(session: nox.Session, package: str) -> None:
    """Unit tests of one distribution, against its built wheel."""
    needs = BACKEND_PACKAGES.get(package, ["core", package] if package != "core" else ["core"])
    extra = TEST_DEPS.get(package, []) + (["metaflow"] if package == "plugins" else [])
    session.install(*PYTEST, *extra, *wheels(session, *dict.fromkeys(needs)))
    session.run("pytest", *XDIST, f"packages/{PACKAGES[package]}/tests", *session.posargs)


def _conformance_cells() -> list[object]:
    cells: list[object] = []
    for backend in BACKENDS:
        versions = SDK_VERSIONS.get(backend) or {"default": ""}
        cells += [nox.param(backend, label) for label in versions]
    return cells


@nox.session(tags=["portable"])
@nox.parametrize("backend,sdk", _conformance_cells())
def conformance(session: nox.Session, backend: str, sdk: str) -> None:
    """The backend conformance suite (provider backends against their wire emulators)."""
    requirement = SDK_VERSIONS.get(backend, {}).get(sdk, "")
    ours = wheels(session, *BACKEND_PACKAGES[backend])
    if requirement and not requirement.startswith(SDK[backend] + "=="):
        # A deprecated alias of the SDK: our backend must work with it alone.
        session.install(*PYTEST, *TEST_DEPS[backend], requirement, *ours[:-1])
        session.install("--no-deps", ours[-1])
    else:
        session.install(*PYTEST, *TEST_DEPS[backend], *ours, *([requirement] if requirement else []))
    show_versions(
        session, *(["daytona-sdk" if "daytona-sdk" in requirement else SDK[backend]] if backend in SDK else [])
    )
    session.run("pytest", *XDIST, f"tests-shared/conformance/test_{backend}.py", *session.posargs)


@nox.session
def modal_emulator(session: nox.Session) -> None:
    """The Modal wire emulator through the real `modal` SDK (its own session: its tests read the
    emulator's global counters and faults, which the backend's tests running alongside would move)."""
    session.install(*PYTEST, SDK_VERSIONS["modal"]["latest"], *wheels(session, "core"))
    show_versions(session, "modal")
    session.run("pytest", *XDIST, "tests-shared/conformance/test_modal_emulator.py", *session.posargs)


EXAMPLE_BACKEND = ROOT / "docs" / "examples" / "metaflow-sandbox-tmpdir"


@nox.session(tags=["portable"])
def example_backend(session: nox.Session) -> None:
    """The example third-party backend, built as a wheel, against core's shipped conformance suite."""
    out = Path(session.create_tmp()) / "example-wheel"
    shutil.rmtree(out, ignore_errors=True)
    session.run(sys.executable, "-m", "uv", "build", "--wheel", "--quiet", "--out-dir", str(out),
                str(EXAMPLE_BACKEND), external=True)  # fmt: skip
    core = wheels(session, "core")[0]
    # Core's wheel satisfies the example's dependency: nothing of this repository but wheels.
    session.install(*PYTEST, f"metaflow-sandbox-core[testing] @ file://{core}", *map(str, out.glob("*.whl")))
    session.run("pytest", *XDIST, "--rootdir", str(EXAMPLE_BACKEND), str(EXAMPLE_BACKEND / "tests"), *session.posargs)


# Backends whose flows run on the oldest and the newest Metaflow release only (CI time: the
# integration beneath every backend is the same, and three other backends cover every line).
EDGES_ONLY = {"modal"}
# Releases listed for a boundary of our Metaflow shims, not for a minor line of their own: the shims
# are the integration's, the same whatever the backend beneath, so `local` crosses these boundaries
# and the providers run every minor line (a release on each side of each boundary) without them.
SHIM_BOUNDARIES = {"2.15.0", "2.16.0", "2.19.22"}


def e2e_releases(backend: str) -> list[str]:
    if backend in EDGES_ONLY:
        return [METAFLOW_VERSIONS[0], METAFLOW_VERSIONS[-1]]
    if backend == "local":
        return METAFLOW_VERSIONS
    return [v for v in METAFLOW_VERSIONS if v not in SHIM_BOUNDARIES]


E2E_CELLS = [
    nox.param(backend, metaflow, id=f"backend='{backend}', metaflow='{metaflow}'")
    for backend in BACKENDS
    for metaflow in e2e_releases(backend)
]


@nox.session
@nox.parametrize("backend,metaflow", E2E_CELLS)
def e2e(session: nox.Session, backend: str, metaflow: str) -> None:
    """Real Metaflow flows with @sandbox on one backend and one Metaflow release."""
    if not present("plugins"):
        session.skip("packages/metaflow-sandbox is not in this tree yet")
    # uv: the `--environment=uv` flow bootstraps its project with the uv next to the launcher's Python.
    session.install(
        *PYTEST,
        *TEST_DEPS[backend],
        "uv",
        f"metaflow=={metaflow}",
        *wheels(session, *BACKEND_PACKAGES[backend], "plugins"),
    )
    show_versions(session, "metaflow")
    # Between the oldest and the newest release, only what our Metaflow shims touch runs again:
    # signals, faults, refusals and attacks behave the same on every release (CI time).
    edges = [] if metaflow in (METAFLOW_VERSIONS[0], METAFLOW_VERSIONS[-1]) else ["-m", "not edges"]
    session.run(
        "pytest", *XDIST, *edges, "tests-shared/e2e", *session.posargs, env={"MFSBX_E2E_BACKEND": backend}
    )  # fmt: skip


# Remote datastores (S3 through moto_server), kept lean for CI: `local` on the oldest and the
# newest supported Metaflow, Daytona (through its emulator) on the newest.
REMOTE_CELLS = [
    nox.param(backend, metaflow)
    for backend, metaflow in (
        ("local", METAFLOW_VERSIONS[0]),
        ("local", METAFLOW_VERSIONS[-1]),
        ("daytona", METAFLOW_VERSIONS[-1]),
    )
    if backend in BACKENDS
]


@nox.session
@nox.parametrize("backend,metaflow", REMOTE_CELLS)
def remote(session: nox.Session, backend: str, metaflow: str) -> None:
    """Flows on S3 (moto_server) and the metadata service (metaflow-local-service), steps in sandboxes."""
    session.install(
        *PYTEST, *TEST_DEPS[backend], "moto[server]", f"metaflow=={metaflow}",
        *wheels(session, *BACKEND_PACKAGES[backend], "plugins"),
    )  # fmt: skip
    show_versions(session, "metaflow", "moto", "boto3")
    # The metadata service is a deployment of its own: it runs in its own environment, with the
    # Metaflow it needs (metaflow-local-service imports modules that Metaflow 2.12.0 lacks).
    service = ROOT / ".nox" / "_metadata_service"  # shared by the remote cells (not create_tmp: it moves TMPDIR)
    service_python = str(service / "bin" / "python")
    session.run(sys.executable, "-m", "uv", "venv", "--quiet", "--allow-existing", str(service), external=True)
    session.run(sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python", service_python,
                "metaflow-local-service", "metaflow", external=True)  # fmt: skip
    # worksteal: the two long flow tests live in one file; a free worker takes the second one.
    session.run(
        "pytest", *XDIST, "--dist", "worksteal", "tests-shared/remote", *session.posargs,
        env={"MFSBX_E2E_BACKEND": backend, "MFSBX_METADATA_SERVICE_PYTHON": service_python},
    )  # fmt: skip


@nox.session(default=False, tags=["live"])
def live(session: nox.Session) -> None:
    """Tests against the real providers (``-m live``); each is skipped unless its API key is set."""
    shorts = dict.fromkeys(["core", "plugins", *(p for b in BACKENDS for p in BACKEND_PACKAGES[b])])
    deps = [d for b in BACKENDS for d in TEST_DEPS[b]]
    session.install(*PYTEST, "metaflow", *deps, *wheels(session, *shorts))
    session.run("pytest", *XDIST, "-m", "live", "tests-shared/conformance", "tests-shared/e2e", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks: flows plain vs sandboxed (writes docs/benchmarks.md), and each backend's fixed cost."""
    backends = [b for b in BACKENDS if b != "local"]
    shorts = dict.fromkeys(["core", "plugins", *(p for b in backends for p in BACKEND_PACKAGES[b])])
    emulators = [dep for b in backends for dep in TEST_DEPS[b]]
    session.install("metaflow", "pytest", *emulators, *wheels(session, *shorts))  # pytest: the emulator fixtures
    session.run("python", "tests-shared/bench/bench_sandbox.py", "--out", "docs/benchmarks.md", *session.posargs)
    session.run("python", "tests-shared/bench/bench_backend_overhead.py")


@nox.session(python=False, tags=["network"])
def matrix_fresh(session: nox.Session) -> None:
    """Fail when PyPI has a Metaflow minor line newer than METAFLOW_VERSIONS covers (needs PyPI)."""
    import json
    import urllib.request

    with urllib.request.urlopen("https://pypi.org/pypi/metaflow/json", timeout=60) as answer:
        released = [v for v in json.load(answer)["releases"] if v.replace(".", "").isdigit()]

    def minor(version: str) -> tuple[int, int]:
        major, minor_, *_ = (int(x) for x in version.split("."))
        return major, minor_

    newest = max(released, key=lambda v: tuple(int(x) for x in v.split(".")))
    covered = max(minor(v) for v in METAFLOW_VERSIONS)
    session.log(f"newest Metaflow on PyPI: {newest}; newest line in the matrix: {covered}")
    if minor(newest) > covered:
        session.error(f"Metaflow {newest} is out: add its line to METAFLOW_VERSIONS in noxfile.py.")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the demo on the local backend (the README's demo command)."""
    if present("plugins") and (ROOT / "docs/examples/demo_flow.py").exists():
        session.install("metaflow", *wheels(session, "core", "plugins"))
        session.chdir(session.create_tmp())
        session.run("python", str(ROOT / "docs/examples/demo_flow.py"), "run", env={"USERNAME": "demo"})
    else:
        session.install(*wheels(session, "core"))
        session.run("python", str(ROOT / "docs/examples/hello_sandbox.py"))
