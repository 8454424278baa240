"""``omnigen eval miniworld | geneval | geneval-summary | emu-edit | dreambench | control``.

Each prints a table (ours beside the paper's OmniGen-v1 number where one is published) and writes JSON.
The benchmarks that generate many images go through `omnigen.batch`, so they resume after a kill and
scale out under ``torchrun --nproc_per_node N -m omnigen eval ...`` (rank 0 scores and writes).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from omnigen.batch.cli import add_batch_args
from omnigen.batch.requests import PARAMETERS
from omnigen.cli.args import add_generation_args, generation_overrides, load_pipeline

logger = logging.getLogger(__name__)


def _add_generation_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The generation flags of GenerationConfig (the batch request keys) and the base seed."""
    p.add_argument(
        "--seed", type=int, default=0, help="noise seed (image k of a prompt: seed + k; default 0)"
    )
    add_generation_args(p, skip=("seed", "num_images_per_prompt", *skip))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return generation_overrides(args, [name for name in PARAMETERS if hasattr(args, name)])


def register(sub: argparse._SubParsersAction) -> None:
    from omnigen.miniworld.world import SPLITS

    p = sub.add_parser("eval", help="benchmarks: miniworld, GenEval, EMU-Edit, DreamBench, controllability")
    ev = p.add_subparsers(dest="eval_command", required=True)

    m = ev.add_parser("miniworld", help="accuracy per family and task on a split of the miniature world")
    m.add_argument(
        "--split",
        choices=SPLITS,
        default="heldout",
        help="heldout, compositional (withheld colour-shape pairs), phrasing (held-out wordings) or train",
    )
    m.add_argument("--n", type=int, required=True, help="number of samples")
    m.add_argument("--out", required=True, help="JSON file to write")
    m.add_argument("--data-seed", type=int, default=0, help="seed of the generated split (default 0)")
    m.add_argument("--size", type=int, default=16, help="image side (default 16)")
    m.add_argument("--tasks", nargs="*", default=None, help="restrict to task kinds or families")
    _add_generation_args(m, skip=("height", "width"))  # --size
    add_batch_args(m)
    m.set_defaults(func=_run_miniworld, batch_size=16)

    g = ev.add_parser("geneval", help="generate GenEval's prompts in the layout its official scorer reads")
    g.add_argument("metadata", help="GenEval's prompts/evaluation_metadata.jsonl")
    g.add_argument("--out", required=True, help="output folder (<index>/samples/<k>.png)")
    g.add_argument("--n-samples", type=int, default=4, help="images per prompt (GenEval: 4)")
    _add_generation_args(g)
    add_batch_args(g)
    g.set_defaults(func=_run_geneval)

    s = ev.add_parser("geneval-summary", help="table of the official GenEval scorer's results JSONL")
    s.add_argument("results", help="the JSONL written by GenEval's evaluation/evaluate_images.py")
    s.add_argument("--json", default=None, help="also write the summary here")
    s.set_defaults(func=_run_geneval_summary)

    e = ev.add_parser("emu-edit", help="EMU-Edit test set: generate edits, CLIP-I / CLIP-T / DINO")
    e.add_argument("--data", required=True, help="local copy of facebook/emu_edit_test_set (folder or file)")
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None, help="first N samples only")
    _add_scoring_args(e)
    _add_generation_args(e)
    add_batch_args(e)
    e.set_defaults(func=_run_emu_edit)

    d = ev.add_parser("dreambench", help="DreamBench: subject-driven generation, DINO / CLIP-I / CLIP-T")
    d.add_argument("--data", required=True, help="the dataset/ folder of google/dreambooth")
    d.add_argument("--n-samples", type=int, default=4, help="images per prompt (default 4)")
    d.add_argument("--subjects", nargs="*", default=None, help="only these subjects")
    d.add_argument("--template", default=None, help="prompt template with {prompt} and {cls}")
    _add_scoring_args(d)
    _add_generation_args(d)
    add_batch_args(d)
    d.set_defaults(func=_run_dreambench)

    c = ev.add_parser("control", help="controllability (ControlNet++ protocol): canny, hed, depth, seg")
    c.add_argument("--kind", choices=["canny", "hed", "depth", "seg"], required=True)
    c.add_argument(
        "--data", required=True, help="local copy of the evaluation set (parquet folder/file or JSONL)"
    )
    c.add_argument("--split", default="validation")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--resolution", type=int, default=512)
    c.add_argument("--n-samples", type=int, default=4, help="images per condition (default 4)")
    c.add_argument(
        "--annotator", default=None, help="detector: local folder / hub id (depth, seg) or module:factory"
    )
    c.add_argument(
        "--annotator-weights", default=None, help="passed as weights= to a module:factory annotator"
    )
    c.add_argument("--num-classes", type=int, default=150, help="segmentation classes (ADE20K: 150)")
    c.add_argument("--template", default=None, help="prompt template with {caption} and the image tag")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--json", default=None, help="scores JSON (default: OUT/control_<kind>.json)")
    c.add_argument("--score-only", action="store_true", help="score the images already in OUT")
    _add_generation_args(c)
    add_batch_args(c)
    c.set_defaults(func=_run_control)


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP folder or hub id (ViT-L/14)")
    p.add_argument(
        "--dino", default="facebook/dino-vits16", help="DINO ViT-S/16 folder or hub id ('' to skip)"
    )
    p.add_argument("--json", default=None, help="scores JSON (default: in OUT)")
    p.add_argument("--score-only", action="store_true", help="score the images already in OUT")


# --------------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------------


def _generate(args: argparse.Namespace, requests: list, out: Path, **kwargs: Any) -> int:
    """Run the batch for `requests` (every rank); returns this process's rank."""
    from omnigen.batch.cli import generate_requests

    report = generate_requests(args, requests, out, **kwargs)
    logger.info(
        "rank %d: %d generated, %d already done, %d failed",
        report.rank,
        report.generated,
        report.already_done,
        report.failed,
    )
    return report.rank


def _print(text: str) -> None:
    print(text, flush=True)  # the CLI's output


def _run_miniworld(args: argparse.Namespace) -> int:
    from omnigen.eval import miniworld
    from omnigen.eval.common import write_json

    pipe = load_pipeline(args)
    started = time.perf_counter()
    result = miniworld.evaluate(
        pipe,
        args.split,
        args.n,
        data_seed=args.data_seed,
        seed=args.seed,
        size=args.size,
        batch_size=args.batch_size,
        tasks=args.tasks,
        progress=not args.no_progress,
        **_overrides(args),
    )
    seconds = time.perf_counter() - started
    summary = result.summary()
    data = {
        "benchmark": "miniworld",
        "seconds": round(seconds, 2),  # generation and scoring, this machine
        "split": args.split,
        "n": args.n,
        "data_seed": args.data_seed,
        "seed": args.seed,
        "size": args.size,
        "model": args.model,
        "overrides": _overrides(args),
        **summary,
        "records": result.records,
        "ablation_records": result.ablation_records,
    }
    path = write_json(args.out, data)
    _print(miniworld.format_summary(summary))
    _print(f"wrote {path}")
    return 0


def _run_geneval(args: argparse.Namespace) -> int:
    import os

    from omnigen.eval import geneval

    metadata = geneval.read_metadata(args.metadata)
    params = _overrides(args)
    requests = geneval.build_requests(metadata, args.n_samples, args.seed, params)
    out = Path(args.out)
    if os.environ.get("RANK", "0") == "0":
        geneval.write_metadata(out, metadata)
    if _generate(args, requests, out, layout=geneval.sample_layout) == 0:
        _print(f"generated {len(requests)} prompts x {args.n_samples} images in {out}; score with GenEval:")
        _print(geneval.SCORE_COMMAND.format(out=out))
    return 0


def _run_geneval_summary(args: argparse.Namespace) -> int:
    from omnigen.eval import geneval
    from omnigen.eval.common import write_json

    summary = geneval.summarize_scores(args.results)
    _print(geneval.format_summary(summary))
    if args.json:
        write_json(args.json, {"benchmark": "geneval", **summary, "paper": geneval.PAPER_SCORES})
    return 0


def _scorers(args: argparse.Namespace):
    from omnigen.eval.metrics import ClipFeatures, DinoFeatures

    device = args.device or "cpu"
    clip = ClipFeatures.from_pretrained(args.clip, device)
    dino = DinoFeatures.from_pretrained(args.dino, device) if args.dino else None
    return clip, dino


def _run_emu_edit(args: argparse.Namespace) -> int:
    from omnigen.eval import emu_edit
    from omnigen.eval.common import write_json

    out = Path(args.out)
    samples = emu_edit.read_emu_edit(args.data, args.split, args.limit)
    requests = emu_edit.build_requests(samples, out, args.seed, _overrides(args))
    if not args.score_only and _generate(args, requests, out) != 0:
        return 0
    result = emu_edit.score(samples, out, *_scorers(args))
    path = write_json(
        args.json or out / "emu_edit_scores.json",
        {"benchmark": "emu-edit", "split": args.split, "clip": args.clip, "dino": args.dino, **result},
    )
    _print(emu_edit.format_summary(result))
    _print(f"wrote {path}")
    return 0


def _run_dreambench(args: argparse.Namespace) -> int:
    from omnigen.eval import dreambench
    from omnigen.eval.common import write_json

    out = Path(args.out)
    bench = dreambench.read_dreambench(args.data)
    requests = dreambench.build_requests(
        bench,
        args.seed,
        args.n_samples,
        args.template or dreambench.SUBJECT_TEMPLATE,
        _overrides(args),
        args.subjects,
    )
    if not args.score_only and _generate(args, requests, out) != 0:
        return 0
    result = dreambench.score(bench, requests, out, *_scorers(args))
    path = write_json(
        args.json or out / "dreambench_scores.json",
        {"benchmark": "dreambench", "clip": args.clip, "dino": args.dino, **result},
    )
    _print(dreambench.format_summary(result))
    _print(f"wrote {path}")
    return 0


def _run_control(args: argparse.Namespace) -> int:
    from omnigen.eval import control
    from omnigen.eval.common import write_json

    out = Path(args.out)
    annotator = (
        control.load_annotator(args.kind, args.annotator, args.annotator_weights, args.device or "cpu")
        if args.annotator
        else None
    )
    samples = control.read_control(args.data, args.kind, args.split, limit=args.limit)
    requests = control.prepare(  # every rank: deterministic, atomic per file
        samples,
        args.kind,
        out,
        args.resolution,
        annotator,
        args.template,
        args.n_samples,
        args.seed,
        _overrides(args),
    )
    if not args.score_only and _generate(args, requests, out) != 0:
        return 0
    result = control.score(args.kind, requests, out, annotator, num_classes=args.num_classes)
    path = write_json(args.json or out / f"control_{args.kind}.json", {"benchmark": "control", **result})
    _print(control.format_summary(result))
    _print(f"wrote {path}")
    return 0
