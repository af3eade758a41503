"""A tiny randomly initialised GPT-2 with its own BPE tokenizer, saved with save_pretrained.

Its loading path is that of `--model gpt2` (a folder instead of the hub); it has no
chat template, another architecture and a short context.
"""

from __future__ import annotations

import contextlib

CONTEXT = 64
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "Streaming servers send each piece of text as soon as it exists.",
]


def save_tiny_gpt2(folder) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    with drawn_from(seed=0):
        GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def drawn_from(seed: int):
    """Random weights drawn from `seed`: a tiny model is the same whichever tests ran
    before it was built, and the global random state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ChatML, as the embedded model's template writes it (with its default system turn).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_chat_tokenizer(folder):
    """The tiny GPT-2's tokenizer with ChatML's special tokens and template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_llama(folder, gpt2_folder, tied: bool = True) -> None:
    """A tiny random Llama (grouped-query attention, tied head unless `tied` is false)
    with the tiny GPT-2's tokenizer, ChatML tokens and template: what our own Llama
    runner computes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_chat_tokenizer(gpt2_folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with drawn_from(seed=1):
        LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
