"""The `lsp-jax` command: one subcommand per module in lsp_jax/commands."""

import argparse
import importlib
import sys

# Subcommand name -> (module under lsp_jax.commands, one-line help). Each module defines
# `add_arguments(parser)` and `run(args) -> int`; modules are imported only when used so
# that `lsp-jax --help` stays fast and does not import JAX.
COMMANDS = {
    "train": ("train", "Run Language Self-Play (or GRPO) training from a config file."),
    "generate": ("generate", "Sample completions from a model."),
    "convert": ("convert", "Write any model source as a Hugging Face folder."),
    "eval": ("evaluate", "Win rates of a model against a baseline, judged by a local model."),
    "aot": ("aot", "Compile a training iteration for a TPU topology and report its memory."),
    "plot": ("plot", "Draw the curves of a training run's metrics to PNG files."),
    "reward-check": (
        "reward_check",
        "Check before training that a config's reward separates good answers from bad.",
    ),
}


def build_parser(argv=None):
    parser = argparse.ArgumentParser(
        prog="lsp-jax",
        description="Language Self-Play for Llama models in JAX/Flax.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported: the others get a stub parser.
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"lsp_jax.commands.{module_name}")
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs across runs (a resumed or repeated run skips most
    compilation). LSP_JAX_COMPILATION_CACHE=DIR moves it; =0 turns it off."""
    import os

    location = os.environ.get("LSP_JAX_COMPILATION_CACHE", "")
    if location == "0":
        return
    import jax

    if location == "" and jax.config.jax_compilation_cache_dir:
        return  # Already set (by JAX_COMPILATION_CACHE_DIR or the caller).
    default = os.path.join(os.path.expanduser("~"), ".cache", "lsp_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", location or default)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def cpu_only_without_accelerators() -> None:
    """On a machine with no TPU and no GPU device files, JAX's CPU backend is the only
    one that can work; choosing it up front keeps an installed libtpu (jax[tpu], for
    `lsp-jax aot`) from probing for TPUs and printing pages of warnings. A JAX_PLATFORMS
    set by the user wins; nothing changes once JAX is imported."""
    import glob
    import os

    if os.environ.get("JAX_PLATFORMS") or "jax" in sys.modules:
        return
    devices = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
    if not any(glob.glob(pattern) for pattern in devices):
        os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if next((a for a in argv if not a.startswith("-")), None) != "aot":
        cpu_only_without_accelerators()
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # Only `train` takes free-form `--config.a.b=v` overrides; elsewhere extras are errors.
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if not argv else 2
    from lsp_jax.errors import UserError

    if args.command in ("train", "generate", "eval", "reward-check"):
        enable_compilation_cache()
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"lsp-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
