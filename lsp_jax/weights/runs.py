"""Training runs as model sources: a run's workdir (or one of its checkpoint steps)
gives the policy weights of that checkpoint, and the tokenizer of the model it
started from."""

from lsp_jax.errors import UserError
from lsp_jax.runtime.checkpoint import (
    CHECKPOINT_DIR,
    RUN_FILE,
    checkpoint_manager,
    find_run,
    read_run_info,
)


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
