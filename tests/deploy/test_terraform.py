"""deploy/terraform as Terraform reads it: ``terraform fmt -check`` on every file, and ``terraform init`` +
``terraform validate`` of every configuration whose providers can be installed offline; then the files
cross-checked against the README (which directories are validated, the variables table) and against the
Kubernetes manifests (the GPU node group's label and taint, the IRSA service accounts).

Only ``hashicorp/aws`` can be installed here: a CLI config points a filesystem mirror at its unpacked copy
(``/opt/tf-plugins``, or ``VISIONLOOP_TF_PLUGIN_MIRROR``) and allows nothing else. A directory whose
providers are all aws is validated as it is; a root that keeps its helm/kubernetes parts in
``kubernetes.tf`` is validated without that file (and without those providers); the rest (the
nvidia-device-plugin module, helm only) is format-checked only. Which is which is derived from each
directory's ``required_providers`` and must match the README's table.

All directories are validated in one test, from one copy of the tree in a temporary folder (nothing is
written into the repository) and one shared ``TF_PLUGIN_CACHE_DIR``: the 600 MB provider is linked from the
mirror into each ``.terraform``, never copied. Without terraform or the mirror these tests skip, and
under CI=true they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "deploy" / "terraform"
README = TERRAFORM / "README.md"
PRODUCTION = TERRAFORM / "envs" / "production"
EKS = TERRAFORM / "modules" / "eks"
DEVICE_PLUGIN = TERRAFORM / "modules" / "nvidia-device-plugin"
K8S = ROOT / "deploy" / "k8s"
MIRROR = Path(os.environ.get("VISIONLOOP_TF_PLUGIN_MIRROR", "/opt/tf-plugins"))
AWS_PROVIDER = "registry.terraform.io/hashicorp/aws"
KUBERNETES_FILE = "kubernetes.tf"  # a root's helm/kubernetes parts, left out of its offline validate
# the contract with deploy/k8s (GPU Job, PyTorchJob): GPU nodes carry this label and this taint
POOL_LABEL = "visionloop.dev/node-pool"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
# what the README's "make test" column says for each kind of directory
CHECKS = {"full": "fmt + validate", "partial": f"fmt + validate without {KUBERNETES_FILE}", "fmt": "fmt only"}


def missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def terraform() -> str:
    path = shutil.which("terraform")
    if path is None:
        missing("terraform is not installed (https://developer.hashicorp.com/terraform/install, 1.10 or later)")
    return path


# ---------------------------------------------------------------------------------------------- HCL text
# python-hcl2 is not a dependency: these read the few blocks the tests need, by brace matching outside strings


def block(text: str, header: str) -> str:
    """The body of the first block whose header matches the regex ``header`` (up to its ``{``)."""
    match = re.search(header + r"\s*\{", text)
    assert match, f"no block {header!r}"
    depth, start, i, in_string = 1, match.end(), match.end(), False
    while depth:
        char = text[i]
        if in_string:
            if char == "\\":
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "#":
            i = text.index("\n", i) - 1
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        i += 1
    return text[start : i - 1]


def tf_text(directory: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(directory.glob("*.tf")))


def required_providers(directory: Path) -> dict[str, str]:
    """Local name -> source of the directory's ``required_providers``."""
    body = block(tf_text(directory), r"required_providers")
    names = re.findall(r"^\s*([\w-]+)\s*=\s*\{", body, re.M)
    return {name: re.search(r'source\s*=\s*"([^"]+)"', block(body, rf"\b{name}\s*=")).group(1) for name in names}


def module_sources(directory: Path, files: list[Path] | None = None) -> list[Path]:
    text = "\n".join(p.read_text() for p in files) if files is not None else tf_text(directory)
    return [(directory / source).resolve() for source in re.findall(r'^\s*source\s*=\s*"(\.\.?/[^"]+)"', text, re.M)]


def providers(directory: Path) -> set[str]:
    """Provider sources a configuration needs: its own and its local modules', recursively."""
    found = set(required_providers(directory).values())
    for module in module_sources(directory):
        found |= providers(module)
    return found


def terraform_dirs() -> list[Path]:
    return sorted({p.parent for p in TERRAFORM.rglob("*.tf") if ".terraform" not in p.parts})


def check_kind(directory: Path) -> str:
    """full: every provider is aws; partial: all but kubernetes.tf uses aws alone; fmt: neither."""
    if providers(directory) == {"hashicorp/aws"}:
        return "full"
    rest = [p for p in sorted(directory.glob("*.tf")) if p.name != KUBERNETES_FILE]
    if (directory / KUBERNETES_FILE).exists():
        text = "\n".join(p.read_text() for p in rest)
        other = re.search(r'^(resource|data)\s+"(?!aws_)|^provider\s+"(?!aws")', text, re.M)
        if not other and all(providers(m) == {"hashicorp/aws"} for m in module_sources(directory, rest)):
            return "partial"
    return "fmt"


def readme_table(heading: str) -> list[list[str]]:
    """Rows (cells without backticks) of the first table under the README heading ``heading``."""
    text = README.read_text()
    section = text[text.index(heading) :]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line):
            rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header row


# ---------------------------------------------------------------------------------------------- terraform


def test_fmt_check(terraform: str) -> None:
    done = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", "-no-color", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CHECKPOINT_DISABLE": "1"},
    )
    assert done.returncode == 0, f"terraform fmt -check found files to format:\n{done.stdout}{done.stderr}"


def test_readme_says_which_directories_are_validated() -> None:
    documented = {row[0]: row for row in readme_table("## What `make test` checks")}
    derived = {str(d.relative_to(TERRAFORM)): d for d in terraform_dirs()}
    assert set(documented) == set(derived), "the README's table must list every Terraform directory"
    for name, directory in derived.items():
        row = documented[name]
        needs = {source.removeprefix("hashicorp/") for source in providers(directory)}
        assert set(re.split(r",\s*", row[1])) == needs, f"{name}: README says providers {row[1]}, files need {needs}"
        assert row[2] == CHECKS[check_kind(directory)], f"{name}: README says {row[2]!r}"
        if check_kind(directory) != "full":
            assert len(row) > 3 and row[3], f"{name}: the README must say why it is not fully validated"
    # the format-check-only list is exactly what the brief of issue 11 documents
    assert {n for n, d in derived.items() if check_kind(d) == "fmt"} == {"modules/nvidia-device-plugin"}
    assert {n for n, d in derived.items() if check_kind(d) == "partial"} == {"envs/production"}


def test_validate_offline(terraform: str, tmp_path: Path) -> None:
    provider = MIRROR / AWS_PROVIDER
    if not any(provider.glob("*/linux_amd64/terraform-provider-aws_*")):
        missing(f"no hashicorp/aws provider under {MIRROR} (a filesystem mirror, unpacked layout)")
    tree = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, tree, ignore=shutil.ignore_patterns(".terraform", ".terraform.lock.hcl"))
    config = tmp_path / "cli.tfrc"
    # the mirror and nothing else: a provider it lacks fails init at once instead of reaching for a registry
    config.write_text(
        f'provider_installation {{\n  filesystem_mirror {{\n    path    = "{MIRROR}"\n'
        f'    include = ["{AWS_PROVIDER}"]\n  }}\n}}\n'
    )
    cache = tmp_path / "plugin-cache"
    cache.mkdir()
    env = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_CLI_CONFIG_FILE": str(config),
        "TF_PLUGIN_CACHE_DIR": str(cache),
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
    }
    env.pop("TF_DATA_DIR", None)
    validated = []
    for directory in terraform_dirs():
        kind = check_kind(directory)
        if kind == "fmt":
            continue
        name = str(directory.relative_to(TERRAFORM))
        work = tree / name
        if kind == "partial":
            (work / KUBERNETES_FILE).unlink()
            for path in work.glob("*.tf"):  # drop the helm/kubernetes entries of required_providers
                text = path.read_text()
                for local, source in required_providers(directory).items():
                    entry = re.search(rf"^\s*{local}\s*=\s*\{{", text, re.M)
                    if source != "hashicorp/aws" and entry:
                        end = entry.end() + len(block(text[entry.start() :], rf"{local}\s*=")) + 1
                        text = text[: entry.start()] + text[end:]
                path.write_text(text)
        init = subprocess.run(
            [terraform, "init", "-backend=false", "-no-color"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert init.returncode == 0, f"terraform init in {name}:\n{init.stdout}{init.stderr}"
        done = subprocess.run(
            [terraform, "validate", "-json", "-no-color"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        result = json.loads(done.stdout)
        problems = [f"{d['severity']}: {d['summary']}: {d.get('detail', '')}" for d in result["diagnostics"]]
        assert result["valid"] and not problems, f"terraform validate in {name}:\n" + "\n".join(problems)
        validated.append(name)
    assert validated == [
        "bootstrap",
        "envs/production",
        "modules/ecr",
        "modules/eks",
        "modules/irsa",
        "modules/network",
    ]


# ---------------------------------------------------------------------------------------------- README


def variables(directory: Path) -> dict[str, dict[str, str | None]]:
    """name -> type, default (None: required) and description, as written in the variable blocks."""
    text = tf_text(directory)
    found = {}
    for name in re.findall(r'^variable\s+"(\w+)"', text, re.M):
        body = block(text, rf'variable\s+"{name}"')
        body = re.sub(r"^\s*validation\s*\{.*?^\s*\}\s*$", "", body, flags=re.M | re.S)
        field = {k: re.search(rf"^\s*{k}\s*=\s*(.+?)\s*$", body, re.M) for k in ("type", "default", "description")}
        found[name] = {k: m.group(1) if m else None for k, m in field.items()}
        assert found[name]["type"] and found[name]["description"], f"variable {name} needs a type and a description"
    return found


def test_readme_lists_every_production_variable() -> None:
    declared = variables(PRODUCTION)
    rows = {row[0]: row for row in readme_table("## Variables")}
    assert list(rows) == list(declared), "the README's variables table must list every variable, in file order"
    for name, var in declared.items():
        _, type_, default, description = rows[name]
        assert type_ == var["type"], f"{name}: README type {type_!r}, variables.tf {var['type']!r}"
        assert default == (var["default"] or "required"), f"{name}: README default {default!r}"
        assert description == json.loads(var["description"]), f"{name}: README description differs"


# ---------------------------------------------------------------------------------------------- k8s contract


def pod_specs(node: object) -> list[dict]:
    """Every pod spec (a mapping with a containers list) inside a parsed manifest."""
    if isinstance(node, dict):
        found = [node] if isinstance(node.get("containers"), list) else []
        return found + [spec for value in node.values() for spec in pod_specs(value)]
    if isinstance(node, list):
        return [spec for value in node for spec in pod_specs(value)]
    return []


def match_expressions(node: object) -> list[dict]:
    """Every node-affinity match expression (key, operator, values) inside ``node``."""
    if isinstance(node, dict):
        found = [node] if {"key", "operator"} <= node.keys() and "values" in node else []
        return found + [e for value in node.values() for e in match_expressions(value)]
    if isinstance(node, list):
        return [e for value in node for e in match_expressions(value)]
    return []


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if "crds" not in path.relative_to(K8S).parts:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)]
    return docs


def tolerates(toleration: dict, taint: dict) -> bool:
    if toleration.get("key") not in (None, taint["key"]) or toleration.get("effect") not in (None, taint["effect"]):
        return False
    return toleration.get("operator") == "Exists" or toleration.get("value") == taint["value"]


def test_gpu_node_group_matches_the_manifests() -> None:
    main = (EKS / "main.tf").read_text()
    gpu = block(main, r'resource\s+"aws_eks_node_group"\s+"gpu"')
    cpu = block(main, r'resource\s+"aws_eks_node_group"\s+"cpu"')
    assert re.search(rf'"{re.escape(POOL_LABEL)}"\s*=\s*"gpu"', block(gpu, r"labels\s*="))
    assert re.search(rf'"{re.escape(POOL_LABEL)}"\s*=\s*"cpu"', block(cpu, r"labels\s*="))
    taint = dict(re.findall(r'^\s*(key|value|effect)\s*=\s*"([^"]+)"', block(gpu, r"taint"), re.M))
    assert taint == {**GPU_TAINT, "effect": "NO_SCHEDULE"}  # the EKS API's spelling of NoSchedule
    assert re.search(r"^\s*ami_type\s*=\s*var\.gpu_ami_type", gpu, re.M)
    assert re.search(r"^\s*min_size\s*=\s*var\.gpu_scaling\.min", gpu, re.M)
    production = variables(PRODUCTION)
    assert production["gpu_min_size"]["default"] == "0", "the GPU group scales from 0"
    assert production["gpu_ami_type"]["default"] in ('"AL2023_x86_64_NVIDIA"', '"BOTTLEROCKET_x86_64_NVIDIA"')
    assert production["gpu_instance_types"]["default"] == '["g5.xlarge"]'
    # the device plugin runs where the GPUs are
    plugin = variables(DEVICE_PLUGIN)
    assert f'"{POOL_LABEL}" = "gpu"' in plugin["node_selector"]["default"]
    assert re.search(
        r'key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule"', plugin["tolerations"]["default"]
    )

    pools = {"cpu", "gpu"}
    gpu_pods = 0
    for doc in manifests():
        for spec in pod_specs(doc):
            name = f"{doc['kind']} {doc.get('metadata', {}).get('name')}"
            selected = spec.get("nodeSelector", {}).get(POOL_LABEL)
            assert selected in pools | {None}, f"{name} selects node pool {selected!r}; terraform makes {pools}"
            for expression in match_expressions(spec):
                if expression["key"] == POOL_LABEL and expression["operator"] in ("In", "NotIn"):
                    assert set(expression["values"]) <= pools, f"{name}: affinity on node pools {expression['values']}"
            requests = [
                {**c.get("resources", {}).get("requests", {}), **c.get("resources", {}).get("limits", {})}
                for c in spec["containers"]
            ]
            if any("nvidia.com/gpu" in r for r in requests):
                gpu_pods += 1
                assert selected == "gpu", f"{name} requests nvidia.com/gpu without nodeSelector {POOL_LABEL}: gpu"
                assert any(tolerates(t, GPU_TAINT) for t in spec.get("tolerations", [])), f"{name}: no toleration"
    assert gpu_pods >= 2, "deploy/k8s should hold the GPU training Job and the PyTorchJob"


def test_irsa_roles_match_the_service_accounts() -> None:
    body = block((PRODUCTION / "main.tf").read_text(), r"service_accounts\s*=")
    roles = {sa: f"visionloop-{sa.removeprefix('visionloop-')}" for sa in re.findall(r'^\s*"([\w-]+)"\s*=', body, re.M)}
    docs = [doc for doc in manifests() if doc.get("kind") == "ServiceAccount"]
    accounts = {doc["metadata"]["name"] for doc in docs}
    assert set(roles) <= accounts, f"IRSA roles for service accounts deploy/k8s lacks: {set(roles) - accounts}"
    annotated = {
        doc["metadata"]["name"]: doc["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        for doc in docs
        if "eks.amazonaws.com/role-arn" in (doc["metadata"].get("annotations") or {})
    }
    assert annotated, "the production overlay should annotate service accounts with their IAM roles"
    for name, arn in annotated.items():
        assert name in roles, f"{name} is annotated with a role terraform does not make"
        assert arn.rsplit("/", 1)[-1] == roles[name], f"{name}: annotation {arn}, terraform's role {roles[name]}"
