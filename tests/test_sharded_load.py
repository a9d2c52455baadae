"""Sharded loading: on 8 fake CPU devices, params loaded with shardings equal the host
load element for element, and every device's block is read as just its slice of the
checkpoint tensor (safetensors slices; GGUF rows and quant blocks).

The device part runs this file as a script in subprocesses (the device count is fixed
when JAX starts): one process with 8 devices, and two processes with 4 devices each
joined by jax.distributed (two fake hosts, each of which must read half of every
tensor). pytest then checks the JSON they print.
"""

import json
import math
import os
import subprocess
import sys

if __name__ == "__main__":
    # One process with 8 devices, or (--process I) one of 2 processes with 4 each.
    DEVICES = 4 if "--process" in sys.argv else 8
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
    os.environ["XLA_FLAGS"] = flags
    os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

MESHES = ("1x8x1", "2x2x2", "1x2x4")
SOURCES = ("hf_untied", "hf_tied", "gguf_f32", "gguf_q8_0")
# tests/hf_models.py tiny config: V 96, D 64, F 96, N 4, K 2, H 16, L 2.
V, D, F, N, K, H, L = 96, 64, 96, 4, 2, 16, 2
Q8_0_BLOCK, Q8_0_BYTES = 32, 34


# Checkpoints, written by the pytest process (transformers, gguf).


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random Llamas saved by transformers (untied and tied heads), and GGUF files
    of them (untied float32, tied Q8_0)."""
    import gguf
    from gguf_files import write_llama_gguf
    from hf_models import causal_lm

    from lsp_jax.model import LlamaConfig

    root = tmp_path_factory.mktemp("sharded_load")
    for name, tied, seed in (("untied", False, 0), ("tied", True, 1)):
        model = causal_lm(seed=seed, tie_word_embeddings=tied)
        model.save_pretrained(root / f"hf_{name}")
        state = {k: v.float().numpy() for k, v in model.state_dict().items()}
        if tied:
            state.pop("lm_head.weight")
        qtype = gguf.GGMLQuantizationType.Q8_0 if tied else None
        path = root / ("gguf_q8_0.gguf" if tied else "gguf_f32.gguf")
        config = LlamaConfig.from_hf_config(model.config.to_dict())
        write_llama_gguf(path, config, state, qtype=qtype, tokenizer=False)
    return root


@pytest.fixture(scope="module")
def results(checkpoints):
    from tests.conftest import subprocess_xla_flags

    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags())  # The script sets its devices.
    out = subprocess.run(
        [sys.executable, __file__, str(checkpoints)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS ") :])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def multihost_results(checkpoints):
    """Two JAX processes with 4 CPU devices each (jax.distributed): two fake hosts."""
    from tests.conftest import subprocess_xla_flags

    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags())  # The script sets its devices.
    port = str(free_port())
    command = [sys.executable, __file__, str(checkpoints), "--process", "{i}", "--port", port]
    processes = [
        subprocess.Popen(
            [c.format(i=i) for c in command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    results = []
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stdout[-3000:] + stderr[-6000:]
        line = [l for l in stdout.splitlines() if l.startswith("RESULTS ")][-1]
        results.append(json.loads(line[len("RESULTS ") :]))
    return results


# Checks (pytest process).

MULTIHOST_CASES = (
    "hf_untied-scanned-1x8x1",
    "hf_tied-unscanned-1x2x4",
    "gguf_f32-scanned-1x2x4",
    "gguf_q8_0-unscanned-1x8x1",
)
CASES = [f"{s}-{scan}-{m}" for s in SOURCES for scan in ("unscanned", "scanned") for m in MESHES]


@pytest.mark.parametrize("case", CASES)
def test_sharded_load_equals_host_load(results, case):
    result = results["cases"][case]
    assert result["max_diff"] == 0.0
    assert result["shardings_kept"] and result["dtypes"] == ["float32"]


@pytest.mark.parametrize("case", CASES)
def test_each_host_reads_only_its_shards(results, case):
    leaves = results["cases"][case]["leaves"]
    for path, leaf in leaves.items():
        # One read per distinct device block (per layer when scanned), of its size.
        assert leaf["reads"] == leaf["expected_reads"], path
    split = [p for p, leaf in leaves.items() if leaf["largest_block"] < leaf["full"]]
    assert split, "no parameter was split on this mesh: the check would be vacuous"
    assert results["cases"][case]["whole_tensor_reads"] == []


def hf_requests(results, case, name):
    return sorted(tuple(map(tuple, r)) for r in results["cases"][case]["requests"][name])


def test_hf_slices_by_hand(results):
    # Mesh 2x2x2, rules embed->fsdp, heads/kv_heads/mlp/vocab->tensor: D, N, F and V split
    # in two. HF stores q [N*H, D], o [D, N*H], down [D, F], embed [V, D].
    case = "hf_untied-unscanned-2x2x2"
    halves = lambda size: [(0, size // 2), (size // 2, size)]
    q = [(heads, cols) for heads in halves(N * H) for cols in halves(D)]
    assert hf_requests(results, case, "model.layers.0.self_attn.q_proj.weight") == q
    o = [(rows, heads) for rows in halves(D) for heads in halves(N * H)]
    assert hf_requests(results, case, "model.layers.1.self_attn.o_proj.weight") == o
    down = [(rows, cols) for rows in halves(D) for cols in halves(F)]
    assert hf_requests(results, case, "model.layers.0.mlp.down_proj.weight") == down
    embed = [(rows, cols) for rows in halves(V) for cols in halves(D)]
    assert hf_requests(results, case, "model.embed_tokens.weight") == embed
    # FSDP over 8: each device reads an eighth of D (HF's input columns) of every row.
    case = "hf_tied-scanned-1x8x1"
    eighths = [(j * D // 8, (j + 1) * D // 8) for j in range(8)]
    for layer in range(L):
        k_proj = hf_requests(results, case, f"model.layers.{layer}.self_attn.k_proj.weight")
        assert k_proj == [((0, K * H), cols) for cols in eighths]


def test_gguf_rows_and_blocks_by_hand(results):
    # q on 2x2x2: each device's two heads are rows [32h, 32h+32) of HF's q, which
    # llama.cpp stores permuted within each head: the same 32 file rows, another order.
    reads = results["cases"]["gguf_f32-unscanned-2x2x2"]["gguf_reads"]["blk.0.attn_q.weight"]
    by_cols = {}
    for rows, start, stop, _ in reads:
        by_cols.setdefault((start, stop), []).append(rows)
    assert sorted(by_cols) == [(0, 32), (32, 64)]
    for rows_list in by_cols.values():
        assert sorted(sorted(r) for r in rows_list) == [list(range(32)), list(range(32, 64))]
        assert all(r != sorted(r) for r in rows_list)  # Permuted order was undone by rows.
    # Q8_0 on 1x8x1: a device needs 8 of 64 columns of q, inside one 32-value block: it
    # dequantizes 64 rows x 1 block (34 bytes), half of the tensor's 64 x 2 blocks.
    reads = results["cases"]["gguf_q8_0-scanned-1x8x1"]["gguf_reads"]["blk.1.attn_q.weight"]
    assert sorted((start, stop) for _, start, stop, _ in reads) == [
        (j * 8, j * 8 + 8) for j in range(8)
    ]
    assert {nbytes for *_, nbytes in reads} == {N * H * Q8_0_BYTES}
    assert D // Q8_0_BLOCK == 2


def test_gguf_float32_equals_the_safetensors_it_came_from(results):
    assert results["gguf_f32_vs_hf_max_diff"] == 0.0


def test_param_dtype_cast_per_shard(results):
    result = results["bfloat16"]
    assert result["max_diff"] == 0.0 and result["dtypes"] == ["bfloat16"]


def test_host_params_placed_by_slices(results):
    assert results["place_host_params_max_diff"] == 0.0


def test_mismatched_shardings_are_refused(results):
    message = results["mismatch_error"]
    assert "do not match the parameters" in message and "layers_0" in message


@pytest.mark.parametrize("case", MULTIHOST_CASES)
def test_each_of_two_hosts_reads_half_the_checkpoint(multihost_results, case):
    # Every parameter has an 'embed' axis, split over fsdp (2 or 8) whose halves live on
    # different hosts: each host reads exactly half of every tensor, and its shards
    # equal the host load's.
    for process in multihost_results:
        result = process["cases"][case]
        assert result["max_diff"] == 0.0 and result["shardings_kept"]
        assert result["whole_tensor_reads"] == []
        for path, leaf in result["leaves"].items():
            assert leaf["reads"] == leaf["expected_reads"], path
            assert sum(leaf["reads"]) == leaf["host_total"] == leaf["full"] // 2, path


class DictReader:
    """An in-memory SliceReader that logs the slices asked for."""

    def __init__(self, tensors):
        self.tensors, self.requests = tensors, []

    def __iter__(self):
        return iter(self.tensors)

    def shape(self, name):
        return self.tensors[name].shape

    def read(self, name, index):
        self.requests.append(index)
        return self.tensors[name][index]


def grid(shape, parts):
    """Every block of `shape` cut into `parts` equal pieces per axis."""
    import itertools

    ranges = [[(k * n // p, (k + 1) * n // p) for k in range(p)] for n, p in zip(shape, parts)]
    return list(itertools.product(*ranges))


@pytest.mark.parametrize(
    "path, parts",
    [
        (("attn", "q"), (2, 2, 1)),  # Heads split: a contiguous run of HF rows.
        (("attn", "o"), (2, 4, 2)),  # head_dim split too: strided HF columns.
        (("mlp", "down"), (3, 2)),
    ],
)
def test_block_equals_slice_of_converted_tensor(path, parts):
    from lsp_jax.model import LlamaConfig
    from lsp_jax.weights import layout, sharded

    config = LlamaConfig.tiny()
    param = layout.param_sources(config, scan_layers=False)["layers_0"][path[0]][path[1]]
    rng = np.random.default_rng(0)
    tensor = rng.normal(size=param.spec.hf_shape).astype(np.float32)
    reader = DictReader({param.hf_names[0]: tensor})
    full = param.spec.from_hf(tensor)
    for bounds in grid(param.shape, parts):
        block = sharded.read_block(param.spec, reader, param.hf_names[0], bounds)
        np.testing.assert_array_equal(block, full[tuple(slice(a, b) for a, b in bounds)])
        read = reader.requests[-1]
        assert math.prod(s.stop - s.start for s in read) < tensor.size


def test_load_config_reads_no_weights(checkpoints):
    from lsp_jax.weights import sources

    for name in ("hf_tied", "gguf_q8_0.gguf"):
        config = sources.load_config(checkpoints / name, scan_layers=True)
        assert config == sources.load_model(checkpoints / name, scan_layers=True)[0]


# The 8-device part (subprocess).


def record_hf_reads(log):
    """Wraps safetensors.safe_open as lsp_jax.weights.hf uses it: logs every slice read
    (name -> [[start, stop] per axis]) and every whole-tensor read."""
    from lsp_jax.weights import hf

    open_file = hf.safe_open

    class Slice:
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            shape = self.inner.get_shape()
            bounds = [list(s.indices(n)[:2]) for s, n in zip(index, shape)]
            log["requests"].setdefault(self.name, []).append(bounds)
            return self.inner[index]

    class Handle:
        def __init__(self, *args, **kwargs):
            self.inner = open_file(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return Slice(self.inner.get_slice(name), name)

        def get_tensor(self, name):
            log["whole"].append(name)
            return self.inner.get_tensor(name)

    hf.safe_open = Handle


def record_gguf_reads(log):
    """Wraps the GGUF row reader (as lsp_jax.weights.gguf calls it) and the dequantizer
    (as the row reader in lsp_jax.weights.gguf_quants calls it): logs (rows, col_start,
    col_stop, bytes dequantized) per row read, and whole-tensor reads."""
    from lsp_jax.weights import gguf as gguf_lib
    from lsp_jax.weights import gguf_quants

    read_rows, dequantize, read_tensor = (
        gguf_lib.read_rows,
        gguf_quants.dequantize,
        gguf_lib.GGUFFile.read_tensor,
    )
    nbytes = []

    def logged_dequantize(raw, info, **kwargs):
        nbytes.append(int(raw.nbytes))
        return dequantize(raw, info, **kwargs)

    def logged_read_rows(buffer, info, rows, start, stop, **kwargs):
        values = read_rows(buffer, info, rows, start, stop, **kwargs)
        entry = [[int(r) for r in rows], int(start), int(stop), nbytes.pop()]
        log["gguf"].setdefault(info.name, []).append(entry)
        return values

    def logged_read_tensor(self, name):
        log["whole"].append(name)
        return read_tensor(self, name)

    gguf_lib.read_rows, gguf_quants.dequantize = logged_read_rows, logged_dequantize
    gguf_lib.GGUFFile.read_tensor = logged_read_tensor


def shardings_for(mesh_name):
    """A function config -> shardings from the project's logical rules on a mesh."""
    from lsp_jax.runtime import sharding
    from lsp_jax.train import config as config_lib
    from lsp_jax.train import placement

    rules = config_lib.default_config().mesh.rules
    rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in rules)
    mesh = sharding.make_mesh(tuple(int(x) for x in mesh_name.split("x")))
    return lambda config: sharding.logical_shardings(placement.boxed_params(config), mesh, rules)


def max_diff(params, reference) -> float:
    """Largest difference of this process's shards (or host arrays) to host `reference`."""
    import jax

    def one(x, y):
        y = np.asarray(y, np.float64)
        if not isinstance(x, jax.Array):
            return float(np.abs(np.asarray(x, np.float64) - y).max())
        diffs = [np.abs(np.asarray(s.data, np.float64) - y[s.index]) for s in x.addressable_shards]
        return float(max(d.max() for d in diffs))

    return max(jax.tree.leaves(jax.tree.map(one, params, reference)))


def elements_read(log, hf_to_gguf) -> dict:
    """HF name -> list of elements per read (a slice, or rows x columns of a GGUF read)."""
    out = {
        name: [math.prod(b - a for a, b in r) for r in reads]
        for name, reads in log["requests"].items()
    }
    for hf_name, gguf_name in hf_to_gguf.items():
        reads = log["gguf"].get(gguf_name, [])
        if reads:
            out[hf_name] = [len(rows) * (stop - start) for rows, start, stop, _ in reads]
    return out


def leaf_reads(config, shardings, read) -> dict:
    """Per leaf: the sizes of the reads made; the sizes of one read per distinct block
    the host's devices hold (per layer of it, in the scanned layout); the largest block
    and the leaf's size."""
    import jax

    from lsp_jax.weights import layout, sharded

    paths = lambda tree: {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    size = lambda bounds: math.prod(b - a for a, b in bounds)
    param_sources = paths(layout.param_sources(config, scan_layers=config.scan_layers))
    out = {}
    for key, sharding in paths(shardings).items():
        source = param_sources[key]
        indices = sharding.addressable_devices_indices_map(source.shape).values()
        blocks = {sharded.index_bounds(index, source.shape) for index in indices}
        if source.stacked:
            expected = [size(bounds[1:]) for bounds in blocks for _ in range(*bounds[0])]
        else:
            expected = [size(bounds) for bounds in blocks]
        out[key] = {
            "reads": sorted(n for name in source.hf_names for n in read.get(name, [])),
            "expected_reads": sorted(expected),
            "largest_block": max(size(bounds) for bounds in blocks),
            "host_total": sum(size(bounds) for bounds in blocks),
            "full": math.prod(source.shape),
        }
    return out


def run_case(path, scan, mesh_name, log, param_dtype=None) -> dict:
    import jax

    from lsp_jax.weights import gguf as gguf_lib
    from lsp_jax.weights import sources

    options = dict(scan_layers=scan, param_dtype=param_dtype)
    config, reference = sources.load_model(path, **options)
    make_shardings = shardings_for(mesh_name)
    for entries in log.values():
        entries.clear()
    _, params = sources.load_model(path, **options, shardings=make_shardings)
    shardings = make_shardings(config)
    hf_to_gguf = {}
    if path.suffix == ".gguf":
        hf_to_gguf = gguf_lib.HFSliceReader(gguf_lib.read_gguf(path), config).names
    kept = jax.tree.map(lambda x, s: x.sharding == s, params, shardings)
    return {
        "max_diff": max_diff(params, reference),
        "shardings_kept": all(jax.tree.leaves(kept)),
        "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(params)}),
        "leaves": leaf_reads(config, shardings, elements_read(log, hf_to_gguf)),
        "requests": {k: list(v) for k, v in log["requests"].items()},
        "gguf_reads": {k: list(v) for k, v in log["gguf"].items()},
        "whole_tensor_reads": list(log["whole"]),
    }


def other_checks(root) -> dict:
    """bfloat16 params, host params placed by slices, and a shardings mismatch."""
    from pathlib import Path

    from lsp_jax.errors import UserError
    from lsp_jax.weights import sharded, sources

    out = {}
    hf_path = Path(root) / "hf_untied"
    _, from_gguf = sources.load_model(
        Path(root) / "gguf_f32.gguf", shardings=shardings_for("2x2x2")
    )
    _, from_hf = sources.load_model(hf_path)
    out["gguf_f32_vs_hf_max_diff"] = max_diff(from_gguf, from_hf)
    log = {"requests": {}, "gguf": {}, "whole": []}
    out["bfloat16"] = run_case(hf_path, True, "2x2x2", log, param_dtype="bfloat16")
    config, host = sources.load_model(hf_path, scan_layers=True)
    placed = sharded.place_host_params(host, shardings_for("1x2x4"), config)
    out["place_host_params_max_diff"] = max_diff(placed, host)
    scanned_shardings = shardings_for("2x2x2")(config)
    try:
        sources.load_model(hf_path, scan_layers=False, shardings=scanned_shardings)
        out["mismatch_error"] = ""
    except UserError as error:
        out["mismatch_error"] = str(error)
    return out


def main(root, cases, process=None, port=None):
    from pathlib import Path

    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    if process is not None:
        jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
    log = {"requests": {}, "gguf": {}, "whole": []}
    record_hf_reads(log)
    record_gguf_reads(log)
    results = {}
    for case in cases:
        source, layout, mesh_name = case.split("-")
        path = Path(root) / (source if source.startswith("hf") else f"{source}.gguf")
        results[case] = run_case(path, layout == "scanned", mesh_name, log)
    extra = other_checks(root) if process is None else {}
    print("RESULTS " + json.dumps({"cases": results, **extra}))


if __name__ == "__main__":
    if "--process" in sys.argv:
        process, port = int(sys.argv[3]), int(sys.argv[5])  # ROOT --process I --port P
        main(sys.argv[1], MULTIHOST_CASES, process, port)
    else:
        main(sys.argv[1], CASES)
