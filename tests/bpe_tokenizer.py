"""Real tokenizers trained on the fly for tests: a byte-level BPE (GPT-2 style, with the ``tokenizers`` library)
and a SentencePiece BPE (with ``sentencepiece``), each saved with transformers' ``save_pretrained`` beside a
chat template, as a model repository ships them."""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ bos_token }}assistant: {% endif %}")
WORDS = ("the merged model writes one file per tensor while adapters change weights in rank space; llama cpp "
         "reads quantized blocks of thirty two values with a scale, and tokenizers split text into bytes, words "
         "and merges. Numbers like 42, 1024 or 3.14 appear too, with punctuation: commas, dots! questions? "
         "émigré naïve café").split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic text to train on."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(lines)]


def train_bpe(out_dir: Path, vocab_size: int = 300) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A byte-level BPE with <s>, </s>, <pad> (ids 0-2) and one added non-special token, saved into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)
    fast.add_tokens(["<think>"])  # an added token that is not special: USER_DEFINED in GGUF
    fast.save_pretrained(out_dir)
    return fast


def train_sentencepiece(out_dir: Path, vocab_size: int = 320) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A SentencePiece BPE with byte fallback and no dummy prefix, Gemma's special ids (<pad> 0, <eos> 1, <bos> 2,
    <unk> 3), saved through transformers' GemmaTokenizer (which adds <mask>) with tokenizer.model beside it."""
    import shutil
    import tempfile

    import sentencepiece as spm
    from transformers import GemmaTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()), model_prefix=f"{tmp}/tokenizer", vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", minloglevel=2,
            character_coverage=1.0)
        tok = GemmaTokenizer.from_pretrained(tmp)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(out_dir)
        shutil.copy(f"{tmp}/tokenizer.model", out_dir / "tokenizer.model")
    return tok
