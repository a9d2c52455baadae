"""Training runs as model sources: a run's workdir (or one of its checkpoint steps)
gives the policy weights of that checkpoint, and the tokenizer of the model it
started from."""

import json

from lsp_jax import paths
from lsp_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"  # Written by the trainer: the model source and its architecture.


def write_run_info(workdir, info: dict) -> None:
    """Writes WORKDIR/run.json atomically (a renamed temporary file locally, one object
    write on a store such as gs://)."""
    paths.write_text(paths.join(workdir, RUN_FILE), json.dumps(info, indent=2))


def read_run_info(workdir) -> dict:
    path = paths.join(workdir, RUN_FILE)
    if not paths.isfile(path):
        raise UserError(f"{workdir} is not an lsp_jax run folder: {RUN_FILE} is missing.")
    return json.loads(paths.read_text(path))


def find_run(path) -> tuple[str, int | None] | None:
    """(workdir, step) if `path` is a run workdir or one of its step folders, else None.
    Local paths come back absolute; URIs (gs://...) without trailing slashes."""
    path = paths.normalize(path)
    if paths.isfile(paths.join(path, RUN_FILE)):
        return path, None
    parent = paths.dirname(path)
    if paths.basename(parent) == CHECKPOINT_DIR and paths.basename(path).isdigit():
        workdir = paths.dirname(parent)
        if paths.isfile(paths.join(workdir, RUN_FILE)):
            return workdir, int(paths.basename(path))
    return None


def checkpoint_manager(workdir, *, keep: int | None = None, background: bool = False):
    """Orbax manager over WORKDIR/checkpoints. Orbax writes each step to a temporary
    folder and renames it when complete, so a killed save never looks like a checkpoint
    (on GCS it marks complete steps with a commit file instead). background: `save`
    returns once the state is copied off the devices and the files are written by a
    thread (lsp_jax.checkpoint.finish waits for it)."""
    import orbax.checkpoint as ocp

    paths.check_backend(workdir)
    directory = paths.normalize(paths.join(workdir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=background
    )
    return ocp.CheckpointManager(directory, options=options)


def load_run(path, *, load_base, dtype=None, param_dtype=None, scan_layers=False):
    """(LlamaConfig, params) of a run's checkpoint (the latest, or the step folder given).
    A LoRA run's adapters come back merged into its source's weights, which
    `load_base(source, scan_layers=...) -> (config, params)` reads: sources.load_model,
    passed in because sources, which dispatches over every kind of source, sits above
    this module."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from flax.linen import meta

    from lsp_jax.model import Llama, LlamaConfig, LoraConfig, lora
    from lsp_jax.weights.layout import stack_layers, unstack_layers

    found = find_run(path)
    if found is None:
        raise UserError(
            f"{path} looks like an orbax checkpoint but not an lsp_jax run: pass the run's "
            f"workdir (with {RUN_FILE}) or one of its {CHECKPOINT_DIR}/STEP folders."
        )
    workdir, step = found
    info = read_run_info(workdir)
    saved = LlamaConfig.from_hf_config(info["model_config"], scan_layers=info["scan_layers"])
    manager = checkpoint_manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise UserError(f"The run {workdir} has no checkpoint yet under {CHECKPOINT_DIR}/.")
    if info.get("lora"):
        saved = saved.replace(
            lora=LoraConfig(**{**info["lora"], "targets": tuple(info["lora"]["targets"])})
        )
    init = lambda: Llama(saved).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    abstract = meta.unbox(jax.eval_shape(init)["params"])
    if saved.lora.rank:  # The checkpoint holds the adapters; the base is the run's source.
        abstract = lora.split(abstract)[1]
    restored = manager.restore(
        step,
        args=ocp.args.PyTreeRestore(
            item={"params": abstract},
            # Host numpy arrays: independent of the mesh the run was saved on.
            restore_args={
                "params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
            },
            partial_restore=True,
        ),
    )
    params = restored["params"]
    if saved.lora.rank:
        base = load_base(info["model_source"], scan_layers=saved.scan_layers)[1]
        saved, params = lora.merge(saved, lora.combine(base, params))
    if scan_layers and not saved.scan_layers:
        params = stack_layers(params)
    elif saved.scan_layers and not scan_layers:
        params = unstack_layers(params)
    config = saved.replace(scan_layers=scan_layers)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    return config, params


def run_model_source(path) -> str:
    """The model source the run started from (for its tokenizer and chat template)."""
    found = find_run(path)
    if found is None:
        raise UserError(f"{path} is not an lsp_jax run folder ({RUN_FILE} is missing).")
    return read_run_info(found[0])["model_source"]
