"""A tokenizer for random-weight models, whose vocabularies no real tokenizer decodes meaningfully.

Token i is the word "t<i>" (a `tokenizers` WordLevel model over whitespace-split words), so any id
a random model samples decodes to text, text of such words encodes back to the same ids, and
detokenization costs what a real fast tokenizer's does per token. Saved with `save_pretrained`,
the folder loads with `AutoTokenizer.from_pretrained` (e.g. for a benchmark client's --tokenizer).
"""

from __future__ import annotations

from pathlib import Path


def synthetic_tokenizer(vocab_size: int, eos_token_id: int | None = None, folder: str | Path | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with a space
    eos = f"t{eos_token_id}" if eos_token_id is not None and 0 <= eos_token_id < vocab_size else None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, unk_token="t0",
                                        model_max_length=1 << 30)
    if folder is not None:
        tokenizer.save_pretrained(str(folder))
    return tokenizer
