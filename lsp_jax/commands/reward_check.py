"""`lsp-jax reward-check`: does the config's reward separate good answers from bad ones?"""

EPILOG = """\
Before training: the policy answers --num-prompts prompts of data.prompts as its Solver
does in training (same sampler, temperature and length), and each answer is degraded
four ways (the answer to another prompt, cut to its first 4 tokens, its words shuffled,
empty). Every pair is scored with the rewards the config trains on (the reward model R,
the self-judge, the quality judge R_Q), in-graph exactly as the training step scores
them. Prints per reward the AUC for each degradation (0.5 is chance) with a bootstrap
interval, the judge's score-token mass and parse rate, and a verdict: signal (every
degradation at AUC >= 0.65), partial, or AT CHANCE. Exits 1 when a reward is at chance.

--judges compares named quality judges (lsp_jax/game/judges.py) on the same answers:
  paper      the paper's seven criteria, 0..7 after <Score>
  yes_no     "Is the reply a helpful answer to this user's message?" Yes/No
  on_topic   "Does the reply respond to this exact message?" Yes/No
  scale_0_3  a 0-3 rating
Override config keys as for train, e.g.
  lsp-jax reward-check --config configs/smollm2_cpu.py --judges paper,yes_no \\
      --num-prompts 16 --config.sampling.temperature=0.7
"""


def add_arguments(parser):
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE[:ARG]",
        help="ml_collections config file, e.g. configs/smollm2_cpu.py.",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        metavar="P",
        help="Prompts to answer and score (default reward.check_prompts, 32); rounded "
        "down to a multiple of 8.",
    )
    parser.add_argument(
        "--judges",
        default=None,
        metavar="NAME[,NAME...]",
        help="Named quality judges to compare (default: the config's own judge).",
    )
    parser.epilog = EPILOG
    parser.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    parser.set_defaults(accepts_overrides=True)


def run(args) -> int:
    from lsp_jax.errors import UserError
    from lsp_jax.train import config as config_lib
    from lsp_jax.train import reward_check, reward_check_report

    config = config_lib.config_from_command_line(args.config, args.overrides, "reward-check")
    names = [n.strip() for n in args.judges.split(",") if n.strip()] if args.judges else None
    if args.num_prompts is not None and args.num_prompts < 2:
        raise UserError(f"--num-prompts {args.num_prompts}: at least 2 prompts are needed.")
    report = reward_check.check(config, num_prompts=args.num_prompts, judge_names=names)
    print(reward_check_report.format_report(report, seed=config.train.seed))
    return 1 if report.at_chance else 0
