"""What the Slurm cluster offers, asked at submission time (never inside training).

``check_request`` compares a :class:`JobConfig` with ``sinfo``'s view of the partitions and raises ValueError
naming the setting and the value that cannot be met (unknown partition, more nodes, GPUs, CPUs or memory than a
node has, a feature no node offers, a time above the partition limit). ``sbatch --test-only`` then lets Slurm
itself judge what sinfo cannot show (accounts, QOS), still without submitting anything.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from tokscale.jobs.config import JobConfig

log = logging.getLogger(__name__)

SINFO_FORMAT = "%N|%P|%c|%m|%G|%f|%l"


@dataclass
class Partition:
    name: str
    default: bool = False
    nodes: set[str] = field(default_factory=set)
    cpus: int = 0  # the largest node's, so a request that fits no node is refused
    mem_mb: int = 0
    gpus: int = 0
    features: set[str] = field(default_factory=set)
    max_time_min: int | None = None  # None: no limit


def require_slurm() -> None:
    missing = [c for c in ("sinfo", "sbatch", "squeue") if shutil.which(c) is None]
    if missing:
        raise FileNotFoundError(
            f"Slurm commands {missing} not found on PATH: submit from a Slurm login node "
            "(or start the local test cluster: sudo jobs/local_cluster.sh start)"
        )


def parse_time_min(text: str) -> int | None:
    """Slurm time ("infinite", "30", "1:00:00", "2-12:00:00", "45:00") -> minutes (None: unlimited)."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, (m, s) = 0, parts
    else:
        h, m, s = 0, parts[0], 0
    return days * 1440 + h * 60 + m + (1 if s else 0)


def parse_gpus(gres: str) -> int:
    """GPUs per node from sinfo's %G ("gpu:8", "gpu:a100:4(S:0-1)", "(null)")."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def parse_sinfo(text: str) -> dict[str, Partition]:
    """One ``sinfo -h -N -o SINFO_FORMAT`` line per (node, partition) -> partitions by name."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        node, pname, cpus, mem, gres, features, limit = line.split("|")
        default = pname.endswith("*")
        pname = pname.rstrip("*")
        p = parts.setdefault(pname, Partition(pname))
        p.default = p.default or default
        p.nodes.add(node)
        p.cpus = max(p.cpus, int(cpus.rstrip("+")))
        p.mem_mb = max(p.mem_mb, int(mem.rstrip("+")))
        p.gpus = max(p.gpus, parse_gpus(gres))
        if features not in ("(null)", ""):
            p.features.update(features.split(","))
        p.max_time_min = parse_time_min(limit)
    return parts


def query_partitions() -> dict[str, Partition]:
    require_slurm()
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"sinfo failed ({out.returncode}): {out.stderr.strip()}")
    return parse_sinfo(out.stdout)


def check_request(job: JobConfig, partitions: dict[str, Partition]) -> Partition:
    """Raise ValueError naming the first setting of ``job`` the cluster cannot satisfy."""
    if not partitions:
        raise ValueError("sinfo lists no partitions: is this a Slurm cluster with nodes?")
    if job.partition:
        names = [n.strip() for n in job.partition.split(",")]
        unknown = [n for n in names if n not in partitions]
        if unknown:
            raise ValueError(
                f"job.partition={job.partition!r}: unknown partition {unknown[0]!r}; "
                f"this cluster has {sorted(partitions)}"
            )
        part = partitions[names[0]]
    else:
        defaults = [p for p in partitions.values() if p.default]
        if not defaults:
            raise ValueError(
                f"the cluster has no default partition: set job.partition to one of {sorted(partitions)}"
            )
        part = defaults[0]
    where = f"partition {part.name!r}"
    if job.nodes > len(part.nodes):
        raise ValueError(f"job.nodes={job.nodes}: {where} has only {len(part.nodes)} node(s)")
    if job.gpus_per_node > part.gpus:
        has = f"at most {part.gpus} GPU(s) per node" if part.gpus else "no GPUs"
        raise ValueError(f"job.gpus_per_node={job.gpus_per_node}: {where} has {has}")
    cpus = job.ntasks_per_node * max(job.cpus_per_task, 1)
    if cpus > part.cpus:
        raise ValueError(
            f"job.tasks_per_node={job.ntasks_per_node} x job.cpus_per_task={max(job.cpus_per_task, 1)} = {cpus} "
            f"CPUs per node: {where} has at most {part.cpus} CPUs per node"
        )
    if job.mem_gb and job.mem_gb * 1024 > part.mem_mb:
        raise ValueError(f"job.mem_gb={job.mem_gb}: {where} has at most {part.mem_mb / 1024:.1f} GB per node")
    if job.constraint:
        # Features of a constraint expression (a&b|c, [a*2], ...); each must exist on some node.
        for feat in re.findall(r"[A-Za-z_][\w.-]*", job.constraint):
            if feat not in part.features:
                raise ValueError(
                    f"job.constraint={job.constraint!r}: no node of {where} has feature {feat!r} "
                    f"(features: {sorted(part.features) or 'none'})"
                )
    if part.max_time_min is not None and job.time_min > part.max_time_min:
        raise ValueError(f"job.time_min={job.time_min}: {where} allows at most {part.max_time_min} minutes")
    return part


def test_only(job: JobConfig) -> str:
    """``sbatch --test-only``: Slurm's own verdict on the request (accounts, QOS, limits); submits nothing."""
    require_slurm()
    cmd = ["sbatch", "--test-only", *as_flags(job.sbatch_options()), "--wrap", "true"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    message = (out.stderr + out.stdout).strip()
    if out.returncode != 0:
        raise ValueError(f"Slurm refuses the job request ({' '.join(cmd[2:-2])}): {message}")
    log.debug("sbatch --test-only: %s", message)
    return message


def as_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        key = key.replace("_", "-")
        flags.append(f"--{key}" if value is True or value == "" else f"--{key}={value}")
    return flags


def validate(job: JobConfig) -> Partition:
    """Both checks, as ``tokscale submit`` runs them before submitting."""
    part = check_request(job, query_partitions())
    test_only(job)
    return part
