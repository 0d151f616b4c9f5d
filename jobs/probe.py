"""Probing several tokenizers downstream: for each one, reconstruction metrics, code extraction, a GPT trained with
the AR-probing recipe, its validation loss, gFID and the AR linear probe, then one results table and a plot.

    tokscale probe runs/tok-S runs/tok-B --train-data '/data/in1k/train-{000000..001023}.tar' \\
        --val-data '/data/in1k/val-{000000..000049}.tar' --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --out probes/in1k --nproc 8
    tokscale probe --config PROBE.yaml --out probes/in1k --submit -p gpu --gpus-per-node 8 -t 1440
    tokscale probe runs/ms-tok runs/vq-tok ... --downstream gpt,var --var-recipe var/var-d16   # + a VAR per tokenizer
    tokscale submit tokscale.jobs.probe_chain OUT/<name>/continuations/after-JOB-0/continuation.yaml ...  # what a chain does

Each stage is a ``tokscale`` command run as a subprocess (``--nproc N`` locally), writing under
``OUT/<name>/``: ``recon`` (``eval recon`` on the validation data), ``tokens-train`` and ``tokens-val``
(``extract``), ``gpt`` (``train c2i RECIPE``: vocabulary and token count from the tokenizer's config, classes
from the training codes), ``gen`` (``eval gen``) and ``ar-probe`` (``eval ar-probe``). ``downstream`` chooses the
models trained on the codes: ``gpt`` (the three stages above, the default), ``var`` (``--downstream var``, or
``gpt,var``: then after the GPT's) adds ``var`` (stage ``train-var``: ``train var VAR_RECIPE`` with the vocabulary,
scales and code width of a ``quantizer.kind=multiscale`` tokenizer and the classes of its codes) and ``gen-var``
(``eval gen`` of that VAR, with VAR's own sampling by default). A tokenizer that is not multi-scale cannot feed
a VAR: its VAR stages (and, with ``var`` alone, its extraction) are recorded ``n/a`` with the reason, a warning
names it, its VAR cells read ``n/a`` and the pipeline goes on. A stage is finished when
its marker exists (``metrics.json``, ``manifest.json``, a complete checkpoint at ``train.max_steps``,
``results.json``, ``metrics.json``; for the VAR's, a checkpoint at its recipe's ``train.max_steps`` and
``results.json``): a rerun skips it. An unfinished stage is run again with the same command,
which resumes through the command's own mechanism (finished token shards, the newest checkpoint, finished sample
chunks, finished probe epochs; reconstruction metrics, minutes even at 50,000 images, are computed again). ``OUT/probe_state.json`` records every stage (status, times, command, log,
attempts, Slurm job ids); ``OUT/<name>/logs/<stage>.log`` holds each stage's output. A failing stage stops the
pipeline with an error naming the stage, the tokenizer and the log.

With ``--submit`` the pipeline is a chain of Slurm jobs per tokenizer: the first unfinished stage goes out through
that command's own ``--submit`` path (resources: ``job`` merged with ``stage_jobs.<stage>``), followed by a small
continuation job (tokscale.jobs.probe_chain as a runnable, one CPU task, ``dependency: afterany:<stage job>``)
that runs the same step again: it sees the finished stage and submits the next, waits again while the stage's job
is still queued or requeued, or records the failure and stops once ``max_attempts`` submissions of the stage ended
without its output. Everything checkable is checked before the first submission (config keys, paths, the tokenizers'
configs, the reference, the recipe at every tokenizer's sizes, each stage's Slurm request); what depends on an
earlier stage's output (the GPT/tokenizer pair, the class count) is checked when its stage is submitted.

``OUT/results.csv`` / ``results.md`` (one row per tokenizer; the columns of the downstream models asked for;
blank where a stage has not run, n/a where it cannot) and ``OUT/tradeoff.png`` (gFID and probe top-1 against rFID,
marker area by tokenizer size; a VAR's gFID a square) are rewritten whenever a tokenizer finishes or the pipeline
stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokscale.errors import ReportedError
from tokscale.jobs.config import JobConfig

log = logging.getLogger(__name__)

# the tokenizer's own stages: every downstream model uses them
CODE_STAGES = ("recon", "extract-train", "extract-val")
# each downstream model's stages, in the order they run (after CODE_STAGES, the GPT's before the VAR's)
DOWNSTREAM_STAGES = {"gpt": ("train", "gen", "ar-probe"), "var": ("train-var", "gen-var")}
STAGES = (*CODE_STAGES, *DOWNSTREAM_STAGES["gpt"], *DOWNSTREAM_STAGES["var"])
TRAIN_STAGES = {"train": "c2i", "train-var": "var"}  # the trainer each training stage runs
FOLDERS = {
    "recon": "recon",
    "extract-train": "tokens-train",
    "extract-val": "tokens-val",
    "train": "gpt",
    "gen": "gen",
    "ar-probe": "ar-probe",
    "train-var": "var",
    "gen-var": "gen-var",
}
MARKERS = {  # the file a finished stage leaves (train, train-var: a complete checkpoint at max_steps instead)
    "recon": "metrics.json",
    "extract-train": "manifest.json",
    "extract-val": "manifest.json",
    "gen": "results.json",
    "ar-probe": "metrics.json",
    "gen-var": "results.json",
}
NOT_APPLICABLE = "n/a"  # the status (and table cell) of a stage that cannot run for a tokenizer
CONTINUATION = "continuation"
STATE_NAME, CONFIG_NAME = "probe_state.json", "probe_config.yaml"
STATE_FORMAT = "tokscale-probe-state/1"
# the pipeline sets these c2i keys itself: a recipe override of them would move the outputs it checks
RESERVED_RECIPE_KEYS = ("run_dir", "data.train_tokens", "data.val_tokens")
RESERVED_VAR_KEYS = (*RESERVED_RECIPE_KEYS, "tokenizer")  # and the VAR's: the tokenizer its codes come from
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# -- config -------------------------------------------------------------------------------------------------------
@dataclass
class ReconStageConfig:
    num_samples: int = 50_000  # validation images reconstructed (the whole set when it is smaller)
    batch_size: int = 50
    reference: str = ""  # ADM npz for rFID; "": the same validation crops (GigaTok's protocol)
    vgg_weights: str = ""  # torchvision VGG16 state dict for LPIPS; "": no LPIPS
    overrides: list[str] = field(default_factory=list)  # `eval recon` dotlist, e.g. data.num_workers=8


@dataclass
class ExtractStageConfig:
    train_aug: str = "tencrop"  # LlamaGen's and GigaTok's ten crops with flips
    val_aug: str = "center"
    batch_size: int = 64


@dataclass
class GenStageConfig:
    num_samples: int = 50_000
    batch_size: int = 32
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    cfg_start_ratio: float = 0.18
    cfg_search: str = ""  # "" | greedy | grid:1.5,1.75,2
    search_samples: int = 10_000
    class_rule: str = "uniform"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    overrides: list[str] = field(default_factory=list)  # `eval gen` dotlist, e.g. is_splits=10


def var_gen_defaults() -> GenStageConfig:
    """VAR's own sampling for its FID (its README): VAR's cfg 1.5 (t = s - 1, so cfg_scale 2.5) on its linear ramp
    over scales, top-k 900, top-p 0.96, 50 samples per class."""
    return GenStageConfig(cfg_scale=2.5, cfg_schedule="linear", top_k=900, top_p=0.96, class_rule="balanced")


@dataclass
class ArProbeStageConfig:
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 128  # per rank
    forward_batch: int = 0  # images per forward; 0: the command's default
    num_train: int = 0  # 0: every training image
    num_val: int = 0
    precision: str = "fp32"
    overrides: list[str] = field(default_factory=list)  # `eval ar-probe` dotlist, e.g. data.num_workers=8


@dataclass
class ProbePipelineConfig:
    out: str = ""  # OUT: one folder per tokenizer, the state, the table and the plot
    tokenizers: list[Any] = field(default_factory=list)  # paths, or {name: ..., path: ...}
    train_data: str = (
        ""  # image shards (path, pattern, 'embedded'): codes for the GPT, the probe's training set
    )
    val_data: str = ""  # rFID/PSNR/usage, the validation codes (val loss) and the probe's test set
    reference: str = ""  # ADM-format npz for gFID / IS / precision / recall
    inception_weights: str = ""
    recipe: str = "c2i/gigatok-probe-B"
    recipe_overrides: list[str] = field(default_factory=list)  # c2i dotlist, e.g. data.batch_size=32
    num_classes: int = 0  # the GPT's (and the VAR's) classes; 0: the largest training label + 1
    # the models trained on each tokenizer's codes: gpt (train, gen, ar-probe) and/or var (train-var, gen-var; a
    # multi-scale tokenizer's codes only: the VAR stages of any other tokenizer are "n/a")
    downstream: list[str] = field(default_factory=lambda: ["gpt"])
    var_recipe: str = "var/var-d16"
    var_recipe_overrides: list[str] = field(default_factory=list)  # var dotlist, e.g. data.batch_size=32
    last_stage: str = ""  # stop after this stage ("": run all of the downstream's stages)
    nproc: int = 1  # local processes per stage (ignored under --submit: each job's own tasks)
    recon: ReconStageConfig = field(default_factory=ReconStageConfig)
    extract: ExtractStageConfig = field(default_factory=ExtractStageConfig)
    gen: GenStageConfig = field(default_factory=GenStageConfig)
    ar_probe: ArProbeStageConfig = field(default_factory=ArProbeStageConfig)
    gen_var: GenStageConfig = field(default_factory=var_gen_defaults)  # the VAR's `eval gen`
    job: JobConfig = field(default_factory=JobConfig)  # every stage's Slurm request ...
    stage_jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... and per stage / continuation
    max_attempts: int = 1  # submissions of one stage before a continuation gives up on it

    def __post_init__(self):
        from tokscale.tokenizers.extract import AUGS

        self._check_downstream()
        required = ("out", "train_data", "val_data", "reference", "inception_weights")
        required += ("recipe",) * ("gpt" in self.downstream) + ("var_recipe",) * ("var" in self.downstream)
        for key in required:
            if not getattr(self, key):
                raise ValueError(f"{key} is empty: expected a path (--{key.replace('_', '-')})")
        entries = self.entries()  # checks each entry
        if not entries:
            raise ValueError(
                "tokenizers is empty: name at least one tokenizer (a run directory or an export)"
            )
        names = [n for n, _ in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"tokenizers: the name(s) {dupes} are used twice (a name defaults to the folder's name); give "
                "them names in the config: tokenizers: [{name: a, path: ...}, ...]"
            )
        if self.last_stage and self.last_stage not in self.stages(every=True):
            raise ValueError(
                f"last_stage={self.last_stage!r}: expected one of the stages of downstream {self.downstream}: "
                f"{self.stages(every=True)} (or '' for all)"
            )
        for key, value in (
            ("extract.train_aug", self.extract.train_aug),
            ("extract.val_aug", self.extract.val_aug),
        ):
            if value not in AUGS:
                raise ValueError(f"{key}={value!r}: expected one of {sorted(AUGS)}")
        if self.nproc < 1 or self.max_attempts < 1 or self.num_classes < 0:
            raise ValueError(
                f"nproc={self.nproc} and max_attempts={self.max_attempts} must be >= 1, num_classes="
                f"{self.num_classes} >= 0"
            )
        for name, items, reserved in (
            ("recipe_overrides", self.recipe_overrides, RESERVED_RECIPE_KEYS),
            ("var_recipe_overrides", self.var_recipe_overrides, RESERVED_VAR_KEYS),
        ):
            for item in items:
                key = item.partition("=")[0]
                if "=" not in item:
                    raise ValueError(f"{name} item {item!r} is not KEY=VALUE (e.g. data.batch_size=32)")
                if key in reserved:
                    raise ValueError(f"{name}: {key} is set by the pipeline (OUT/<name>/...); remove it")
        for stage in self.stage_jobs:
            if stage not in (*STAGES, CONTINUATION):
                raise ValueError(f"stage_jobs.{stage}: expected one of {(*STAGES, CONTINUATION)}")
            self.job_for(stage)  # bad fields or values fail here, naming them

    def _check_downstream(self) -> None:
        items = [str(d) for d in self.downstream]
        if not items:
            raise ValueError(
                f"downstream is empty: expected one or more of {list(DOWNSTREAM_STAGES)}, e.g. [gpt, var]"
            )
        for item in items:
            if item not in DOWNSTREAM_STAGES:
                raise ValueError(
                    f"downstream: {item!r} is not a downstream model; expected {list(DOWNSTREAM_STAGES)}"
                )
        dupes = sorted({d for d in items if items.count(d) > 1})
        if dupes:
            raise ValueError(f"downstream={items}: {dupes} named twice; name each model once")

    def stages(self, every: bool = False) -> tuple[str, ...]:
        """The stages the downstream models need, in order, up to ``last_stage`` (``every``: all of them)."""
        chosen = [*CODE_STAGES]
        for model in DOWNSTREAM_STAGES:  # in STAGES order, whatever the order of ``downstream``
            chosen += DOWNSTREAM_STAGES[model] if model in self.downstream else ()
        if self.last_stage and not every:
            chosen = chosen[: chosen.index(self.last_stage) + 1]
        return tuple(chosen)

    def entries(self) -> list[tuple[str, str]]:
        """(name, path) of every tokenizer; a bare path is named after its folder."""
        out = []
        for i, item in enumerate(self.tokenizers):
            if isinstance(item, str):
                name, path = Path(item.rstrip("/")).name, item
            elif isinstance(item, dict) and set(item) <= {"name", "path"} and item.get("path"):
                path = str(item["path"])
                name = str(item.get("name") or Path(path.rstrip("/")).name)
            else:
                raise ValueError(
                    f"tokenizers[{i}]={item!r}: expected a path or a mapping with 'path' (and 'name')"
                )
            if not NAME_RE.match(name):
                raise ValueError(
                    f"tokenizers[{i}]: name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
                )
            out.append((name, path))
        return out

    def job_for(self, stage: str) -> JobConfig:
        """The Slurm request of one stage: ``job`` merged with ``stage_jobs.<stage>``; the continuation starts
        from ``job``'s partition, account, qos and constraint with one CPU task for 10 minutes (no ``extra``)."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        base = asdict(self.job)
        if stage == CONTINUATION:
            base.update(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=0, mem_gb=0.0, time_min=10)
            base.update(signal_delay_s=min(base["signal_delay_s"], 60), job_name="tokscale-probe", extra={})
        try:
            merged = OmegaConf.merge(OmegaConf.structured(JobConfig(**base)), self.stage_jobs.get(stage, {}))
            return OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            raise ValueError(f"stage_jobs.{stage}: {str(err).splitlines()[0]}") from None
        except ValueError as err:
            raise ValueError(f"stage_jobs.{stage}: {err}") from None


def load_probe_config(path=None, overrides=()) -> ProbePipelineConfig:
    """schema -> YAML -> dotlist; an unknown key or a wrong type is a ConfigError naming it."""
    from tokscale.config import load_config as load

    return load(ProbePipelineConfig, path, list(overrides))


# -- the plan: what every tokenizer's stages need, checked before anything runs ------------------------------------
class StageFailed(ReportedError):
    """A stage's command (or its Slurm submission) failed; the message names stage, tokenizer and log."""


@dataclass
class TokenizerPlan:
    name: str
    path: str  # absolute
    folder: Path  # OUT/<name>
    codebook_size: int
    num_tokens: int
    params: int
    # a multi-scale tokenizer's scales (quantizer.kind=multiscale), else []
    scales: list[int] = field(default_factory=list)
    code_dim: int = 0
    # stage -> why it cannot run for this tokenizer (its status and table cells: n/a)
    not_applicable: dict[str, str] = field(default_factory=dict)

    def stage_dir(self, stage: str) -> Path:
        return self.folder / FOLDERS[stage]

    def log_path(self, stage: str) -> Path:
        return self.folder / "logs" / f"{stage}.log"


@dataclass
class Plan:
    cfg: ProbePipelineConfig
    out: Path
    tokenizers: list[TokenizerPlan]
    stages: tuple[str, ...]
    max_steps: int  # the recipe's train.max_steps: a checkpoint there finishes the train stage
    var_max_steps: int = 0  # the VAR recipe's: a checkpoint there finishes train-var

    @property
    def config_path(self) -> Path:
        return self.out / CONFIG_NAME


def _local(spec: str) -> str:
    """A shard location with its local parts made absolute (Slurm jobs and subprocesses may start elsewhere)."""
    parts = []
    for part in spec.split("::"):
        p = part.strip()
        remote = p == "embedded" or "://" in p or p.startswith(("pipe:", "file:"))
        parts.append(p if remote or not p else os.path.abspath(os.path.expanduser(p)))
    return "::".join(parts)


def tokenizer_params(path: str) -> int:
    """The parameter count `tokscale model info` gives the tokenizer's config (built on the meta device)."""
    import torch

    from tokscale.tokenizers.load import model_config_from
    from tokscale.tokenizers.model import VQTokenizer, param_counts

    with torch.device("meta"):
        return int(param_counts(VQTokenizer(model_config_from(path)))["params"])


def train_overrides(cfg: ProbePipelineConfig, tok: TokenizerPlan, num_classes: int) -> list[str]:
    """The c2i dotlist of one tokenizer's GPT: its folders and sizes, then the recipe overrides."""
    return [
        f"run_dir={tok.stage_dir('train')}",
        f"data.train_tokens={tok.stage_dir('extract-train')}",
        f"data.val_tokens={tok.stage_dir('extract-val')}",
        f"model.vocab_size={tok.codebook_size}",
        f"model.num_tokens={tok.num_tokens}",
        f"model.num_classes={num_classes}",
        *cfg.recipe_overrides,
    ]


def var_overrides(cfg: ProbePipelineConfig, tok: TokenizerPlan, num_classes: int) -> list[str]:
    """The var dotlist of one (multi-scale) tokenizer's VAR: its folders, tokenizer and sizes, then the
    VAR recipe overrides."""
    return [
        f"run_dir={tok.stage_dir('train-var')}",
        f"data.train_tokens={tok.stage_dir('extract-train')}",
        f"data.val_tokens={tok.stage_dir('extract-val')}",
        f"tokenizer={tok.path}",
        f"model.vocab_size={tok.codebook_size}",
        f"model.scales=[{','.join(map(str, tok.scales))}]",
        f"model.code_dim={tok.code_dim}",
        f"model.num_classes={num_classes}",
        *cfg.var_recipe_overrides,
    ]


def recipe_config(cfg: ProbePipelineConfig, tok: TokenizerPlan, num_classes: int, stage: str = "train"):
    """The training config the ``train`` (c2i) or ``train-var`` (var) stage of this tokenizer will run."""
    from tokscale.config import ConfigError

    if stage == "train":
        from tokscale.autoregressive.train import C2ITask as task

        key, recipe, overrides = "recipe", cfg.recipe, train_overrides(cfg, tok, num_classes)
    else:
        from tokscale.autoregressive.var_train import VARTask as task

        key, recipe, overrides = "var_recipe", cfg.var_recipe, var_overrides(cfg, tok, num_classes)
    try:
        return task.load_config(recipe, overrides)
    except ConfigError as err:
        raise ConfigError(
            f"{key} {recipe} (with {key}_overrides) for tokenizer {tok.name!r}: {err}"
        ) from None


def c2i_config(cfg: ProbePipelineConfig, tok: TokenizerPlan, num_classes: int):
    return recipe_config(cfg, tok, num_classes, "train")


def _not_applicable(cfg: ProbePipelineConfig, name: str, kind: str, multiscale: bool) -> dict[str, str]:
    """The stages a tokenizer cannot run, and why: the VAR's when it is not multi-scale (and the extraction too
    when no other downstream model needs its codes)."""
    if "var" not in cfg.downstream or multiscale:
        return {}
    why = (
        f"tokenizer {name!r} is not multi-scale (quantizer.kind={kind!r}); a VAR needs the codes of a "
        "quantizer.kind=multiscale tokenizer"
    )
    unused = f"{why}, and no other downstream model uses its codes"
    out = {} if "gpt" in cfg.downstream else dict.fromkeys(("extract-train", "extract-val"), unused)
    out.update(dict.fromkeys(DOWNSTREAM_STAGES["var"], why))  # in STAGES order
    return out


def make_plan(cfg: ProbePipelineConfig, submit: bool = False, check_cluster: bool = False) -> Plan:
    """Check everything that can be checked before the first stage runs (or is submitted); raise naming it."""
    from tokscale.autoregressive.gen_eval import check_reference
    from tokscale.config import ConfigError
    from tokscale.data.locations import resolve_shards
    from tokscale.evaluation.inception import check_weights_path
    from tokscale.tokenizers.load import model_config_from
    from tokscale.trainer import check_global_batch

    out = Path(cfg.out).resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={cfg.out}: a file is in the way; choose a folder")
    resolve_shards(cfg.train_data, "train")  # a missing local shard is an error naming it
    resolve_shards(cfg.val_data, "eval")
    check_reference(cfg.reference)
    check_weights_path(cfg.inception_weights)
    for key in ("recon.reference", "recon.vgg_weights"):
        value = getattr(cfg.recon, key.split(".")[1])
        if value and not Path(value).expanduser().is_file():
            raise FileNotFoundError(f"{key}={value!r} not found")
    toks = []
    for name, path in cfg.entries():
        tcfg = model_config_from(path)  # a folder without a tokenizer config fails here, naming it
        q = tcfg.quantizer
        multiscale = getattr(q, "kind", "vq") == "multiscale"
        toks.append(
            TokenizerPlan(
                name=name,
                path=str(Path(path).resolve()),
                folder=out / name,
                codebook_size=q.codebook_size,
                num_tokens=tcfg.tokens,
                params=tokenizer_params(path),
                scales=[int(p) for p in q.scales] if multiscale else [],
                code_dim=q.code_dim,
                not_applicable=_not_applicable(cfg, name, getattr(q, "kind", "vq"), multiscale),
            )
        )
    if cfg.downstream == ["var"] and all(tok.not_applicable for tok in toks):
        raise ValueError(
            f"downstream=[var], but none of the tokenizers {[t.name for t in toks]} is multi-scale "
            "(quantizer.kind=multiscale): no VAR could be trained; add downstream gpt or a multi-scale tokenizer"
        )
    max_steps = {"train": 0, "train-var": 0}
    for tok in toks:  # the recipes at every tokenizer's sizes (the class count is checked with its codes)
        for stage, model in (("train", "gpt"), ("train-var", "var")):
            if model not in cfg.downstream or stage in tok.not_applicable:
                continue
            run = recipe_config(cfg, tok, cfg.num_classes or 1, stage)
            key = "recipe" if stage == "train" else "var_recipe"
            max_steps[stage], every = run.train.max_steps, run.eval.every_steps
            if every <= 0 or max_steps[stage] % every:
                raise ConfigError(
                    f"{key} {getattr(cfg, key)}: eval.every_steps={every} does not divide train.max_steps="
                    f"{max_steps[stage]}, so the {model.upper()} would not log val/loss_ce at its last step; add "
                    f"the {key} override eval.every_steps=N with N dividing {max_steps[stage]}"
                )
            check_global_batch(run, cfg.job_for(stage).world_size if submit else cfg.nproc)
            if stage == "train-var":  # what load_quantizer checks when the VAR starts, checked now
                _check_var_sizes(run.model, tok)
    for tok in toks:  # one line a tokenizer: its VAR stages (and unused extraction) are n/a, the rest goes on
        if tok.not_applicable:
            why = tok.not_applicable[DOWNSTREAM_STAGES["var"][0]]
            log.warning(
                "%s: stages %s are %s: %s", tok.name, ", ".join(tok.not_applicable), NOT_APPLICABLE, why
            )
    plan = Plan(
        cfg, out, toks, cfg.stages(), max_steps=max_steps["train"], var_max_steps=max_steps["train-var"]
    )
    _check_stage_overrides(plan)
    if submit and check_cluster:
        from tokscale.jobs.cluster import validate

        requests = {
            json.dumps(asdict(cfg.job_for(stage)), sort_keys=True) for stage in (*plan.stages, CONTINUATION)
        }
        for request in sorted(
            requests
        ):  # sinfo + sbatch --test-only for each distinct request: nothing is queued
            validate(JobConfig(**json.loads(request)))
    return plan


def _check_var_sizes(model, tok: TokenizerPlan) -> None:
    """The VAR's scales, code width and vocabulary after the var_recipe_overrides against the tokenizer's."""
    from tokscale.config import ConfigError

    for key, have, want in (
        ("scales", list(model.scales), tok.scales),
        ("code_dim", model.code_dim, tok.code_dim),
    ):
        if have != want:
            raise ConfigError(
                f"var_recipe_overrides: model.{key}={have}, but tokenizer {tok.name!r} has quantizer.{key}={want} "
                "(the pipeline sets it from the tokenizer); remove the override"
            )
    if model.vocab_size < tok.codebook_size:
        raise ConfigError(
            f"var_recipe_overrides: model.vocab_size={model.vocab_size} is below tokenizer {tok.name!r}'s "
            f"codebook_size {tok.codebook_size}; remove the override"
        )


def _check_stage_overrides(plan: Plan) -> None:
    """Each command's config from the stage's settings and overrides, as the command will build it (paths are
    placeholders: they name outputs not made yet), so that a bad value or key fails now, not hours later."""
    from tokscale.autoregressive.ar_probe import ArProbeConfig
    from tokscale.autoregressive.gen_eval import GenEvalConfig
    from tokscale.autoregressive.var_sample import var_sample_config
    from tokscale.config import ConfigError, load_config
    from tokscale.tokenizers.eval_runner import EvalJobConfig

    cfg, x = plan.cfg, "/placeholder"
    r, a = cfg.recon, cfg.ar_probe
    recon = ["task=recon", f"tokenizer={x}", f"data.eval_shards={x}", f"eval.num_samples={r.num_samples}"]
    recon += [f"eval.batch_size={r.batch_size}"]

    def gen(g: GenStageConfig) -> list[str]:
        out = [f"{k}={x}" for k in ("gpt", "tokenizer", "reference", "out", "inception_weights")]
        out += [f"num_samples={g.num_samples}", f"batch_size={g.batch_size}", f"class_rule={g.class_rule}"]
        out += [f"precision={g.precision}", f"search_samples={g.search_samples}", f"seed={g.seed}"]
        out += [f"sample.{k}={getattr(g, k)}" for k in ("cfg_scale", "cfg_schedule", "cfg_start_ratio")]
        out += [f"sample.{k}={getattr(g, k)}" for k in ("temperature", "top_k", "top_p")]
        return out + ([f"cfg_search={g.cfg_search}"] if g.cfg_search else [])

    probe = [f"gpt={x}", f"tokenizer={x}", f"data.train_shards={x}", f"data.eval_shards={x}"]
    probe += [f"probe.{k}={getattr(a, k)}" for k in ("epochs", "warmup_epochs", "batch_size")]
    probe += [f"precision={a.precision}", f"num_train={a.num_train}", f"num_val={a.num_val}"]
    probe += [f"data.batch_size={a.forward_batch}"] if a.forward_batch else []
    checks = [
        ("recon", EvalJobConfig, recon, r.overrides),
        ("gen", GenEvalConfig, gen(cfg.gen), cfg.gen.overrides),
    ]
    checks.append(("ar_probe", ArProbeConfig, probe, a.overrides))
    if "var" in cfg.downstream:
        checks.append(("gen_var", GenEvalConfig, gen(cfg.gen_var), cfg.gen_var.overrides))
    for key, schema, base, overrides in checks:
        try:
            loaded = load_config(schema, None, base + list(overrides))
            if key == "gen_var":  # what a VAR samples with: a step schedule or a token interval is refused
                var_sample_config(loaded.sample, loaded.var)
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"{key} (its settings and {key}.overrides): {err}") from None
        g = getattr(cfg, key)
        if (
            key.startswith("gen")
            and g.class_rule == "balanced"
            and cfg.num_classes
            and g.num_samples % cfg.num_classes
        ):
            raise ConfigError(
                f"{key}.class_rule=balanced needs {key}.num_samples={g.num_samples} a multiple of num_classes="
                f"{cfg.num_classes}"
            )


# -- stages ---------------------------------------------------------------------------------------------------------
def stage_finished(plan: Plan, tok: TokenizerPlan, stage: str) -> bool:
    if stage in TRAIN_STAGES:
        from tokscale.checkpoint import latest_checkpoint

        found = latest_checkpoint(tok.stage_dir(stage))
        return found is not None and found[0] >= (plan.max_steps if stage == "train" else plan.var_max_steps)
    return (tok.stage_dir(stage) / MARKERS[stage]).is_file()


def token_num_classes(folder: Path) -> int:
    """The largest label in a token-shard folder + 1, reading only each shard's labels.npy."""
    import io
    import tarfile

    import numpy as np

    top = -1
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:  # random access: the codes are skipped, not read
            member = tar.extractfile("labels.npy")
            labels = np.load(io.BytesIO(member.read()), allow_pickle=False)
        if labels.size:
            top = max(top, int(labels.max()))
    if top < 0:
        raise ValueError(f"{folder}: no labelled token shards to count the classes of; set num_classes=N")
    return top + 1


def stage_argv(plan: Plan, tok: TokenizerPlan, stage: str, job_config: Path | None = None) -> list[str]:
    """The ``tokscale`` arguments of one stage: local (``--nproc``) or submitted (``--job-config FILE``)."""
    cfg, d = plan.cfg, tok.stage_dir(stage)
    train, val = _local(cfg.train_data), _local(cfg.val_data)
    ref, weights = str(Path(cfg.reference).resolve()), str(Path(cfg.inception_weights).resolve())
    run = ["--submit", "--job-config", str(job_config)] if job_config else ["--nproc", str(cfg.nproc)]
    if stage == "recon":
        r = cfg.recon
        argv = ["eval", "recon", tok.path, *r.overrides, "--data", val, "--out", str(d)]
        argv += ["--inception-weights", weights, "--num-samples", str(r.num_samples)]
        argv += ["--batch-size", str(r.batch_size)]
        argv += ["--vgg-weights", str(Path(r.vgg_weights).resolve())] if r.vgg_weights else ["--no-lpips"]
        argv += ["--reference", str(Path(r.reference).resolve())] if r.reference else []
        return argv + run
    if stage in ("extract-train", "extract-val"):
        is_train = stage == "extract-train"
        aug = cfg.extract.train_aug if is_train else cfg.extract.val_aug
        argv = ["extract", tok.path, str(d), "--data", train if is_train else val, "--aug", aug]
        argv += ["--split", "train" if is_train else "eval", "--batch-size", str(cfg.extract.batch_size)]
        return argv + run
    if stage in TRAIN_STAGES:
        num_classes = cfg.num_classes or token_num_classes(tok.stage_dir("extract-train"))
        trainer = TRAIN_STAGES[stage]
        recipe, overrides = (
            (cfg.recipe, train_overrides(cfg, tok, num_classes))
            if stage == "train"
            else (cfg.var_recipe, var_overrides(cfg, tok, num_classes))
        )
        if job_config:
            return ["submit", trainer, recipe, *overrides, "--job-config", str(job_config), "--json"]
        return ["train", trainer, recipe, *overrides, "--nproc", str(cfg.nproc)]
    if stage in ("gen", "gen-var"):  # the GPT's or the VAR's samples, each with its own settings
        g = cfg.gen if stage == "gen" else cfg.gen_var
        model = str(tok.stage_dir("train" if stage == "gen" else "train-var"))
        argv = ["eval", "gen", model, *g.overrides, "--tokenizer", tok.path, "--reference", ref]
        argv += ["--inception-weights", weights, "--out", str(d), "--num-samples", str(g.num_samples)]
        argv += ["--batch-size", str(g.batch_size), "--class-rule", g.class_rule, "--seed", str(g.seed)]
        argv += ["--cfg-scale", str(g.cfg_scale), "--cfg-schedule", g.cfg_schedule]
        argv += ["--cfg-start-ratio", str(g.cfg_start_ratio), "--temperature", str(g.temperature)]
        argv += ["--top-k", str(g.top_k), "--top-p", str(g.top_p), "--precision", g.precision]
        argv += (
            ["--cfg-search", g.cfg_search, "--search-samples", str(g.search_samples)] if g.cfg_search else []
        )
        return argv + run
    gpt = str(tok.stage_dir("train"))
    a = cfg.ar_probe
    argv = ["eval", "ar-probe", gpt, *a.overrides, "--tokenizer", tok.path, "--train-data", train]
    argv += ["--eval-data", val, "--out", str(d), "--epochs", str(a.epochs)]
    argv += [
        "--warmup-epochs",
        str(a.warmup_epochs),
        "--batch-size",
        str(a.batch_size),
        "--precision",
        a.precision,
    ]
    for flag, value in (
        ("--forward-batch", a.forward_batch),
        ("--num-train", a.num_train),
        ("--num-val", a.num_val),
    ):
        argv += [flag, str(value)] if value else []
    return argv + run


def _child_env() -> dict[str, str]:
    """This environment without the distributed and Slurm variables of the process that runs the pipeline (a
    continuation is itself a Slurm task): a stage's command sets up its own ranks, its jobs their own."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not (k.startswith(("SLURM_", "SUBMITIT_", "SBATCH_")) and k != "SLURM_CONF")
    }
    env.pop("TOKSCALE_RANK_REPORTS", None)
    env["PYTHONUNBUFFERED"] = "1"  # the stage log fills as the command runs
    return env


def command_line(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "tokscale.cli", *argv]


def error_line(log_path: Path, start: int) -> str:
    """The ``tokscale: error:`` line the command printed after byte ``start`` of its log (else its last line)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tokscale: error:")]
    return (errors[-1][len("tokscale: error:") :].strip() if errors else (lines[-1] if lines else ""))[:1000]


def run_logged(argv: list[str], log_path: Path, header: str, capture: bool = False) -> tuple[int, int, str]:
    """Run ``tokscale ARGV``, appending its output to ``log_path`` after ``header``; returns (exit code, the log's
    size before it, stdout when ``capture``). Ctrl-C or SIGTERM here stops the command too."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as f:
        f.write(
            f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {header}\n$ {shlex.join(command_line(argv))}\n".encode()
        )
        f.flush()
        start = f.tell()
        stdout = subprocess.PIPE if capture else f
        proc = subprocess.Popen(command_line(argv), stdout=stdout, stderr=f, env=_child_env())
        try:
            out, _ = proc.communicate()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        text = out.decode(errors="replace") if capture and out else ""
        if text:
            f.write(text.encode())
    return proc.returncode, start, text


# -- state ----------------------------------------------------------------------------------------------------------
def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_state(out: Path) -> dict:
    path = out / STATE_NAME
    if path.is_file():
        return json.loads(path.read_text())
    return {"format": STATE_FORMAT, "out": str(out), "invocations": [], "tokenizers": {}}


def write_state(out: Path, state: dict) -> None:
    state["updated"] = now()
    tmp = out / f".{STATE_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(out / STATE_NAME)


@contextlib.contextmanager
def state_lock(out: Path, wait: bool):
    """The pipeline's lock on OUT: a local run holds it throughout (a second one is refused); submissions and
    continuations hold it while they read, submit and write (they wait for each other)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".probe.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RuntimeError(
                f"another `tokscale probe` is running on {out} (it holds {out / '.probe.lock'}); wait for it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tokenizer_record(state: dict, tok: TokenizerPlan) -> dict:
    rec = state["tokenizers"].setdefault(tok.name, {"path": tok.path, "stages": {}})
    if rec["path"] != tok.path:
        raise ValueError(
            f"{tok.folder}: the outputs of tokenizer {tok.name!r} come from {rec['path']}, not {tok.path}; give "
            "this tokenizer another name or another --out"
        )
    rec["params"] = tok.params
    return rec


def begin_invocation(plan: Plan, mode: str, argv: list[str]) -> dict:
    from tokscale.config import to_yaml

    state = read_state(plan.out)
    for tok in plan.tokenizers:
        _tokenizer_record(state, tok)
    state["config"] = str(plan.config_path)
    state["invocations"].append({"time": now(), "mode": mode, "argv": argv, "pid": os.getpid()})
    if mode != CONTINUATION:  # a continuation reads this file; the command that starts a chain writes it
        plan.config_path.write_text(to_yaml(plan.cfg))
    write_state(plan.out, state)
    return state


def found_finished(s: dict, submitted_chain: bool) -> None:
    """A finished stage, as this invocation found it: its job's work (done) or an earlier run's (skipped)."""
    if submitted_chain and s.get("status") == "submitted":
        s.update(status="done", ended=now())
    elif not (submitted_chain and s.get("status") == "done"):
        s.update(status="skipped", skipped_at=now())


# -- local run ------------------------------------------------------------------------------------------------------
def run_local(plan: Plan, argv: list[str]) -> dict:
    """Every stage of every tokenizer in turn, here; finished stages are skipped, the rest resume."""
    with state_lock(plan.out, wait=False):
        state = begin_invocation(plan, "local", argv)
        rec: dict = {}
        try:
            for tok in plan.tokenizers:
                rec = state["tokenizers"][tok.name]
                rec["status"] = "running"
                for stage in plan.stages:
                    _run_stage(plan, tok, stage, rec["stages"].setdefault(stage, {}), state)
                rec["status"] = "done"
                write_state(plan.out, state)
                write_results(plan)
        except BaseException as err:
            rec["status"] = "failed" if isinstance(err, Exception) else "interrupted"
            write_state(plan.out, state)
            try:
                write_results(plan)  # the table of what finished, before the error is reported
            except Exception as report_err:  # never hide the stage's failure behind the report's
                log.warning("could not write the results table: %s", report_err)
            raise
    return summary(plan)


def mark_not_applicable(tok: TokenizerPlan, stage: str, s: dict) -> None:
    if s.get("status") != NOT_APPLICABLE:
        s.clear()  # nothing of an earlier record applies
        s.update(status=NOT_APPLICABLE, reason=tok.not_applicable[stage], at=now())


def _run_stage(plan: Plan, tok: TokenizerPlan, stage: str, s: dict, state: dict) -> None:
    if stage in tok.not_applicable:
        mark_not_applicable(tok, stage, s)
        write_state(plan.out, state)
        return
    if stage_finished(plan, tok, stage):
        found_finished(s, submitted_chain=False)
        log.info("%s %s: finished before, skipped", tok.name, stage)
        write_state(plan.out, state)
        return
    argv = stage_argv(plan, tok, stage)
    attempt = int(s.get("attempts", 0)) + 1
    log_path = tok.log_path(stage)
    s.update(status="running", started=now(), command=shlex.join(command_line(argv)), log=str(log_path))
    s.update(attempts=attempt, ended=None, seconds=None, error=None, exit_code=None)
    write_state(plan.out, state)
    log.info("%s %s: running (log %s)", tok.name, stage, log_path)
    t0 = time.time()
    try:
        code, start, _ = run_logged(argv, log_path, f"{tok.name} {stage} attempt {attempt}")
    except BaseException:
        s.update(status="interrupted", ended=now(), seconds=round(time.time() - t0, 1))
        raise
    s.update(ended=now(), seconds=round(time.time() - t0, 1), exit_code=code)
    if code == 0 and not stage_finished(plan, tok, stage):
        code, why = 1, f"it exited 0 but left no {MARKERS.get(stage, 'checkpoint at train.max_steps')}"
    elif code < 0:  # Popen: killed by a signal
        why = f"killed by {signal.Signals(-code).name}; {error_line(log_path, start)}"
    else:
        why = error_line(log_path, start) if code else ""
    if code:
        s.update(status="failed", error=why)
        raise StageFailed(
            f"stage {stage!r} of tokenizer {tok.name!r} failed (exit {code}): {why} (log: {log_path}); rerun the "
            "same `tokscale probe` command to resume from this stage",
            log_path=str(log_path),
        )
    s["status"] = "done"
    write_state(plan.out, state)


# -- results ---------------------------------------------------------------------------------------------------------
ROW_KEYS = (
    "tokenizer",
    "params",
    "rfid",
    "psnr",
    "codebook_usage",
    "ar_val_loss",
    "gfid",
    "is",
    "precision",
    "recall",
    "probe_top1",
    "var_val_loss",
    "var_gfid",
    "var_is",
    "var_precision",
    "var_recall",
)  # fmt: skip (tokscale.jobs.probe_cli.COLUMNS and VAR_COLUMNS: their headers and formats)
VAR_KEYS = ROW_KEYS[-5:]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def last_val_loss(run_dir: Path) -> float | None:
    value = None
    try:
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    value = json.loads(line).get("val/loss_ce", value)
    except OSError:
        return None
    return value


def result_row(plan: Plan, tok: TokenizerPlan) -> dict:
    """One tokenizer's numbers, from the outputs of its finished stages only (None where a stage has not run,
    "n/a" where it cannot: the VAR's of a tokenizer that is not multi-scale)."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(tokenizer=tok.name, params=tok.params)
    done = {stage: stage_finished(plan, tok, stage) for stage in STAGES}
    if done["recon"]:
        m = _read_json(tok.stage_dir("recon") / "metrics.json").get("metrics", {})
        row.update(rfid=m.get("rfid"), psnr=m.get("psnr"), codebook_usage=m.get("codebook_usage"))
    if done["train"]:
        row["ar_val_loss"] = last_val_loss(tok.stage_dir("train"))
    if done["gen"]:
        row.update(_gen_metrics(tok.stage_dir("gen")))
    if done["ar-probe"]:
        row["probe_top1"] = _read_json(tok.stage_dir("ar-probe") / "metrics.json").get("top1")
    if "train-var" in tok.not_applicable:
        row.update(dict.fromkeys(VAR_KEYS, NOT_APPLICABLE))
        return row
    if done["train-var"]:
        row["var_val_loss"] = last_val_loss(tok.stage_dir("train-var"))
    if done["gen-var"]:
        row.update({f"var_{k}": v for k, v in _gen_metrics(tok.stage_dir("gen-var")).items()})
    return row


def _gen_metrics(folder: Path) -> dict:
    """gFID, IS, precision and recall from an `eval gen` folder's results.json (None where missing)."""
    g = _read_json(folder / "results.json")
    return {"gfid": g.get("fid"), "is": g.get("is_mean"), "precision": g.get("precision"), "recall": g.get("recall")}


def write_results(plan: Plan) -> dict[str, str]:
    """OUT/results.csv, OUT/results.md and OUT/tradeoff.png from what is finished now."""
    from tokscale.jobs.probe_cli import report_columns, write_report

    cfg = plan.cfg
    rows = [result_row(plan, tok) for tok in plan.tokenizers]
    recipes = [cfg.recipe] * ("gpt" in cfg.downstream) + [cfg.var_recipe] * ("var" in cfg.downstream)
    title = f"Tokenizer probe: {' + '.join(recipes)} on {cfg.train_data}"
    return write_report(rows, plan.out, title, report_columns(cfg.downstream))


def summary(plan: Plan) -> dict:
    state = read_state(plan.out)
    return {
        "out": str(plan.out),
        "results": {k: str(plan.out / v) for k, v in (("csv", "results.csv"), ("md", "results.md"),
                                                         ("png", "tradeoff.png"), ("state", STATE_NAME))},
        "rows": [result_row(plan, tok) for tok in plan.tokenizers],
        "stages": {n: {s: r.get("status") for s, r in rec["stages"].items()} for n, rec in state["tokenizers"].items()
                   if n in {t.name for t in plan.tokenizers}},
    }  # fmt: skip
