"""`lsp-jax train`: Language Self-Play (or GRPO) from a config file."""

EPILOG = """\
Override any config key with --config.SECTION.KEY=VALUE, for example
  lsp-jax train --config configs/smollm2_cpu.py --workdir runs/cpu --config.train.num_steps=20
A WORKDIR that already holds a checkpoint resumes from it; one trainer at a time may
use a WORKDIR. Outputs in WORKDIR: metrics.jsonl, samples.jsonl, tensorboard/,
checkpoints/, export/step_N (Hugging Face).
Exit status: 0 done, 2 bad input, 1 diverged (train.max_nonfinite_steps skipped updates
in a row) or another failure, 143 stopped by SIGTERM (checkpoint saved). On several
hosts (jax.distributed) a SIGTERM to any one stops every host at the same iteration.
On TPUs and GPUs checkpoints are written in the background while training goes on.
"""


def add_arguments(parser):
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE[:ARG]",
        help="ml_collections config file, e.g. configs/smollm2_cpu.py (ARG goes to get_config).",
    )
    parser.add_argument(
        "--workdir", required=True, help="Run folder (created; resumed if it has a checkpoint)."
    )
    parser.epilog = EPILOG
    parser.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    parser.set_defaults(accepts_overrides=True)


def run(args) -> int:
    from lsp_jax.train import config as config_lib

    config = config_lib.config_from_command_line(args.config, args.overrides, "train")
    from lsp_jax.train.loop import train

    return train(config, args.workdir)
