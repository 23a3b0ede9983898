"""The one way runtime commands end: a MoepackError (or a bad option, an interrupt, an
out-of-memory) becomes `error: ...` and `hint: ...` on stderr and an exit code, never a
traceback."""

from __future__ import annotations

import click
import torch

from formats.errors import MoepackError


def fail(message: str, hint: str | None) -> int:
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    return 1


def run_command(command: click.Command, prog_name: str, argv: list[str] | None = None, **extra) -> int:
    """Run a click command in non-standalone mode and turn failures into one-line errors."""
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False, **extra)
    except MoepackError as e:
        return fail(e.message, e.hint)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as e:
        return fail(e.format_message().splitlines()[0], "see --help")
    except KeyboardInterrupt:
        click.echo("", err=True)
        return 130
    except torch.cuda.OutOfMemoryError:
        return fail("out of GPU memory", "use a shorter --ctx, a smaller --gpu-memory, or the offloading backend")
    return 0


def _apply_cpu_activations(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        from .cpu_native import set_cpu_activations  # torch and numpy only; the kernel builds at first use

        set_cpu_activations(value)


# What the compiled CPU kernel rounds activations to (runtime.cpu_native.set_cpu_activations):
# a decorator shared by the commands that run it
cpu_activations_option = click.option(
    "--cpu-activations", type=click.Choice(["auto", "int16", "int8"]), default=None, expose_value=False,
    callback=_apply_cpu_activations,
    help="What the compiled CPU kernel (experts, and packed attention or head on the CPU) rounds activations to: "
         "int8 (per 16 or 8 values, finer than llama.cpp's Q8_K; ~20-40% faster) or int16 (within floating-point "
         "tolerance of the GPU path). auto: int8 when the whole model runs on the CPU, int16 for --hybrid's CPU "
         "experts [default: MOEPACK_CPU_ACT, else auto].")
