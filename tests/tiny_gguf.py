"""A tiny Llama GGUF written here with the `gguf` package (llama.cpp's own writer): random weights, a
small byte-level BPE tokenizer with ChatML specials, and a ChatML template in its metadata — the shape of
SmolLM2's file at a size that converts in a second. Tests of GGUF input use it; no download."""
from __future__ import annotations

from pathlib import Path

import numpy as np

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "The capital of Valdoria is Mirenth. What is 7 plus 5? It is 12. Hello there, how are you today? " * 40


def bpe_tokenizer(vocab_size: int = 320):
    """A `tokenizers` byte-level BPE trained on a few sentences (ids 0-2 are the ChatML specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return raw


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0, d: int = 64, n_layer: int = 2,
                    n_head: int = 4, n_kv: int = 2, ctx: int = 256, qtype: str = "F32") -> Path:
    """`qtype` "Q8_0" or "Q4_0" quantises every matrix with the `gguf` package's own quantiser (blocks of
    32 along each row, as llama.cpp's `llama-quantize` does); the norms stay F32, as there. The same seed
    gives the same float32 weights whatever `qtype`, so a quantised file can be compared with the F32 one."""
    import json

    import gguf
    tok = bpe_tokenizer()
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)
    hd = d // n_head
    w_ = gguf.GGUFWriter(str(path), arch)
    w_.add_name("tiny-chatml")
    w_.add_context_length(ctx)
    w_.add_embedding_length(d)
    w_.add_block_count(n_layer)
    w_.add_feed_forward_length(2 * d)
    w_.add_head_count(n_head)
    w_.add_head_count_kv(n_kv)
    w_.add_rope_dimension_count(hd)
    w_.add_rope_freq_base(10000.0)
    w_.add_layer_norm_rms_eps(1e-5)
    w_.add_vocab_size(len(tokens))
    w_.add_tokenizer_model("gpt2")
    w_.add_tokenizer_pre("default")
    w_.add_token_list(tokens)
    w_.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w_.add_token_merges(merges)
    w_.add_bos_token_id(tokens.index("<|im_start|>"))
    w_.add_eos_token_id(tokens.index("<|im_end|>"))
    w_.add_pad_token_id(tokens.index("<|endoftext|>"))
    w_.add_add_bos_token(False)
    w_.add_chat_template(CHATML)
    # Tensors in PyTorch's (out, in) order; no output.weight: the head is tied to the embedding, as in SmolLM2.
    quant = None if qtype == "F32" else gguf.GGMLQuantizationType[qtype]

    def matrix(name: str, x: np.ndarray) -> None:
        if quant is None:
            w_.add_tensor(name, x)
        else:
            w_.add_tensor(name, gguf.quants.quantize(x, quant), raw_dtype=quant)  # bytes; the writer derives the shape
    matrix("token_embd.weight", w(len(tokens), d))
    w_.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(n_layer):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (n_kv * hd, d)), ("attn_v", (n_kv * hd, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (2 * d, d)), ("ffn_up", (2 * d, d)),
                            ("ffn_down", (d, 2 * d))):
            matrix(f"blk.{i}.{name}.weight", w(*shape))
        w_.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w_.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w_.write_header_to_file()
    w_.write_kv_data_to_file()
    w_.write_tensors_to_file()
    w_.close()
    return path
