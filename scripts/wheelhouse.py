"""Download the wheels of everything the project needs besides torch, for another machine.

    python scripts/wheelhouse.py [--dest wheelhouse] [--python-version 3.12] [--all]
    make wheelhouse [WHEEL_PYTHON=3.12] [WHEELHOUSE_ALL=1]

For a GPU node without network: carry ``wheelhouse/`` there and `scripts/gpu_check.sh` installs
what that Python lacks with ``pip install --no-index``. The pins are requirements/wheelhouse.txt
(and, with --all, requirements/wheelhouse-common.txt). A package published only as an sdist
(antlr4-python3-runtime 4.9.3) is built into a wheel here and must come out pure Python.
At the end every wheel's dependencies are checked against the wheelhouse (torch excepted; without
--all also the common packages) and the size is compared with a 64 MiB transfer budget.
What the user can fix (a bad option, a pin pip cannot fetch, a missing dependency, the budget)
ends with one line, ``error: ...``, and exit status 2, pip's own output above it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from pkm_lm import cli
from pkm_lm.errors import ConfigError, NotFoundError, UserError

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "requirements" / "wheelhouse.txt"
COMMON = ROOT / "requirements" / "wheelhouse-common.txt"
BUDGET_MIB = 64
PLATFORMS = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
]  # fmt: skip


def read_requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def pip_failed(proc: subprocess.CompletedProcess, what: str) -> NotFoundError:
    """pip's last words on stderr, and the error that names what failed."""
    print(proc.stderr[-2000:], file=sys.stderr)
    return NotFoundError(f"{what} (pip's output above)")


def fetch(req: Requirement, dest: Path, python_version: str, platforms: list[str]) -> str:
    """One pinned requirement into ``dest``: a binary wheel for the target if there is one,
    else the sdist built here (accepted only if the result is pure Python)."""
    target = ["--python-version", python_version, "--implementation", "cp"]
    target += [arg for p in platforms for arg in ("--platform", p)]
    proc = pip("download", "--no-deps", "--only-binary=:all:", *target, "-d", str(dest), str(req))
    if proc.returncode == 0:
        return "wheel"
    if "No matching distribution" not in proc.stderr:
        raise pip_failed(proc, f"pip download {req} failed")
    with tempfile.TemporaryDirectory() as tmp:
        proc = pip("wheel", "--no-deps", "--no-binary=:all:", "-w", tmp, str(req))
        if proc.returncode != 0:
            raise pip_failed(proc, f"no wheel of {req} for the target and building it failed")
        (built,) = Path(tmp).glob("*.whl")
        if not built.name.endswith("-none-any.whl"):
            raise UserError(f"{req} has no wheel for the target and builds a binary one here "
                            f"({built.name}): it cannot be carried; pin a version with one")  # fmt: skip
        built.replace(dest / built.name)
    return "built from sdist"


def check_closure(dest: Path, python_version: str, allowed: set[str]) -> list[str]:
    """Requirements of the wheels that neither the wheelhouse nor ``allowed`` satisfies."""
    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               implementation_name="cpython", platform_python_implementation="CPython")  # fmt: skip
    wheels = {parse_wheel_filename(w.name)[0]: w for w in dest.glob("*.whl")}
    problems = []
    for name, wheel in sorted(wheels.items()):
        with zipfile.ZipFile(wheel) as zf:
            meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in wheels and dep not in allowed:
                problems.append(f"{name} needs {req}, which is not in {dest}")
    return problems


@cli.main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default="wheelhouse")
    p.add_argument("--python-version", default="3.12", help="of the machine that installs them")
    p.add_argument("--platform", nargs="+", default=PLATFORMS, help="pip --platform tags")
    p.add_argument("--all", action="store_true", help="also numpy, tqdm, matplotlib, "
                   "sentencepiece, pytest (usually shipped with torch)")  # fmt: skip
    args = p.parse_args()
    if not args.python_version.replace(".", "").isdigit() or "." not in args.python_version:
        raise ConfigError(
            f"--python-version={args.python_version} is invalid: use MAJOR.MINOR, e.g. 3.12"
        )
    dest = ROOT / args.dest if not Path(args.dest).is_absolute() else Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    reqs = read_requirements(BASE)
    common = read_requirements(COMMON)
    if args.all:
        reqs += common
    wanted = {canonicalize_name(r.name) for r in reqs}
    for stale in dest.glob("*.whl"):  # other versions or packages from an earlier run
        name, version, *_ = parse_wheel_filename(stale.name)
        pins = {canonicalize_name(r.name): r.specifier for r in reqs}
        if name not in wanted or not pins[name].contains(version):
            stale.unlink()
    for req in reqs:
        print(f"{req}: {fetch(req, dest, args.python_version, args.platform)}", flush=True)
    allowed = {"torch"} | (set() if args.all else {canonicalize_name(r.name) for r in common})
    problems = check_closure(dest, args.python_version, allowed)
    size = sum(w.stat().st_size for w in dest.glob("*.whl")) / 2**20
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True).stdout
    repo = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and
               (ROOT / f).is_file()) / 2**20  # fmt: skip
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {size:.1f} MiB; with the "
          f"repository's tracked files ({repo:.1f} MiB): {size + repo:.1f} MiB of a "
          f"{BUDGET_MIB} MiB transfer budget")  # fmt: skip
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise UserError(
            f"{len(problems)} dependencies are not in {dest} (listed above): pin them in "
            f"{BASE.relative_to(ROOT)} or {COMMON.relative_to(ROOT)}"
        )
    if size + repo > BUDGET_MIB:
        raise UserError(
            f"wheelhouse + repository exceed {BUDGET_MIB} MiB: drop --all, or carry less"
        )


if __name__ == "__main__":
    main()
