"""`vqret bench ray`: the Ray engine next to the local one (embedding; sharded index build).

Registered on the `bench` sub-app by `register(bench_app)`; ray, torch and faiss are imported
inside the command so that `vqret --help` starts at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .bench_ann import _ints
from .errors import clean_errors, fail

out = Console()
err = Console(stderr=True)

PARTS = ("embed", "index", "all")


def register(bench_app: typer.Typer) -> None:
    """Add `ray` to the `bench` sub-app."""
    bench_app.command("ray")(bench_ray)


def bench_ray(
    part: Annotated[str, typer.Option(help="embed | index | all")] = "all",
    folder: Annotated[
        Path | None,
        typer.Option(help="embed: images to index.",
                     show_default="../shared/data/caltech101-subset"),
    ] = None,
    images: Annotated[int, typer.Option(help="embed: use the first N images.")] = 512,
    model: str = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="'none' = random weights")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 | auto")] = "fp32",
    rows: Annotated[str, typer.Option(help="index: vectors in the synthetic store.")] = "1M",
    dim: Annotated[int, typer.Option(help="index: vector dimension.")] = 512,
    kind: Annotated[str, typer.Option(help="index: ivf | ivf8 (same plan both ways)")] = "ivf",
    rows_per_shard: Annotated[str, typer.Option(help="index: rows per Ray task.")] = "500K",
    part_rows: Annotated[str, typer.Option(help="index: rows per Parquet part.")] = "100K",
    builds: Annotated[
        str, typer.Option(help="index: in-process,sharded or one of them.")
    ] = "in-process,sharded",
    cpus: Annotated[
        int | None, typer.Option(help="CPUs of the local Ray.", show_default="all")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting one.")
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="index: folder for the temporary store.", show_default="temp dir"),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Also write the JSON report to this file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The Ray engine against the local one, same run: embedding rates per configuration and
    per worker; sharded vs in-process index build (driver peak memory, wall time, recall)."""
    if part not in PARTS:
        fail(f"--part must be one of {', '.join(PARTS)}, not {part!r}")
    log = None if as_json else err.print
    result: dict = {}
    with clean_errors():
        from vqret.benchmarks import ray_embed, ray_index
        from vqret.retrieval.distributed import RayUnavailableError, require_ray

        try:
            require_ray()
        except RayUnavailableError as e:
            fail(str(e))
        if part in ("embed", "all"):
            source = folder or ray_embed.DEFAULT_FOLDER
            if not source.is_dir():
                fail(f"{source}: no such folder of images; pass --folder")
            result["embed"] = ray_embed.run_embed(
                source, images=images, model=model, pretrained=pretrained,
                batch_size=batch_size, precision=precision, cpus=cpus, address=address,
                log=log)
        if part in ("index", "all"):
            result["index"] = ray_index.run_index(
                _one(rows, "--rows"), dim=dim, kind=kind,
                rows_per_shard=_one(rows_per_shard, "--rows-per-shard"),
                part_rows=_one(part_rows, "--part-rows"), cpus=cpus,
                address=address, work=work,
                builds=tuple(b.strip() for b in builds.split(",") if b.strip()), log=log)
    if report is not None:
        tmp = report.with_name(report.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, report)  # a reader never sees half a report
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_summary(result)


def _one(text: str, hint: str) -> int:
    values = _ints(text)
    if len(values) != 1:
        raise typer.BadParameter("give one count", param_hint=hint)
    return values[0]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_summary(result: dict) -> None:
    if "embed" in result:
        e = result["embed"]
        weights = "random weights" if e["random_weights"] else f"weights {e['pretrained']}"
        out.print(f"[bold]embed[/]: {e['n_images']} images, {e['model']} ({weights}), batch "
                  f"{e['batch_size']}, {e['precision']}; ray.init {e['ray_init_s']:.1f} s; "
                  f"min cosine vs local {e['min_cosine']:.5f}")
        out.print(f"{'engine':>18} {'actors':>6} {'wall s':>7} {'img/s':>7} {'x local':>7} "
                  f"{'fixed s':>7} {'steady/s':>8} {'per CPU/s':>9} {'x local':>7}",
                  soft_wrap=True)
        for r in e["configs"]:
            per_cpu = r.get("per_cpu_images_per_s") or (
                r["steady_images_per_s"] / r["torch_threads"]
                if r.get("torch_threads") and r["steady_images_per_s"] else None)
            out.print(
                f"{r['engine']:>18} {r['actors']:>6} {r['wall_s']:>7.1f} "
                f"{r['images_per_s']:>7.2f} {r['ratio_images_per_s']:>7.2f} "
                f"{r.get('fixed_s', 0):>7.1f} {_num(r['steady_images_per_s']):>8} "
                f"{per_cpu or 0:>9.2f} {r.get('ratio_per_cpu', 1.0):>7.2f}", highlight=False,
                soft_wrap=True)
        out.print("fixed s: wall time beyond images / working rate (start-up, tail); per CPU: "
                  "an actor's rate over its busy time / its CPUs (local: steady rate / torch "
                  "threads)", highlight=False)
    if "index" in result:
        x = result["index"]
        out.print(f"[bold]index[/]: {x['n']:,} x {x['dim']} ({x['factory']}), raw vectors "
                  f"{x['raw_vector_bytes'] / 2**30:.2f} GiB, {x['rows_per_shard']:,} rows/shard")
        for name in ("in_process", "sharded"):
            b = x[name]
            if b is None:
                continue
            workers = (f", largest Ray worker {b['ray_worker_peak_rss_bytes'] / 2**30:.2f} GiB"
                       if "ray_worker_peak_rss_bytes" in b else "")
            out.print(f"{name:>12}: {b['wall_s']:.1f} s, driver peak "
                      f"{b['driver_peak_rss_bytes'] / 2**30:.2f} GiB = "
                      f"{b['driver_peak_per_raw_byte']:.2f} x raw{workers}, recall@10 "
                      f"{b['recall_at_10']:.3f} (nprobe {b['nprobe']})", highlight=False)
        if "sharded_wall_ratio" in x:
            out.print(f"sharded / in-process: wall {x['sharded_wall_ratio']:.2f}, driver peak "
                      f"{x['driver_peak_ratio']:.2f}", highlight=False)
