"""docs/deploy.md against what it documents: every `visionloop` command and option it (and the two READMEs) names
exists in the CLI, every `make` target in the Makefile, every repository path and relative link resolves, the
manifest tables list every file of deploy/k8s with the kinds that file holds, the sizes are the ones
deploy/docker/README.md measured, the Terraform paragraph agrees with deploy/terraform's table of what validates
offline, and the Korean section maps each practice mission to commands. No tool beyond Python is needed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_docs_loop import anchors, prose, relative_links

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
KO_README = ROOT / "docs" / "ko" / "README.md"
README = ROOT / "README.md"
K8S = ROOT / "deploy" / "k8s"
KOREAN_HEADING = "## 한국어 안내"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}  # the other blocks are output, YAML or diagrams
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:deploy|docs|src|tests|\.github|\.ci)/[\w./-]*[\w/])")
SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")", "$("}
# an object as kubectl names it: job/visionloop-train, deployment visionloop-serve, ...
KUBECTL_OBJECT = re.compile(r"\b(job|deployment|service|statefulset|cronjob|pytorchjob)[/ ]([a-z][\w-]*)")
TERRAFORM_SECTION = "## 6. Terraform: EKS with a GPU node group"


def section(text: str, heading: str) -> str:
    """From ``heading`` (a whole line) to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(f"\n{heading}\n") + 1
    following = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE)
    end = following.search(text, start + len(heading))
    return text[start : end.start() if end else len(text)]


def shell_lines(text: str) -> list[str]:
    """The command lines of the Markdown: each line of its code blocks (comments and continuations handled) and
    each inline code span."""
    lines = []
    for info, block in FENCE.findall(text):
        if info.strip() not in SHELL_BLOCKS:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(re.sub(r"(^|\s)#\s.*$", "", line))
    lines += INLINE.findall(FENCE.sub("", text))
    return [line.strip() for line in lines if line.strip()]


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, as argv without leading VAR=value assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: an inline span that is not shell, e.g. a JSON fragment
        return []
    found, current, redirected = [], [], False
    for word in [*words, ";"]:
        if redirected:  # the file of a redirection
            redirected = False
        elif set(word) <= set("<>"):
            redirected = True
        elif word in SEPARATORS or set(word) <= set("&|;()"):
            while current and re.fullmatch(r"[A-Za-z_]\w*=.*", current[0]):
                current.pop(0)
            if current:
                found.append(current)
            current = []
        else:
            current.append(word)
    return found


def invocations(path: Path, program: str) -> list[list[str]]:
    """Every argv of ``program`` (also as .venv/bin/program) in the file's code blocks and inline code."""
    found = []
    for line in shell_lines(path.read_text()):
        for argv in commands(line):
            if argv[0] == program or argv[0].endswith(f"/bin/{program}"):
                found.append(argv[1:])
    return found


def check_cli(argv: list[str], root: Any) -> str | None:
    """None when ``visionloop ARGV`` names a real command and only options that command has; else the problem."""
    command, words = root, list(argv)
    while words:
        word = words.pop(0)
        if word.startswith("-"):
            if word == "--help":
                continue
            name = word.split("=", 1)[0]
            params = {opt: p for p in command.params for opt in (*p.opts, *getattr(p, "secondary_opts", ()))}
            if name not in params:
                return f"`{command.name}` has no option {name}"
            param = params[name]
            if "=" not in word and not getattr(param, "is_flag", False) and not getattr(param, "count", False):
                words = words[1:]  # the option's value
        elif hasattr(command, "commands"):
            sub = command.commands.get(word)
            if sub is None:
                return f"`{command.name}` has no command {word!r}"
            command = sub
        # else: a positional argument of a leaf command
    return None


@pytest.fixture(scope="module")
def cli() -> Any:
    import typer

    from visionloop.cli import app

    return typer.main.get_command(app)


@pytest.mark.parametrize("doc", [DEPLOY_DOC, KO_README, README], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_visionloop_command_and_option_named_exists(doc: Path, cli: Any):
    argvs = invocations(doc, "visionloop")
    assert argvs, f"{doc.name} names no visionloop command?"
    problems = [f"visionloop {' '.join(argv)}: {problem}" for argv in argvs if (problem := check_cli(argv, cli))]
    assert not problems, f"{doc.relative_to(ROOT)} names commands the CLI does not have:\n" + "\n".join(problems)


def test_the_cli_check_catches_a_wrong_command_and_a_wrong_option(cli: Any):
    assert check_cli(["images", "build", "--base-image", "x", "--kind", "serve"], cli) is None
    assert check_cli(["models", "promote", "3", "--force"], cli) is None
    assert "no command 'shove'" in check_cli(["images", "shove"], cli)
    assert "no option --registery" in check_cli(["images", "push", "--registery", "x"], cli)
    assert commands("A=1 visionloop serve && make images BASE_IMAGE=x | tee log") == [
        ["visionloop", "serve"], ["make", "images", "BASE_IMAGE=x"], ["tee", "log"]
    ]  # fmt: skip


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    used = set()
    for doc in (DEPLOY_DOC, KO_README, README):
        for argv in invocations(doc, "make"):
            used |= {word for word in argv if not word.startswith("-") and "=" not in word}
    assert {"images", "run", "test"} <= used, used
    assert used <= targets, f"make targets the Makefile does not have: {sorted(used - targets)}"


def test_every_repository_path_named_exists():
    text = DEPLOY_DOC.read_text()
    paths = set(REPO_PATH.findall(text))
    assert {"deploy/k8s/overlays/production", "deploy/docker/registry.yml", ".github/scripts/smoke.py"} <= paths
    absent = sorted(p for p in paths if not (ROOT / p).exists())
    assert not absent, f"docs/deploy.md names paths that do not exist: {absent}"


def test_relative_links_resolve_to_files_and_headings():
    broken = []
    for target in relative_links(DEPLOY_DOC):
        page, _, fragment = target.partition("#")
        file = (DEPLOY_DOC.parent / page).resolve() if page else DEPLOY_DOC
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.relative_to(ROOT)}")
    assert not broken, "docs/deploy.md: broken links:\n" + "\n".join(broken)


def manifest_rows() -> dict[str, set[str]]:
    """``base/serve.yaml`` → the kinds its row in "What each manifest is for" names."""
    table = section(DEPLOY_DOC.read_text(), "### What each manifest is for")
    rows = re.findall(r"^\| `((?:base|components|overlays)/[^`]+)` \| ([^|]+) \|", table, re.MULTILINE)
    return {path: {kind.strip() for kind in kinds.split(",")} for path, kinds in rows}


def test_the_manifest_tables_list_every_file_with_its_kinds():
    rows = manifest_rows()
    files = sorted(p for part in ("base", "components", "overlays") for p in (K8S / part).rglob("*.yaml"))
    assert files, "deploy/k8s has no manifests?"
    wrong = []
    for file in files:
        name = str(file.relative_to(K8S))
        kinds = {d["kind"] for d in yaml.safe_load_all(file.read_text()) if d}
        if name not in rows:
            wrong.append(f"{name}: no row")
        elif rows[name] != kinds:
            wrong.append(f"{name}: the row says {sorted(rows[name])}, the file holds {sorted(kinds)}")
    wrong += [f"{name}: a row for a file that does not exist" for name in rows if not (K8S / name).exists()]
    assert not wrong, "docs/deploy.md's manifest tables against deploy/k8s:\n" + "\n".join(wrong)


def test_the_kubernetes_objects_the_guide_names_exist():
    objects = set()
    for path in [*(K8S / "base").rglob("*.yaml"), *(K8S / "components").rglob("*.yaml")]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "name" in doc.get("metadata", {}):
                objects.add((doc["kind"].lower(), doc["metadata"]["name"]))
    named = set()
    for doc in (DEPLOY_DOC, KO_README):
        for argv in invocations(doc, "kubectl"):
            named |= set(KUBECTL_OBJECT.findall(" ".join(argv)))
    assert ("pytorchjob", "visionloop-ddp") in named and ("job", "visionloop-train") in named, named
    absent = sorted(f"{kind}/{name}" for kind, name in named if (kind, name) not in objects)
    assert not absent, f"the guides name Kubernetes objects deploy/k8s does not define: {absent}"


def test_the_sizes_are_the_ones_deploy_docker_measured():
    table = section(DEPLOY_DOC.read_text(), "### Sizes")
    measured = (ROOT / "deploy" / "docker" / "README.md").read_text()
    figures = re.findall(r"\b\d+(?:\.\d+)? (?:MB|GB|s|wheels)\b", FENCE.sub("", table))
    assert figures, "the Sizes section quotes no figures?"
    assert "visionloop images sizes" in table, "the Sizes section must name the command that gives the sizes"
    stale = sorted({f for f in figures if f not in measured})
    assert not stale, f"docs/deploy.md quotes sizes or times deploy/docker/README.md does not have: {stale}"


def test_the_terraform_paragraph_agrees_with_what_validates_offline():
    readme = section((ROOT / "deploy" / "terraform" / "README.md").read_text(), "## What `make test` checks")
    rows = dict(re.findall(r"^\| `([\w/-]+)` \| [^|]+ \| ([^|]+) \|", readme, re.MULTILINE))
    assert rows, "deploy/terraform/README.md has no table of what make test runs?"
    paragraph = next(p for p in DEPLOY_DOC.read_text().split("\n\n") if p.startswith("Which modules validate offline"))
    validated, format_only = paragraph.split("only format-checked")[0].split("cannot be had offline")
    for directory, runs in rows.items():
        where = format_only if runs.strip() == "fmt only" else validated
        assert f"`{directory}`" in where, f"docs/deploy.md does not say {directory} gets {runs.strip()!r}"
    listed = re.findall(r"^\| `([\w/-]+)/` \|", section(DEPLOY_DOC.read_text(), TERRAFORM_SECTION), re.MULTILINE)
    assert "modules/eks" in listed, listed
    absent = [d for d in listed if not (ROOT / "deploy" / "terraform" / d).is_dir()]
    assert not absent, f"docs/deploy.md's Terraform table names directories deploy/terraform lacks: {absent}"


MISSIONS = {
    1: ("Docker 컨테이너", ["visionloop images build", "docker run"]),
    2: ("모델 API", ["visionloop serve", "/predict", "/v2/"]),
    3: ("쿠버네티스에 배포", ["kubectl apply -k deploy/k8s/overlays/dev", "overlays/production"]),
    4: ("MLflow 모델 버전", ["visionloop models list", "visionloop models rollback", "visionloop models history"]),
    5: ("EKS GPU 노드 그룹", ["terraform apply", "patch job visionloop-train"]),
    6: ("분산 학습", ["visionloop train --nproc-per-node", "patch pytorchjob visionloop-ddp"]),
}


def test_the_korean_section_closes_the_guide_and_maps_every_practice_mission():
    text = DEPLOY_DOC.read_text()
    assert KOREAN_HEADING in text, f"docs/deploy.md has no '{KOREAN_HEADING}' section"
    korean = text[text.index(KOREAN_HEADING) :]
    assert not re.search(r"^## ", korean[len(KOREAN_HEADING) :], re.MULTILINE), "the Korean section comes last"
    assert len(re.findall(r"[\uac00-\ud7a3]", korean)) > 1000, "the Korean section is too short to be a guide"
    rows = {int(n): row for n, row in re.findall(r"^\| \((\d)\) (.*)$", FENCE.sub("", korean), re.MULTILINE)}
    assert sorted(rows) == sorted(MISSIONS), f"the mission table has rows {sorted(rows)}"
    for number, (mission, named) in MISSIONS.items():
        assert mission in rows[number], f"mission ({number}) is not {mission!r}: {rows[number][:60]}"
        missing = [command for command in named if command not in rows[number]]
        assert not missing, f"mission ({number}) {mission}: its row does not name {missing}"


def test_the_readmes_point_at_the_guide_and_no_longer_call_delivery_future_work():
    assert "docs/deploy.md" in relative_links(README)
    assert "../deploy.md#한국어-안내" in relative_links(KO_README)
    roadmap = section(README.read_text(), "## Roadmap")
    assert re.search(r"^- Done: delivery", roadmap, re.MULTILINE), "the roadmap does not list delivery as done"
    assert not re.search(r"^- Next: delivery", roadmap, re.MULTILINE)
    headings = re.findall(r"^## (.+)$", prose(KO_README), re.MULTILINE)
    assert any(h.startswith("13.") and "배포" in h for h in headings), headings
    assert "다음 단계" not in headings and "다음은 배포" not in KO_README.read_text()
    layout = next(block for _, block in FENCE.findall(README.read_text()) if block.startswith("src/visionloop/"))
    deploy_line = layout[layout.index("deploy/") :]
    for folder in ("docker", "compose", "k8s", "terraform", "kubeflow", "monitoring"):
        assert f"{folder}/" in deploy_line and (ROOT / "deploy" / folder).is_dir(), folder
    assert ".github/" in layout and "workflows/" in layout
