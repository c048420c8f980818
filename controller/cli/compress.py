"""`edgefleet compress ...`: run a recipe on a model, or plan one for a device profile.

torch is imported inside the commands only, so that `edgefleet --help` never loads it.

    edgefleet compress run --example digits --recipe compression/examples/full-chain.toml --out digits.onnx
    edgefleet compress run --model mypkg.models:build --data data.npz --recipe recipe.toml
    edgefleet compress run --onnx model.onnx --data data.npz --recipe int8.toml     # ONNX-level passes only
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.controller.cli.common import fail
from edgefleet.controller.cli.sources import DataOpt, ExampleOpt, ModelOpt, OnnxOpt, load_model_source

if TYPE_CHECKING:
    from rich.console import Console

    from edgefleet.compression.pipeline import CompressionReport

__all__ = ["compress_app"]

compress_app = typer.Typer(
    help="Compress a model with a recipe, or plan a recipe for a device class.", no_args_is_help=True
)


def _print_report(report: CompressionReport, console: Console) -> None:
    from rich.table import Table

    base, res = report.baseline, report.result
    table = Table(title=f"{report.task}: recipe {report.recipe.name!r} ({report.source} model)")
    for column in ("", "fp32 export", "compressed", "ratio"):
        table.add_column(column, justify="right" if column else "left")

    def mb(n: int | None) -> str:
        return "-" if n is None else f"{n / 1e6:.2f} MB" if n > 1e6 else f"{n / 1e3:.1f} kB"

    table.add_row(
        "accuracy", f"{base.accuracy:.4f}", f"{res.accuracy:.4f}", f"{(res.accuracy_delta or 0) * 100:+.2f} pt"
    )
    table.add_row("file", mb(base.file_bytes), mb(res.file_bytes), f"{res.size_ratio or 0:.1f}x smaller")
    table.add_row("transfer (zstd)", mb(base.transfer_bytes), mb(res.transfer_bytes), f"{res.transfer_ratio or 0:.1f}x")
    table.add_row(
        "parameters", str(base.parameters), str(res.parameters), f"{base.parameters / max(res.parameters, 1):.1f}x"
    )
    for name, b, r, ratio in (
        ("latency p50", base.latency_p50_ms, res.latency_p50_ms, res.latency_p50_ratio),
        ("latency p95", base.latency_p95_ms, res.latency_p95_ms, res.latency_p95_ratio),
    ):
        table.add_row(f"{name} ({res.threads} thr)", f"{b:.3f} ms", f"{r:.3f} ms", f"{ratio or 0:.2f}x time")
    table.add_row("peak RSS", mb(base.peak_rss_bytes), mb(res.peak_rss_bytes), f"{res.rss_ratio or 0:.2f}x")
    console.print(table)
    steps = Table(title="passes")
    for column in ("#", "pass", "seconds", "parameters", "bytes", "accuracy"):
        steps.add_column(column, no_wrap=True)
    steps.add_column("notes")
    for step in report.steps:
        steps.add_row(
            str(step.index + 1), step.kind.value, f"{step.seconds:.1f}", str(step.parameters), str(step.onnx_bytes),
            f"{step.accuracy:.4f}", "; ".join(step.notes),
        )  # fmt: skip
    console.print(steps)
    for note in report.notes:
        console.print(f"note: {note}")


@compress_app.command("run")
def run(
    *,
    example: ExampleOpt = None,
    model: ModelOpt = None,
    onnx_file: OnnxOpt = None,
    data: DataOpt = None,
    recipe: Annotated[Path | None, typer.Option(help="recipe TOML (default: the shipped full chain)")] = None,
    out: Annotated[Path, typer.Option(help="where to write the compressed ONNX model")] = Path("model.onnx"),
    report: Annotated[
        Path | None, typer.Option(help="where to write the JSON report (default: OUT.report.json)")
    ] = None,
    threads: Annotated[int, typer.Option(min=1, max=256, help="onnxruntime threads for latency")] = 1,
    torch_threads: Annotated[
        int | None,
        typer.Option(min=1, max=256, help="torch threads for training (1 is much faster on a busy, shared CPU)"),
    ] = None,
    train_epochs: Annotated[
        int | None, typer.Option(min=1, max=1000, help="epochs to train the example (default: its own)")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON instead of tables")] = False,
) -> None:
    """Run a compression recipe on a model and data; print the report and write the model and the JSON report."""
    sources = [s for s in (example, model, onnx_file) if s is not None]
    if len(sources) != 1:
        raise typer.BadParameter("give exactly one of --example, --model, --onnx", param_hint="--example")
    from rich.console import Console

    from edgefleet.compression import CompressionError, compress, load_recipe, write_atomic
    from edgefleet.compression.examples import EXAMPLE_RECIPE

    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    try:
        chosen = load_recipe(recipe or EXAMPLE_RECIPE)
        the_model, task = load_model_source(example, model, onnx_file, data, train_epochs)
        onnx_bytes, result = compress(the_model, chosen, task, threads=threads)
        report_path = report or out.with_name(out.name.removesuffix(".onnx") + ".report.json")
        write_atomic(out, onnx_bytes)
        write_atomic(report_path, result.model_dump_json(indent=2).encode())
    except CompressionError as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        raise fail(f"cannot write output: {exc}") from exc
    if json_output:
        typer.echo(result.model_dump_json(indent=2))
        return
    console = Console()
    _print_report(result, console)
    console.print(f"wrote {out} ({len(onnx_bytes)} bytes) and {report_path}")


from edgefleet.controller.cli.plan import plan  # noqa: E402

compress_app.command("plan")(plan)
from edgefleet.controller.cli.compress_class import compress_for_class  # noqa: E402

compress_app.command("class")(compress_for_class)
