"""GGUF files written the way llama.cpp's convert script lays them out (tensor names,
q/k row permutation), from Hugging Face-named tensors: shared by the GGUF tests."""

import gguf
import numpy as np

# Hugging Face name (after model.layers.{i}.) -> llama.cpp name (after blk.{i}.).
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_permute(weight, num_heads):
    """llama.cpp's convert script: HF half-split rotary rows -> interleaved pairs."""
    rows, cols = weight.shape
    split = weight.reshape(num_heads, 2, rows // num_heads // 2, cols)
    return split.swapaxes(1, 2).reshape(rows, cols)


def byte_level_tokens(vocab_size):
    """A byte-level vocabulary: the 256 byte symbols, three specials, then fillers."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet())
    tokens += ["<|begin|>", "<|end|>", "<|eot|>"]
    tokens += [f"<|unused_{i}|>" for i in range(vocab_size - len(tokens))]
    types = [1] * 256 + [3] * (vocab_size - 256)
    return tokens, types


def write_llama_gguf(
    path, config, hf_state, *, qtype=None, arch="llama", rope_divisors=None, tokenizer=True
):
    """A llama.cpp-layout GGUF of HF-named tensors (q/k rows permuted as llama.cpp does),
    2-D weights in `qtype` (None: float32), with a byte-level tokenizer unless
    `tokenizer=False` (it needs a vocabulary of at least 259)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.mlp_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_eps)
    writer.add_rope_dimension_count(config.head_dim)
    if tokenizer:
        tokens, types = byte_level_tokens(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([])
        writer.add_bos_token_id(256)
        writer.add_eos_token_id(257)
        writer.add_eot_token_id(258)
    for hf_name, tensor in hf_state.items():
        name = GLOBAL_NAMES.get(hf_name)
        if name is None:
            _, _, i, rest = hf_name.split(".", 3)
            name = f"blk.{i}.{LAYER_NAMES[rest]}"
        tensor = np.asarray(tensor)
        if tensor.dtype.kind == "f":
            tensor = tensor.astype(np.float32)
        if name.endswith("attn_q.weight"):
            tensor = llama_cpp_permute(tensor, config.num_heads)
        elif name.endswith("attn_k.weight"):
            tensor = llama_cpp_permute(tensor, config.num_kv_heads)
        if qtype is None or tensor.ndim == 1:
            writer.add_tensor(name, tensor)
        else:
            writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
    if rope_divisors is not None:
        writer.add_tensor("rope_freqs.weight", rope_divisors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
