"""The GitHub Actions workflows (.github/workflows) and the smoke script cd.yml runs against the kind cluster.

Nothing here runs a workflow (no runner is reachable): the files are validated against GitHub's schema with
check-jsonschema (``vendor.github-workflows``, ``vendor.dependabot``), and the rules a reviewer would check by
eye are asserted: every action pinned by a full commit SHA that .github/README.md lists with its tag,
least-privilege permissions (each job gets exactly what its steps need), concurrency, timeouts, the production
environment, and that what the workflows name exists (repository paths, make targets, `visionloop` commands and
their options, the Kubernetes objects cd.yml waits for). The smoke script's failure paths run here against a
closed port and a small stand-in server; its success path runs against a real server in
tests/integration/serving/test_server.py (test_smoke_script_passes_against_a_real_server).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GITHUB = ROOT / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.yml"))
SMOKE = GITHUB / "scripts" / "smoke.py"
SHA_PIN = re.compile(r"^(?P<action>[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+)@(?P<sha>[0-9a-f]{40})$")
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)\s*(?:#\s*(?P<comment>.*))?$")

# what each action needs beyond `contents: read` when a job uses it (with these inputs)
ACTION_PERMISSIONS: dict[str, dict[str, str]] = {
    "actions/attest-build-provenance": {"id-token": "write", "attestations": "write"},
    "aws-actions/configure-aws-credentials": {"id-token": "write"},
}


def missing(message: str) -> None:
    """A tool the test needs is not here: a failure on CI (which installs everything), a skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if True in data:  # YAML 1.1 reads the key `on` as a boolean
        data["on"] = data.pop(True)
    return data


@pytest.fixture(scope="module")
def workflows() -> dict[str, dict[str, Any]]:
    assert {p.name for p in WORKFLOWS} == {"ci.yml", "cd.yml", "train.yml"}
    return {p.stem: load(p) for p in WORKFLOWS}


def steps_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job.get("steps") or []


def action_of(step: dict[str, Any]) -> str | None:
    uses = step.get("uses")
    return uses.split("@")[0] if uses else None


def run_text(workflow: dict[str, Any]) -> str:
    """Every `run:` script of a workflow, joined."""
    return "\n".join(s["run"] for job in workflow["jobs"].values() for s in steps_of(job) if "run" in s)


# ------------------------------------------------------------------------------------------ schema


def test_workflows_and_dependabot_validate_against_the_github_schemas() -> None:
    check = [sys.executable, "-m", "check_jsonschema"]
    for schema, files in (
        ("vendor.github-workflows", [str(p) for p in WORKFLOWS]),
        ("vendor.dependabot", [str(GITHUB / "dependabot.yml")]),
    ):
        done = subprocess.run([*check, "--builtin-schema", schema, *files], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{schema}:\n{done.stdout}\n{done.stderr}"


def test_the_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    """The check above can fail: a job without runs-on and a step with an unknown key are refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    steps:\n      - run: true\n        runs: nope\n")
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr


def test_dependabot_keeps_the_action_pins_fresh() -> None:
    config = yaml.safe_load((GITHUB / "dependabot.yml").read_text())
    ecosystems = {u["package-ecosystem"]: u for u in config["updates"]}
    assert ecosystems["github-actions"]["directory"] == "/"


# ------------------------------------------------------------------------------------------ pins


def pinned_table() -> dict[str, tuple[str, str]]:
    """action -> (tag, sha) from the table in .github/README.md."""
    rows = re.findall(
        r"^\| ([\w.-]+/[\w.-]+) \| (v\d+\.\d+\.\d+) \| ([0-9a-f]{40}) \|", (GITHUB / "README.md").read_text(), re.M
    )
    return {action: (tag, sha) for action, tag, sha in rows}


def test_every_action_is_pinned_by_a_full_sha_listed_with_its_tag() -> None:
    table = pinned_table()
    assert len(table) >= 10, table
    seen: set[str] = set()
    for path in WORKFLOWS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = USES_LINE.match(line)
            if not found:
                continue
            ref, comment = found["ref"], (found["comment"] or "").strip()
            where = f"{path.name}:{number}: {line.strip()}"
            if ref.startswith("./"):
                continue  # a local action lives in this repository
            pin = SHA_PIN.match(ref)
            assert pin, f"{where}: not pinned by a full 40-hex commit SHA"
            assert re.fullmatch(r"v\d+\.\d+\.\d+", comment), f"{where}: the comment must name the tag, # vX.Y.Z"
            assert pin["action"] in table, f"{where}: {pin['action']} is not in the table of .github/README.md"
            assert table[pin["action"]] == (comment, pin["sha"]), f"{where}: README lists {table[pin['action']]}"
            seen.add(pin["action"])
            # the comment block at the top of the workflow names the same pin
            assert re.search(rf"{re.escape(pin['action'])}\s+{comment}\s+{pin['sha']}", path.read_text()), where
    assert seen == set(table), f"README lists actions no workflow uses: {set(table) - seen}"


# ------------------------------------------------------------------------------------------ permissions, limits


def test_top_level_permissions_are_read_only(workflows: dict[str, dict[str, Any]]) -> None:
    for name, workflow in workflows.items():
        assert workflow.get("permissions") == {"contents": "read"}, name


def needed_permissions(job: dict[str, Any]) -> dict[str, str]:
    needed = {"contents": "read"}
    for step in steps_of(job):
        needed.update(ACTION_PERMISSIONS.get(action_of(step) or "", {}))
        with_ = step.get("with") or {}
        if action_of(step) == "docker/build-push-action" and with_.get("push") is True:
            needed["packages"] = "write"
    runs = "\n".join(s.get("run", "") for s in steps_of(job))
    if "docker-registry" in runs and "ghcr.io" in runs and "packages" not in needed:
        needed["packages"] = "read"  # a pull secret for GHCR made from the job's token
    return needed


def test_every_job_gets_exactly_the_permissions_its_steps_need(workflows: dict[str, dict[str, Any]]) -> None:
    for name, workflow in workflows.items():
        for job_name, job in workflow["jobs"].items():
            needed = needed_permissions(job)
            granted = job.get("permissions", workflow["permissions"])
            assert isinstance(granted, dict), f"{name}.{job_name}: permissions must be a map, got {granted!r}"
            assert granted == needed, f"{name}.{job_name}: grants {granted}, its steps need {needed}"


def test_the_permission_rule_sees_a_job_that_pushes() -> None:
    job = {"steps": [{"uses": "docker/build-push-action@x", "with": {"push": True}}]}
    assert needed_permissions(job) == {"contents": "read", "packages": "write"}


def test_concurrency_groups(workflows: dict[str, dict[str, Any]]) -> None:
    for name, workflow in workflows.items():
        group = workflow["concurrency"]["group"]
        assert group.startswith(f"{name}-") and "github.ref" in group, (name, group)
    assert workflows["ci"]["concurrency"]["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"
    assert workflows["cd"]["concurrency"]["cancel-in-progress"] is False  # never cancel a deploy
    assert workflows["train"]["concurrency"]["cancel-in-progress"] is False
    production = workflows["cd"]["jobs"]["production"]["concurrency"]
    assert production == {"group": "deploy-production", "cancel-in-progress": False}


def test_every_job_has_a_timeout(workflows: dict[str, dict[str, Any]]) -> None:
    for name, workflow in workflows.items():
        for job_name, job in workflow["jobs"].items():
            minutes = job.get("timeout-minutes")
            assert isinstance(minutes, int) and 0 < minutes <= 120, f"{name}.{job_name}: timeout-minutes {minutes!r}"


# ------------------------------------------------------------------------------------------ what each workflow does


def test_ci_runs_lint_tests_and_image_builds(workflows: dict[str, dict[str, Any]]) -> None:
    ci = workflows["ci"]
    assert set(ci["on"]) >= {"pull_request", "push"}
    assert set(ci["jobs"]) == {"lint", "test", "images"}
    runs = {job: "\n".join(s.get("run", "") for s in steps_of(ci["jobs"][job])) for job in ci["jobs"]}
    assert "ruff check" in runs["lint"] and "ruff format --check" in runs["lint"]
    assert ".ci/run" in runs["test"] and ci["jobs"]["test"]["env"]["CI"] == "true"
    builds = [s for s in steps_of(ci["jobs"]["images"]) if action_of(s) == "docker/build-push-action"]
    assert {s["with"]["file"] for s in builds} == {"build/context-serve/Dockerfile", "build/context-train/Dockerfile"}
    assert all(s["with"]["push"] is False for s in builds)
    for job in ci["jobs"].values():  # pip cache on every setup-python
        for step in steps_of(job):
            if action_of(step) == "actions/setup-python":
                assert step["with"]["cache"] == "pip"


def test_cd_pushes_with_provenance_and_sbom_then_deploys_kind_then_production(
    workflows: dict[str, dict[str, Any]],
) -> None:
    cd = workflows["cd"]
    assert cd["on"]["push"] == {"branches": ["main"], "tags": ["v*"]}
    jobs = cd["jobs"]
    assert jobs["kind"]["needs"] == "images" and jobs["production"]["needs"] == ["images", "kind"]
    builds = [s for s in steps_of(jobs["images"]) if action_of(s) == "docker/build-push-action"]
    assert len(builds) == 2
    metadata = {s["id"] for s in steps_of(jobs["images"]) if action_of(s) == "docker/metadata-action"}
    for build in builds:
        options = build["with"]
        assert options["push"] is True and options["provenance"] == "mode=max" and options["sbom"] is True
        meta = re.fullmatch(r"\$\{\{ steps\.([\w-]+)\.outputs\.tags \}\}", options["tags"])
        assert meta and meta[1] in metadata, options["tags"]
    images_run = run_text({"jobs": {"images": jobs["images"]}})
    assert "ghcr.io/$owner/visionloop-serve" in images_run and "ghcr.io/$owner/visionloop-train" in images_run
    attested = [
        s["with"]["subject-digest"] for s in steps_of(jobs["images"]) if s.get("uses", "").startswith("actions/attest")
    ]
    assert attested == ["${{ steps.serve.outputs.digest }}", "${{ steps.train.outputs.digest }}"]

    kind = jobs["kind"]
    assert any(action_of(s) == "helm/kind-action" for s in steps_of(kind))
    kind_run = "\n".join(s.get("run", "") for s in steps_of(kind))
    assert "kustomize edit set image" in kind_run and "../../deploy/k8s/overlays/dev" in kind_run
    assert "python3 .github/scripts/smoke.py http://127.0.0.1:8000" in kind_run
    assert "port-forward service/visionloop-serve 8000:8000" in kind_run
    assert kind["env"]["SERVE"] == "${{ needs.images.outputs.serve }}@${{ needs.images.outputs.serve-digest }}"

    production = jobs["production"]
    assert production["environment"]["name"] == "production"
    aws = next(s for s in steps_of(production) if action_of(s) == "aws-actions/configure-aws-credentials")
    assert aws["with"]["role-to-assume"] == "${{ vars.AWS_ROLE_ARN }}"
    assert "aws-access-key-id" not in aws["with"]  # OIDC, no long-lived key
    prod_run = "\n".join(s.get("run", "") for s in steps_of(production))
    assert "aws eks update-kubeconfig" in prod_run
    assert "kubectl apply -k deploy/k8s/overlays/production" in prod_run
    assert "rollout status" in prod_run
    edit = next(s for s in steps_of(production) if "kustomize edit set image" in s.get("run", ""))
    assert edit["working-directory"] == "deploy/k8s/overlays/production"


def test_train_compiles_uploads_and_submits(workflows: dict[str, dict[str, Any]]) -> None:
    train = workflows["train"]
    assert set(train["on"]) == {"workflow_dispatch", "schedule"}
    assert {"epochs", "experiment"} <= set(train["on"]["workflow_dispatch"]["inputs"])
    assert len(train["on"]["schedule"][0]["cron"].split()) == 5
    (job,) = train["jobs"].values()
    names = [action_of(s) or s.get("name", "") for s in steps_of(job)]
    compile_at = next(i for i, s in enumerate(steps_of(job)) if "visionloop pipeline compile" in s.get("run", ""))
    upload_at = names.index("actions/upload-artifact")
    submit_at = next(i for i, s in enumerate(steps_of(job)) if "visionloop pipeline submit" in s.get("run", ""))
    assert compile_at < upload_at < submit_at
    assert steps_of(job)[upload_at]["with"]["path"] == "build/visionloop-pipeline.yaml"
    assert "--output build/visionloop-pipeline.yaml" in steps_of(job)[compile_at]["run"]
    assert job["env"]["KFP_HOST"] == "${{ secrets.KFP_HOST || vars.KFP_HOST }}"


# ------------------------------------------------------------------------------------------ what they name exists


def scripts_text() -> str:
    workflows_run = "\n".join(run_text(load(p)) for p in WORKFLOWS)
    scripts = "\n".join(p.read_text() for p in (GITHUB / "scripts").iterdir() if p.suffix == ".sh")
    lines = (workflows_run + "\n" + scripts).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))  # commands, not comments


def test_repository_paths_named_by_the_workflows_exist() -> None:
    text = scripts_text().replace("$kind", "{kind}")
    paths = set(re.findall(r"(?<![\w./-])((?:\.github|\.ci|deploy|src|tests)/[\w./{}-]*[\w}])", text))
    paths |= {name for name in ("constraints.txt", "pyproject.toml", "Makefile") if name in text}
    assert {"deploy/k8s/overlays/production", ".github/scripts/smoke.py", ".ci/run"} <= paths, paths
    absent = []
    for path in sorted(paths):
        variants = [path.format(kind=k) for k in ("serve", "train")] if "{kind}" in path else [path]
        absent += [v for v in variants if not (ROOT / v).exists()]
    # the kind overlay resolves ../../deploy/k8s/overlays/dev from build/kind
    assert (ROOT / "build" / "kind" / "../../deploy/k8s/overlays/dev").resolve() == ROOT / "deploy/k8s/overlays/dev"
    assert not absent, f"named by .github but not in the repository: {absent}"


def test_make_targets_named_by_the_workflows_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    used = set(re.findall(r"\bmake (\w[\w-]*)", scripts_text())) | {"test"}  # .ci/run runs `make test`
    assert "install" in used
    assert used <= targets, f"make targets not in the Makefile: {used - targets}"


def cli_invocations() -> list[list[str]]:
    """Each `visionloop ...` command line of the workflows and scripts, as argv (up to a pipe or redirect)."""
    text = scripts_text().replace("\\\n", " ")
    # a bash array built up before the call (`args=(...)`, `args+=(...)`) stands for its words
    arrays: dict[str, list[str]] = {}
    for name, words in re.findall(r"\b(\w+)\+?=\((.*?)\)(?:;|$)", text, re.S | re.M):
        arrays.setdefault(name, []).extend(shlex.split(words))
    found = []
    for line in text.splitlines():
        for match in re.finditer(r"(?:^|[\s;&|(])visionloop\s+(.+?)(?=\s*(?:\||>|;|&&|$))", line):
            argv = []
            for word in shlex.split(match[1]):
                array = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
                argv += arrays[array[1]] if array else [word]
            found.append(argv)
    return found


def test_visionloop_commands_and_options_the_workflows_use_exist() -> None:
    import typer

    from visionloop.cli import app

    root = typer.main.get_command(app)  # typer's own click: a group is what has .commands
    invocations = cli_invocations()
    used = {" ".join(a for a in argv[:2] if not a.startswith("-")) for argv in invocations}
    assert {"images wheelhouse", "pipeline compile", "pipeline submit"} <= used, used
    for argv in invocations:
        command: Any = root
        words = [a for a in argv if not a.startswith(("-", '"', "$"))]
        for word in words:
            if not hasattr(command, "commands"):
                break
            sub = command.commands.get(word)
            assert sub is not None, f"`visionloop {' '.join(argv)}`: no command {word!r}"
            command = sub
        options = {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
        for arg in argv:
            if arg.startswith("--"):
                assert arg.split("=")[0] in options, f"`visionloop {' '.join(argv)}`: no option {arg}"


def rendered(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing("kubectl is not installed (it renders the overlays: `kubectl kustomize`)")
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def names_in(documents: list[dict[str, Any]]) -> set[str]:
    return {f"{d['kind'].lower()}/{d['metadata']['name']}" for d in documents}


def test_the_kubernetes_objects_cd_waits_for_exist_in_the_overlays(workflows: dict[str, dict[str, Any]]) -> None:
    jobs = workflows["cd"]["jobs"]
    waited = re.compile(r"\b((?:deployment|statefulset|job|service)/[\w-]+)")
    loops = re.compile(r"for deployment in ([\w\s-]+?); do")

    def objects(job: dict[str, Any]) -> set[str]:
        text = "\n".join(s.get("run", "") for s in steps_of(job))
        named = set(waited.findall(text.replace('"deployment/$deployment"', "")))
        for listed in loops.findall(text):
            named |= {f"deployment/{name}" for name in listed.split()}
        return named

    dev = rendered("dev")
    expected_dev = objects(jobs["kind"])
    assert {"deployment/visionloop-serve", "job/visionloop-train", "service/visionloop-serve"} <= expected_dev
    assert expected_dev <= names_in(dev), f"not in the dev overlay: {expected_dev - names_in(dev)}"
    service = next(d for d in dev if d["kind"] == "Service" and d["metadata"]["name"] == "visionloop-serve")
    assert 8000 in {p["port"] for p in service["spec"]["ports"]}
    images = {c["image"].split(":")[0].split("@")[0] for d in dev for c in containers_of(d)}
    assert {"visionloop-serve", "visionloop-train"} <= images, images  # what `kustomize edit set image` names

    production = rendered("production")
    expected = objects(jobs["production"])
    assert "deployment/visionloop-serve" in expected
    assert expected <= names_in(production), f"not in the production overlay: {expected - names_in(production)}"
    images = {c["image"].split(":")[0].split("@")[0].rsplit("/", 1)[-1] for d in production for c in containers_of(d)}
    assert {"visionloop-serve", "visionloop-train"} <= images, images


def containers_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = document.get("spec") or {}
    template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template") or {}
    pod = template.get("spec") or {}
    return [*(pod.get("containers") or []), *(pod.get("initContainers") or [])]


# ------------------------------------------------------------------------------------------ the smoke script


class StandIn(BaseHTTPRequestHandler):
    """A server that is alive; its readiness and its infer answer are what the test sets on the server."""

    def log_message(self, *_args: Any) -> None:
        pass

    def answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        ready = self.server.ready  # type: ignore[attr-defined]
        model = {"name": "m", "version": "1"} if ready else None
        routes = {
            "/healthz": (200, {"status": "alive"}),
            "/v2/health/ready": (200 if ready else 503, {"ready": ready}),
            "/readyz": (200 if ready else 503, {"ready": ready, "model": model, "status": "no model: m@champion"}),
            "/v2/models/m": (
                200,
                {
                    "name": "m",
                    "versions": ["1"],
                    "inputs": [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 2, 2]}],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
                },
            ),
        }
        self.answer(*routes.get(self.path, (404, {"error": f"no route {self.path}"})))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.server.requests.append(json.loads(self.rfile.read(length)))  # type: ignore[attr-defined]
        self.answer(200, self.server.infer_answer)  # type: ignore[attr-defined]


@pytest.fixture
def stand_in() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.ready = False  # type: ignore[attr-defined]
    server.requests = []  # type: ignore[attr-defined]
    server.infer_answer = {}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def smoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SMOKE), *args, "--interval", "0.2"], capture_output=True, text=True, timeout=60
    )


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_smoke_fails_clearly_on_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = smoke(f"http://127.0.0.1:{port}", "--timeout", "1.5")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith(f"smoke: FAIL: GET http://127.0.0.1:{port}/healthz did not answer 200 within 1.5 s")
    assert "Connection refused" in done.stderr
    assert done.stdout == ""


def test_smoke_fails_with_the_reason_when_the_server_never_becomes_ready(stand_in: ThreadingHTTPServer) -> None:
    done = smoke(url_of(stand_in), "--timeout", "1.5")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "smoke: ok: GET /healthz 200" in done.stdout
    assert "/v2/health/ready did not answer 200 within 1.5 s (last: HTTP 503" in done.stderr
    assert "no model: m@champion" in done.stderr  # what /readyz says, so the log shows why
    assert stand_in.requests == []  # type: ignore[attr-defined]


def test_smoke_sends_an_input_of_the_model_shape_and_checks_the_answer(stand_in: ThreadingHTTPServer) -> None:
    stand_in.ready = True  # type: ignore[attr-defined]
    stand_in.infer_answer = {  # type: ignore[attr-defined]
        "model_name": "m",
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [2, 3], "data": [0.1] * 5}],
    }
    done = smoke(url_of(stand_in), "--timeout", "5")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "smoke: FAIL: output 'probabilities' of shape [2, 3] came with 5 values" in done.stderr
    (sent,) = stand_in.requests  # type: ignore[attr-defined]
    (tensor,) = sent["inputs"]
    assert tensor["name"] == "input" and tensor["datatype"] == "UINT8" and tensor["shape"] == [2, 1, 2, 2]
    assert len(tensor["data"]) == 8 and all(isinstance(v, int) and 0 <= v <= 255 for v in tensor["data"])

    stand_in.infer_answer = {"model_name": "m", "outputs": []}  # type: ignore[attr-defined]
    done = smoke(url_of(stand_in), "--model", "m", "--timeout", "5")
    assert done.returncode == 1 and "smoke: FAIL: infer answer has no outputs" in done.stderr, done.stderr


def test_smoke_refuses_a_bad_url() -> None:
    done = smoke("127.0.0.1:8000")
    assert done.returncode == 2 and "BASE_URL must start with http:// or https://" in done.stderr
