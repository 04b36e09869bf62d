r"""GKE: a JobSet manifest for TPU slices, generated from flags, applied with kubectl.

    python -m launch.gke --name=dit1b --image=REGISTRY/audiodiff-jax:TAG \
        --accelerator_type=v5p-128 --num_slices=2 --config=configs/dit.py:1B \
        --workdir=gs://BUCKET/runs/dit1b --override=data.shards_dir=gs://BUCKET/latents \
        --dry_run

``--dry_run`` prints the manifest; ``--out=FILE`` writes it; otherwise it is applied
with ``kubectl apply -f``. The template is ``launch/jobset.yaml.tmpl``: one replicated
job per slice, one pod per TPU host, each pod running the same ``audiodiff-train``.
GKE's TPU webhook gives each pod its ``TPU_WORKER_ID`` / ``TPU_WORKER_HOSTNAMES``
(``jax.distributed`` reads them); several slices also get the ``MEGASCALE_*``
variables of libtpu's DCN runtime, with slice 0's first pod as coordinator. A pod
that fails fails the attempt; JobSet restarts the whole set (``--max_restarts``) and
training resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import string
import subprocess
import sys
import tempfile

from absl import flags

from audiodiff_jax.core import topology
from audiodiff_jax.programs import cli
from launch import common

# Flag holders, set by define_flags().
_NAME = None
_IMAGE = None
_ACCELERATOR = None
_NUM_SLICES = None
_MAX_RESTARTS = None
_GRACE = None
_OUT = None


TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobset.yaml.tmpl")
# GKE node label values per TPU generation.
GKE_ACCELERATORS = {
    "v4": "tpu-v4-podslice",
    "v5p": "tpu-v5p-slice",
    "v5e": "tpu-v5-lite-podslice",
    "v6e": "tpu-v6e-slice",
}
MEGASCALE_PORT = 8080


def define_flags() -> None:
    """Defines this launcher's flags (its ``__main__`` only; see ``common.define_flags``)."""
    global _NAME, _IMAGE, _ACCELERATOR, _NUM_SLICES, _MAX_RESTARTS, _GRACE, _OUT
    _NAME = flags.DEFINE_string("name", None, "JobSet name (DNS label: lowercase, digits, '-').")
    _IMAGE = flags.DEFINE_string(
        "image", None, "Container image with audiodiff-jax[tpu] and gcsfs installed."
    )
    _ACCELERATOR = flags.DEFINE_string(
        "accelerator_type", "v5p-128", "Slice type, e.g. v5p-128, v5e-256, v6e-64."
    )
    _NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN.")
    _MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 10, "Times JobSet restarts the job after a failure.")
    _GRACE = flags.DEFINE_integer(
        "grace_s", 120, "Seconds between SIGTERM and SIGKILL of a pod (time to save a checkpoint)."
    )
    _OUT = flags.DEFINE_string("out", "", "Write the manifest here instead of applying it.")
    common.define_flags()


def chips_per_host(generation: str, chips_per_slice: int) -> int:
    """TPU VMs hold 4 chips, except single-host v5e / v6e slices of up to 8 chips."""
    if generation in ("v5e", "v6e") and chips_per_slice <= 8:
        return chips_per_slice
    return min(4, chips_per_slice)


def _env_yaml(env: list[dict]) -> str:
    # JSON is YAML: each entry as one flow mapping keeps quoting right.
    return "\n".join(" " * 14 + "- " + json.dumps(e) for e in env)


def manifest(
    *,
    name: str,
    image: str,
    accelerator_type: str,
    num_slices: int,
    train_args: list[str],
    max_restarts: int = 10,
    grace_s: int = 120,
) -> str:
    """The JobSet manifest (YAML text)."""
    if not name or not image:
        raise ValueError("--name and --image are required")
    spec = topology.parse_topology(accelerator_type, num_slices)
    gen = spec.generation.name
    per_host = chips_per_host(gen, spec.chips_per_slice)
    env: list[dict] = [{"name": k, "value": v} for k, v in common.BASE_ENV.items()]
    if num_slices > 1:
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}:{MEGASCALE_PORT}"},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
            {
                "name": "MEGASCALE_SLICE_ID",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}
                },
            },
            {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        ]
    with open(TEMPLATE) as f:
        template = string.Template(f.read())
    return template.substitute(
        name=name,
        max_restarts=max_restarts,
        num_slices=num_slices,
        hosts_per_slice=spec.chips_per_slice // per_host,
        grace_s=grace_s,
        gke_accelerator=GKE_ACCELERATORS[gen],
        gke_topology="x".join(map(str, spec.chip_shape)),
        image=json.dumps(image),
        command=json.dumps(train_args),
        env=_env_yaml(env),
        chips_per_host=per_host,
    )


def main(argv):
    common.take_command(argv)
    text = manifest(
        name=_NAME.value,
        image=_IMAGE.value,
        accelerator_type=_ACCELERATOR.value,
        num_slices=_NUM_SLICES.value,
        train_args=common.train_args_from_flags(),
        max_restarts=_MAX_RESTARTS.value,
        grace_s=_GRACE.value,
    )
    if common.print_or_write(text, _OUT.value, "apply with: kubectl apply -f {path}"):
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    cmd = ["kubectl", "apply", "-f", f.name]
    print(shlex.join(cmd), flush=True)
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    define_flags()
    cli.run(main, module=(__name__, "launch.common"))
