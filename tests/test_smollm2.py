"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers on the same file."""

import pytest
import torch

import specdec
from specdec.generate import encode_prompts
from specdec.loading import default_model_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


@pytest.fixture(scope="module")
def ours():
    return specdec.load_model(device="cpu")


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_config(ours):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and ours.tokenizer is not None


@pytest.mark.parametrize("prompt", PROMPTS, ids=["capital", "fibonacci", "summary"])
def test_logits_equal_transformers(ours, theirs, prompt):
    ids = torch.tensor(encode_prompts(ours, [prompt]))
    with torch.no_grad():
        ref = theirs(ids).logits
    got = ours.net(ids, ours.net.new_cache(1, ids.shape[1]))
    torch.testing.assert_close(got, ref, atol=5e-4, rtol=1e-4)


def test_greedy_generation_equals_transformers(ours, theirs):
    result = specdec.generate(ours, PROMPTS, max_new_tokens=64)
    for prompt, got in zip(PROMPTS, result.token_ids):
        ids = torch.tensor(encode_prompts(ours, [prompt]))
        with torch.no_grad():
            ref = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                  pad_token_id=ours.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert got == ref[: len(got)], prompt
        assert len(got) == 64 or got[-1] in ours.config.eos_token_ids
    assert "Paris" in result.texts[0]


@pytest.mark.parametrize("drafter", ["ngram", "sam", "suffix", "recycle", "hybrid"])
def test_every_drafter_is_lossless_on_smollm2(ours, drafter):
    prompts = ["Repeat exactly: the cat sat on the mat, the cat sat on the mat.", PROMPTS[1]]
    reference = specdec.generate(ours, prompts, max_new_tokens=40).token_ids
    out = specdec.generate(ours, prompts, max_new_tokens=40, drafter=drafter, num_draft_tokens=6)
    assert out.token_ids == reference
    assert out.stats["mean_accepted_tokens"] > 1.0
