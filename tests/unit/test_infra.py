"""infra/: the cluster definitions validate with the tools that will consume them, offline.

- ``infra/aws/cluster.yaml`` against Ray's own cluster-config schema and the same
  ``prepare_config`` + ``validate_config`` that ``ray up`` runs;
- ``infra/k8s/*.yaml`` against the KubeRay v1.7.0 CRD schemas vendored in tests/data/kuberay,
  with unknown fields rejected (``kubectl apply``'s strict field validation);
- the job file the RayJob runs validates with the project's own loader;
- the Dockerfile installs exactly pyproject.toml's dependency set (it reads the pins from it).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY_SCHEMAS = ROOT / "tests" / "data" / "kuberay"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
IMAGE_WORKDIR = "/opt/mocha"

sys.path.insert(0, str(INFRA / "docker"))
import pyproject_pin  # noqa: E402  (infra/docker is not a package: the script is copied into the image alone)

#: CUDA version of the torch wheels PyPI serves for a torch pin (torch 2.13.0's wheel metadata
#: requires cuda-toolkit 13.0.x). The Dockerfile's base image must match it: DeepSpeed compiles
#: ops only against the same CUDA major.minor as torch. A new torch pin needs a new entry here,
#: checked against PyPI, and possibly a new base image.
TORCH_CUDA = {"2.13.0": "13.0"}


def load_pyproject() -> dict:
    return pyproject_pin.load_pyproject(ROOT / "pyproject.toml")


def pinned_version(name: str) -> str:
    (req,) = pyproject_pin.pins_for(load_pyproject(), [name])
    return req.split("==", 1)[1]


# --------------------------------------------------------------------------- AWS cluster launcher


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # raises on any unknown or mistyped field


def test_cluster_yaml_passes_ray_up_preparation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))  # merges Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    # Nothing from Ray's defaults.yaml (which installs a nightly Ray wheel) leaked into the commands.
    commands = " ".join(prepared["setup_commands"] + prepared["head_setup_commands"]
                        + prepared["worker_setup_commands"] + prepared["initialization_commands"])
    assert "ray-wheels" not in commands and "anaconda3" not in commands
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_cluster_autoscales_gpu_and_data_groups_from_zero(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no training or data task may land on the head"
    gpu = types["gpu-h100"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] == 8 and gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    cpu = types["cpu-data"]
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1 and "GPU" not in cpu["resources"]
    assert cluster["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items() if n != "head")


def test_cluster_reaches_s3_through_instance_profiles(cluster):
    for name, node_type in cluster["available_node_types"].items():
        assert "Name" in node_type["node_config"]["IamInstanceProfile"], name


def test_cluster_runs_the_project_image_and_installs_the_checkout(cluster):
    assert cluster["docker"]["image"] == k8s_images()[0]
    assert cluster["file_mounts"] == {IMAGE_WORKDIR: "."}
    setup = cluster["setup_commands"]
    assert f"pip install --no-deps --no-build-isolation -e {IMAGE_WORKDIR}" in setup
    check = shlex.split(setup[-1])
    assert check[1:] == [f"{IMAGE_WORKDIR}/infra/docker/pyproject_pin.py", f"{IMAGE_WORKDIR}/pyproject.toml", "--check"]
    assert (ROOT / check[1].removeprefix(IMAGE_WORKDIR + "/")).is_file()


# --------------------------------------------------------------------------- KubeRay manifests


def strict(schema):
    """The CRD schema with unknown fields rejected: Kubernetes prunes (and ``kubectl apply``
    refuses) fields a structural schema does not declare, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.v1.schema.json").read_text())
    return jsonschema.Draft7Validator(strict(schema))


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_one(kind: str) -> dict:
    (doc,) = [d for _, d in k8s_documents() if d["kind"] == kind]
    return doc


def pod_templates() -> list[dict]:
    spec = k8s_one("RayCluster")["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def k8s_images() -> list[str]:
    return sorted({c["image"] for t in pod_templates() for c in t["spec"]["containers"]})


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifest_matches_crd_schema(kind):
    doc = k8s_one(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(kind).iter_errors(doc)]
    assert errors == []


def test_crd_check_rejects_a_misspelt_field():
    cluster = copy.deepcopy(k8s_one("RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4  # typo of maxReplicas
    errors = list(crd_validator("RayCluster").iter_errors(cluster))
    assert any("maxReplica" in e.message for e in errors)


def test_raycluster_autoscales_gpu_workers_from_zero():
    spec = k8s_one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == pinned_version("ray")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-h100")
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_s3_access_is_irsa_not_secrets():
    account = k8s_one("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for template in pod_templates():
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
        for container in template["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
            assert "envFrom" not in container
    texts = [p.read_text() for p in INFRA.rglob("*") if p.is_file()]
    assert not any(re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key", t, re.I) for t in texts)


def test_rayjob_runs_on_the_raycluster():
    job, cluster = k8s_one("RayJob"), k8s_one("RayCluster")
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}


def test_rayjob_entrypoint_job_file_validates_with_the_project_loader(monkeypatch):
    from mocha.train.job import load_job

    argv = shlex.split(k8s_one("RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["mocha", "train"]
    (job_path,) = argv[2:]
    assert dockerfile_workdir() == IMAGE_WORKDIR, "the entrypoint's relative path resolves in the image workdir"
    monkeypatch.chdir(ROOT)  # the repository is what the image holds at its workdir
    job = load_job(job_path)
    assert job.stage == 2
    assert job.run.storage_path.startswith("s3://"), "checkpoints of a cluster run go to S3"
    assert job.scaling.use_gpu


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]


def dockerfile_workdir() -> str:
    return [args for inst, args in dockerfile_instructions() if inst == "WORKDIR"][-1]


def run_steps() -> list[str]:
    return [args for inst, args in dockerfile_instructions() if inst == "RUN"]


def test_dockerfile_writes_no_version_of_a_project_dependency():
    text = "\n".join(args for _, args in dockerfile_instructions())
    for name in pyproject_pin.project_dependencies(load_pyproject()):
        assert not re.search(rf"\b{re.escape(name)}(\[[^\]]*\])?\s*(==|>=|<=|~=|!=|<|>)", text, re.I), \
            f"{name}'s version must come from pyproject.toml, not the Dockerfile"


def test_dockerfile_installs_torch_then_deepspeed_from_pyproject_pins_then_the_project():
    pin = "$(python infra/docker/pyproject_pin.py pyproject.toml {})"
    steps = run_steps()
    torch_step = next(i for i, s in enumerate(steps) if f'pip install "{pin.format("torch")}"' in s)
    ds_step = next(i for i, s in enumerate(steps) if f'pip install --no-build-isolation "{pin.format("deepspeed")}"' in s)
    project_step = next(i for i, s in enumerate(steps) if f"pip install -e {IMAGE_WORKDIR}" in s)
    assert torch_step < ds_step < project_step, "torch must be in place before DeepSpeed compiles against it"
    final = steps[project_step]
    assert final.index(f"pip install -e {IMAGE_WORKDIR}") < final.index("pyproject.toml --check")
    # The pins the Dockerfile asks for exist in pyproject and are exactly its entries.
    asked = re.findall(r"pyproject_pin\.py pyproject\.toml ([a-z][a-z0-9_.-]*)\)", " ".join(steps))
    assert set(asked) == {"torch", "deepspeed"}
    deps = pyproject_pin.project_dependencies(load_pyproject())
    assert pyproject_pin.pins_for(load_pyproject(), asked) == [deps[n] for n in asked]
    # Build tools come from [build-system].requires; the only other packages are DeepSpeed's own deps.
    extra = re.search(r"--build-system\) (.*?) &&", steps[torch_step]).group(1).split()
    assert extra == ["ninja", "packaging"]


def test_dockerfile_copies_pyproject_before_reading_it_and_the_whole_project_after():
    inst = dockerfile_instructions()
    copies = [i for i, (k, a) in enumerate(inst) if k == "COPY"]
    first_pin = next(i for i, (k, a) in enumerate(inst) if k == "RUN" and "pyproject_pin.py" in a)
    early = [inst[i][1] for i in copies if i < first_pin]
    assert any("pyproject.toml ./pyproject.toml" in a for a in early)
    assert any("infra/docker/pyproject_pin.py ./infra/docker/pyproject_pin.py" in a for a in early)
    assert any(inst[i][1].endswith(f". {IMAGE_WORKDIR}") for i in copies if i > first_pin)
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignore)


def test_dockerfile_prebuilds_the_deepspeed_gpu_ops_it_checks_for():
    ds_step = next(s for s in run_steps() if "pyproject.toml deepspeed" in s)
    env = dict(re.findall(r"\b(DS_[A-Z_]+)=(\S+)", ds_step))
    assert env["DS_ACCELERATOR"] == "cuda", "no GPU is visible during docker build"
    assert env["DS_BUILD_FUSED_ADAM"] == "1" and env["DS_BUILD_CPU_ADAM"] == "1"
    verify = next(s for s in run_steps() if "installed_ops" in s)
    assert "'fused_adam', 'cpu_adam'" in verify


def test_dockerfile_base_image_cuda_matches_torchs_cuda_build():
    arg = next(a for k, a in dockerfile_instructions() if k == "ARG" and a.startswith("CUDA_IMAGE="))
    cuda = re.search(r"nvidia/cuda:(\d+\.\d+)\.\d+-devel-", arg).group(1)
    assert cuda == TORCH_CUDA[pinned_version("torch")]


def test_pin_reader_prints_pyproject_entries(capsys):
    assert pyproject_pin.main([str(ROOT / "pyproject.toml"), "torch", "Ray"]) == 0
    deps = pyproject_pin.project_dependencies(load_pyproject())
    assert capsys.readouterr().out.split() == [deps["torch"], deps["ray"]]
    assert pyproject_pin.main([str(ROOT / "pyproject.toml"), "not-a-dependency"]) == 1
    assert "not-a-dependency" in capsys.readouterr().err


def test_pin_check_accepts_this_environment_and_names_a_mismatch(tmp_path):
    # The dev environment is installed from the same pyproject (torch 2.13.0+cpu satisfies ==2.13.0).
    assert pyproject_pin.unsatisfied(load_pyproject()) == []
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\nname = "x"\ndependencies = ["torch==1.0.0", "pyyaml>=6", '
                    '"surely-not-installed-pkg==1"]\n[build-system]\nrequires = []\n')
    problems = pyproject_pin.unsatisfied(pyproject_pin.load_pyproject(fake))
    assert len(problems) == 2
    assert problems[0].startswith("torch==1.0.0: installed 2.13.0")
    assert problems[1] == "surely-not-installed-pkg==1: not installed"


# --------------------------------------------------------------------------- README


def test_readme_lists_every_placeholder_used_in_the_manifests():
    readme = (INFRA / "README.md").read_text()
    section = readme.split("## Before you deploy", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.M))
    assert documented == {"ACCOUNT_ID", "AMI_ID"}
    used = set()
    for path in [INFRA / "aws" / "cluster.yaml", *sorted((INFRA / "k8s").glob("*.yaml"))]:
        used |= set(re.findall(r"\b([A-Z]+_ID)\b", path.read_text()))
    assert used == documented
    assert os.path.relpath(KUBERAY_SCHEMAS, ROOT) in readme and "v1.7.0" in readme
