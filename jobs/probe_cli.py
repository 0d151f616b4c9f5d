"""``tokscale probe``: several tokenizers through recon -> extraction -> GPT (AR-probing recipe) -> val loss ->
gFID -> AR probe, here or as chains of Slurm jobs, and the report: one results table and the trade-off plot.

    tokscale probe runs/tok-S runs/tok-B --train-data '/data/in1k/train-{000000..001023}.tar' \\
        --val-data '/data/in1k/val-{000000..000049}.tar' --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --out probes/in1k --nproc 8 \\
        --recipe-override data.batch_size=32
    tokscale probe --config probes.yaml --out probes/in1k --submit -p gpu --gpus-per-node 8 -t 1440
    tokscale probe ... gen.num_samples=10000 ar_probe.epochs=10 stage_jobs.train.nodes=4     # KEY=VALUE overrides
    tokscale probe runs/ms-tok ... --downstream gpt,var --var-recipe-override data.batch_size=48   # + a VAR

Positional TOKENIZER items are run directories or exports (named after their folder; they replace the config's
``tokenizers``); positional KEY=VALUE items are dotlist overrides of
:class:`tokscale.jobs.probe.ProbePipelineConfig`; ``--recipe-override`` items are added to its
``recipe_overrides`` (the c2i dotlist), ``--var-recipe-override`` items to ``var_recipe_overrides``;
``--downstream gpt,var`` sets ``downstream`` (the VAR's stages and columns). The Slurm flags set ``job`` (every stage's request; ``stage_jobs.<stage>``
changes one stage's). The pipeline itself is tokscale.jobs.probe; this module parses the command and draws the
report (``OUT/results.csv``, ``OUT/results.md``, ``OUT/tradeoff.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
from pathlib import Path

from tokscale.plot import PALETTE, draw_axes, font, nice_ticks  # noqa: F401 (nice_ticks: re-exported)


def add_command(sub: argparse._SubParsersAction) -> None:
    from tokscale.jobs.cli import add_slurm_flags
    from tokscale.jobs.probe import STAGES  # light: the pipeline imports torch only inside its functions

    p = sub.add_parser(
        "probe",
        help="probe tokenizers downstream: rFID, codes, GPT val loss, gFID, AR probe; one table + plot (resumable)",
        description=(
            "tokscale probe TOKENIZER [TOKENIZER ...] --train-data SHARDS --val-data SHARDS --reference REF.npz "
            "--inception-weights PTH --out DIR [--recipe c2i/gigatok-probe-B] [--config PROBE.yaml] [KEY=VALUE ...] "
            "[--nproc N | --submit + Slurm flags]. For each tokenizer: eval recon -> extract (train, val) -> "
            "train c2i -> eval gen -> eval ar-probe (--downstream gpt, the default; --downstream gpt,var adds "
            "train var -> eval gen for each multi-scale tokenizer, n/a for the others), under DIR/<name>/. "
            "Finished stages are skipped; a rerun "
            "resumes the stage it stopped in. Writes DIR/probe_state.json, DIR/<name>/logs/<stage>.log, "
            "DIR/results.csv, DIR/results.md and DIR/tradeoff.png. With --submit: a chain of Slurm jobs per "
            "tokenizer, each stage followed by a continuation job that submits the next."
        ),
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="TOKENIZER|KEY=VALUE",
        help="tokenizer run directories or exports, and dotlist overrides such as gen.num_samples=10000",
    )
    p.add_argument(
        "--config", default=None, help="YAML of ProbePipelineConfig fields (tokenizers, stages, jobs)"
    )
    p.add_argument("--train-data", default=None, help="training image shards (path, pattern, 'embedded')")
    p.add_argument("--val-data", default=None, help="validation image shards")
    p.add_argument("--reference", default=None, help="ADM-format npz for gFID / IS / precision / recall")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity's Inception .pth (local file)")
    p.add_argument("--out", default=None, help="output folder DIR")
    p.add_argument("--recipe", default=None, help="c2i recipe (default c2i/gigatok-probe-B)")
    p.add_argument(
        "--recipe-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="c2i override added to recipe_overrides, repeatable (e.g. data.batch_size=32)",
    )
    p.add_argument(
        "--downstream",
        default=None,
        metavar="MODELS",
        help="the models trained on each tokenizer's codes, comma-separated: gpt (default), var (a multi-scale "
        "tokenizer's: train var + eval gen; n/a for any other tokenizer) or gpt,var",
    )
    p.add_argument("--var-recipe", default=None, help="var recipe (default var/var-d16)")
    p.add_argument(
        "--var-recipe-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="var override added to var_recipe_overrides, repeatable (e.g. data.batch_size=32)",
    )
    p.add_argument("--until", choices=STAGES, default=None, help="stop after this stage (last_stage)")
    p.add_argument("--nproc", type=int, default=None, help="local processes per stage (default 1)")
    slurm = p.add_argument_group("Slurm (a chain of jobs per tokenizer instead of running here)")
    slurm.add_argument("--submit", action="store_true", help="submit each tokenizer's next stage and return")
    add_slurm_flags(slurm)
    p.set_defaults(func=probe_command)


def _quoted(value) -> str:
    """A dotlist value that stays a string (or list of strings) whatever it looks like: a JSON literal, which
    YAML reads back as written."""
    return json.dumps(value)


def dotlist_from_args(args: argparse.Namespace) -> list[str]:
    """The ProbePipelineConfig overrides the flags stand for, then the positional KEY=VALUE items."""
    from tokscale.config import load_yaml, resolve_config_path
    from tokscale.jobs.cli import JOB_FLAGS

    dot = []
    for attr, key in (("train_data", "train_data"), ("val_data", "val_data"), ("reference", "reference"),
                      ("inception_weights", "inception_weights"), ("out", "out"), ("recipe", "recipe"),
                      ("var_recipe", "var_recipe"), ("until", "last_stage")):  # fmt: skip
        if getattr(args, attr):
            dot.append(f"{key}={_quoted(getattr(args, attr))}")
    if args.downstream is not None:  # checked by the config: an unknown, empty or repeated model is an error
        dot.append(f"downstream={_quoted([item.strip() for item in args.downstream.split(',')])}")
    if args.nproc is not None:
        dot.append(f"nproc={args.nproc}")
    tokenizers = [item for item in args.items if "=" not in item]
    if tokenizers:
        dot.append(f"tokenizers={_quoted(tokenizers)}")
    for key, added in (
        ("recipe_overrides", args.recipe_override),
        ("var_recipe_overrides", args.var_recipe_override),
    ):
        if added:
            base = []
            if args.config:
                base = list(load_yaml(resolve_config_path(args.config)).get(key, None) or [])
            dot.append(f"{key}={_quoted([str(x) for x in base] + list(added))}")
    if args.job_config:
        from omegaconf import OmegaConf

        for key, value in OmegaConf.to_container(OmegaConf.load(args.job_config)).items():
            if key == "extra" and isinstance(value, dict):
                dot += [f"job.extra.{k}={_quoted(v)}" for k, v in value.items()]
            else:
                dot.append(f"job.{key}={_quoted(value)}")
    for _, dest, _, _ in JOB_FLAGS:
        value = getattr(args, f"job_{dest}")
        if value is not None:
            dot.append(f"job.{dest}={_quoted(value)}")
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm {item!r}: expected OPTION=VALUE, e.g. --slurm mail-type=END")
        dot.append(f"job.extra.{key.lstrip('-')}={_quoted(value)}")
    return dot + [item for item in args.items if "=" in item]


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the running stage's command too (tokscale.jobs.probe.run_logged)


def probe_command(args: argparse.Namespace) -> int:
    from tokscale.jobs.probe import load_probe_config, make_plan, run_local
    from tokscale.jobs.probe_chain import submit_chain

    cfg = load_probe_config(args.config, dotlist_from_args(args))  # a bad key fails here, naming it
    plan = make_plan(cfg, submit=args.submit, check_cluster=args.submit)  # nothing written before this passes
    args.log_dir = str(plan.out / "logs")  # where tokscale.errors writes a failure's traceback
    argv = ["tokscale", *sys.argv[1:]]
    if args.submit:
        print(json.dumps({"out": str(plan.out), "tokenizers": submit_chain(plan, argv)}, indent=2))
        return 0
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(json.dumps(run_local(plan, argv), indent=2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# -- the report -----------------------------------------------------------------------------------------------------
COLUMNS = (  # (CSV key, Markdown header, format)
    ("tokenizer", "tokenizer", "{}"),
    ("params", "params", "{:,}"),
    ("rfid", "rFID", "{:.2f}"),
    ("psnr", "PSNR (dB)", "{:.2f}"),
    ("codebook_usage", "codebook usage", "{:.1%}"),
    ("ar_val_loss", "AR val loss", "{:.4f}"),
    ("gfid", "gFID", "{:.2f}"),
    ("is", "IS", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("probe_top1", "probe top-1 (%)", "{:.2f}"),
)
VAR_COLUMNS = (  # with downstream var: the VAR's, from train-var and gen-var
    ("var_val_loss", "VAR val loss", "{:.4f}"),
    ("var_gfid", "VAR gFID", "{:.2f}"),
    ("var_is", "VAR IS", "{:.2f}"),
    ("var_precision", "VAR precision", "{:.3f}"),
    ("var_recall", "VAR recall", "{:.3f}"),
)
TOKENIZER_COLUMNS = 5  # tokenizer, params, rFID, PSNR, usage: every downstream's table starts with them


def report_columns(downstream) -> tuple:
    """The table's columns for these downstream models: the tokenizer's, then the GPT's and/or the VAR's."""
    out = COLUMNS[:TOKENIZER_COLUMNS]
    out += COLUMNS[TOKENIZER_COLUMNS:] if "gpt" in downstream else ()
    return out + (VAR_COLUMNS if "var" in downstream else ())


def _cell(value, fmt: str) -> str:
    """None: blank (not run yet); a string ("n/a": cannot run for this tokenizer) as it is; else formatted."""
    if value is None:
        return ""
    return value if isinstance(value, str) else fmt.format(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _replace(path: Path, write) -> None:
    """Write through a temporary name and a rename: a reader (another continuation) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    tmp.replace(path)


def write_report(rows: list[dict], out: Path, title: str, columns: tuple = COLUMNS) -> dict[str, str]:
    """``out/results.csv`` (raw values: usage a fraction, top-1 in %), ``out/results.md`` (formatted) and
    ``out/tradeoff.png``; a value of None is a blank cell, "n/a" stays "n/a"."""
    out = Path(out)

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([key for key, _, _ in columns])
            for row in rows:
                writer.writerow(["" if row.get(k) is None else row[k] for k, _, _ in columns])

    _replace(out / "results.csv", write_csv)
    header = [h for _, h, _ in columns]
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    for row in rows:
        cells = [_cell(row.get(k), fmt) for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    keys = {k for k, _, _ in columns}
    notes = "rFID, PSNR and codebook usage: `eval recon` on the validation data"
    if "gfid" in keys:
        notes += (
            "; AR val loss: the GPT's validation cross-entropy at its last step; gFID, IS, precision, recall: "
            "`eval gen` against the reference; probe top-1: `eval ar-probe`"
        )
    if "var_gfid" in keys:
        notes += (
            "; VAR val loss: the VAR's validation cross-entropy at its last step; VAR gFID, IS, precision, recall: "
            "`eval gen` of the VAR against the reference; n/a: the tokenizer is not multi-scale, so no VAR"
        )
    lines += ["", notes + ". A blank cell: that stage has not finished."]
    _replace(out / "results.md", lambda p: p.write_text("\n".join(lines) + "\n"))
    draw_tradeoff(rows, out / "tradeoff.png", gpt="probe_top1" in keys)
    return {"csv": str(out / "results.csv"), "md": str(out / "results.md"), "png": str(out / "tradeoff.png")}


# -- the plot (PIL: matplotlib is not a dependency; axes, ticks, font and palette are tokscale.plot's) --------------


def _short_params(n: int | None) -> str:
    if not n:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def draw_tradeoff(
    rows: list[dict], path: Path, title: str = "Reconstruction vs generation trade-off", gpt: bool = True
) -> Path:
    """Two panels against rFID: gFID (lower is better) and AR-probe top-1 (higher is better); each tokenizer a
    disc of area proportional to its parameters, labelled with its name and size. A VAR's gFID (downstream var)
    is a square of the same colour and area in the gFID panel; without a GPT (``gpt=False``: downstream var alone)
    the second panel is the VAR's validation loss. Blank or n/a values are left out."""
    from PIL import Image, ImageDraw

    width, height = 1400, 640
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_axis, f_tick = font(22), font(16), font(13)
    draw.text((width // 2, 18), title, fill="black", font=f_title, anchor="ma")
    marker = "disc"
    if any(_number(r.get("var_gfid")) and _number(r.get("rfid")) for r in rows):
        marker = "disc (its GPT) or square (its VAR)" if gpt else "square (its VAR)"
    caption = f"each {marker} a tokenizer (name, parameters), its area proportional to the parameter count"
    draw.text((width // 2, height - 14), caption, fill="#555555", font=f_tick, anchor="md")
    sizes = [r["params"] for r in rows if r.get("params")]
    biggest = max(sizes) if sizes else 1
    colours = {r["tokenizer"]: PALETTE[i % len(PALETTE)] for i, r in enumerate(rows)}
    panels = [
        ("gFID (lower is better)", (("gfid", "disc"), ("var_gfid", "square")))
    ]  # (label, (key, marker)s)
    if gpt:
        panels.append(("AR probe top-1 % (higher is better)", (("probe_top1", "disc"),)))
    else:
        panels.append(("VAR val loss (lower is better)", (("var_val_loss", "square"),)))
    for i, (ylabel, series) in enumerate(panels):
        box = (
            90 + i * 690,
            70,
            90 + i * 690 + 560,
            height - 110,
        )  # the plotting area: left, top, right, bottom
        points = [
            (r["rfid"], r[k], r, marker)
            for k, marker in series
            for r in rows
            if _number(r.get("rfid")) and _number(r.get(k))
        ]
        _panel(img, draw, box, points, ylabel, colours, biggest, (f_axis, f_tick))
    path = Path(path)
    _replace(path, lambda p: img.save(p, format="PNG"))
    return path


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _cost(rect, taken: list, num_discs: int) -> int:
    """How much a label at ``rect`` covers: another label counts ten times a disc."""
    return sum((10 if i >= num_discs else 1) * _overlaps(rect, b) for i, b in enumerate(taken))


def _panel(img, draw, box, points, ylabel, colours, biggest, fonts) -> None:
    """One scatter panel in ``box`` (left, top, right, bottom): grid, ticks, axis labels, labelled discs."""
    f_axis, f_tick = fonts
    left, top, right, bottom = box
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]

    def span(values):  # 8 % room on each side, so that no disc sits on the frame; none below 0 (FIDs, %)
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 or abs(lo) * 0.1 or 1.0
        return nice_ticks(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)

    xt, yt = span(xs), span(ys)
    px = draw_axes(img, draw, box, xt, yt, "rFID (lower is better)", ylabel, fonts)
    if not points:
        draw.text(((left + right) / 2, (top + bottom) / 2), "no finished results yet", fill="#888888",
                  font=f_axis, anchor="mm")  # fmt: skip
        return
    discs = []  # (cx, cy, r, row, marker), the biggest first so that small discs stay visible on top
    for x, y, row, marker in sorted(points, key=lambda p: -(p[2].get("params") or 0)):
        cx, cy = px(x, y)
        discs.append((cx, cy, 6 + 18 * math.sqrt((row.get("params") or 0) / biggest), row, marker))
    for cx, cy, r, row, marker in discs:
        colour = colours[row["tokenizer"]]
        if marker == "square":  # the same area as the disc
            h = r * math.sqrt(math.pi) / 2
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour, outline="black", width=1)
        else:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline="black", width=1)
    taken = [(cx - r, cy - r, cx + r, cy + r) for cx, cy, r, _, _ in discs]
    # each label beside its marker, where it covers no marker and no other label
    for cx, cy, r, row, marker in discs:
        text = f"{row['tokenizer']} ({_short_params(row.get('params'))})"
        text = f"{row['tokenizer']} VAR" if marker == "square" else text
        tw, th = draw.textlength(text, font=f_tick), 16
        spots = [(cx + r + 5, cy - th / 2), (cx - r - 5 - tw, cy - th / 2), (cx - tw / 2, cy - r - th - 3),
                 (cx - tw / 2, cy + r + 3), (cx + r + 3, cy - r - th), (cx - r - 3 - tw, cy + r)]  # fmt: skip
        inside = [(tx, ty) for tx, ty in spots if left + 3 <= tx and tx + tw <= right - 3 and top + 3 <= ty
                  and ty + th <= bottom - 3]  # fmt: skip

        tx, ty = min(
            inside or spots, key=lambda p: _cost((p[0], p[1], p[0] + tw, p[1] + th), taken, len(discs))
        )
        tx, ty = min(max(tx, left + 3), right - tw - 3), min(max(ty, top + 3), bottom - th - 3)
        taken.append((tx, ty, tx + tw, ty + th))
        draw.rectangle([tx - 2, ty - 1, tx + tw + 2, ty + th], fill="white")
        draw.text((tx, ty), text, fill="black", font=f_tick)
