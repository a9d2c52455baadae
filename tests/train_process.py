"""`lsp-jax train` on configs/tiny.py in a process of its own, for tests that kill it.

    python tests/train_process.py WORKDIR [--process I --port P] [--hang-save STEP]
        [--config.KEY=VALUE ...]

--process/--port: one of two processes joined by jax.distributed (two fake hosts).
--hang-save STEP: the background write of checkpoint STEP never completes (it touches
WORKDIR/saving_STEP and sleeps), as a save in flight when the machine goes away.
Exits with train()'s exit code.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hang_save(workdir: Path, step: int) -> None:
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    commit = async_checkpointer._on_commit_callback

    def slow_commit(tmpdir, *args, **kwargs):
        if Path(str(tmpdir.get_final())).name == str(step):
            (workdir / f"saving_{step}").touch()
            time.sleep(3600)
        return commit(tmpdir, *args, **kwargs)

    async_checkpointer._on_commit_callback = slow_commit


def main(argv) -> int:
    workdir, rest = Path(argv[0]), argv[1:]
    options, overrides = {}, []
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--config."):
            overrides.append(arg[len("--config.") :])
        else:
            options[arg] = int(rest.pop(0))
    import jax

    if "--process" in options:
        jax.distributed.initialize(
            f"localhost:{options['--port']}", num_processes=2, process_id=options["--process"]
        )
    if "--hang-save" in options:
        hang_save(workdir, options["--hang-save"])
    from lsp_jax.train import config as config_lib
    from lsp_jax.train import loop

    config = config_lib.load_config(str(ROOT / "configs" / "tiny.py"))
    config_lib.apply_overrides(config, overrides)
    return loop.train(config, str(workdir))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
