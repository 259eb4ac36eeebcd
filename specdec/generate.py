"""The decoding API: `generate(model, prompts, ...)` and plain autoregressive decoding.

Autoregressive (AR) decoding is the baseline every speedup is measured against, so it is
kept lean: per token one forward of the whole batch and one sampling call, no per-token
Python work that grows with the sequence.
"""

import copy
import time
import weakref
from dataclasses import dataclass, field

import torch

from kernels.sampling import sample, uniforms
from specdec.loading import Model
from specdec.model import survivors


@dataclass
class SamplingParams:
    """Per-call sampling settings, validated; as per-request tensors via `tensors`."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def tensors(self, batch_size: int, device):
        """(temperature, top_k, top_p, seeds), each (B,), on `device`."""
        B = batch_size
        temperature = torch.full((B,), float(self.temperature), device=device)
        top_k = torch.full((B,), self.top_k or 0, dtype=torch.int64, device=device)
        top_p = torch.full((B,), float(self.top_p or 1.0), device=device)
        base = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()))
        # Request b's stream depends on (seed, b) only: reproducible, independent of neighbours.
        seeds = torch.tensor([(base * 1_000_003 + b) % 2**62 for b in range(B)], dtype=torch.int64, device=device)
        return temperature, top_k, top_p, seeds


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]  # generated ids per prompt, without the prompt (EOS included if emitted)
    stats: dict = field(default_factory=dict)


def encode_prompts(model: Model, prompts, chat=None) -> list[list[int]]:
    """Strings (chat-templated when `chat`, default: when the tokenizer has a template) or id lists."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    tok = model.tokenizer
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is an empty string")
            if tok is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
            if use_chat:
                ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
            else:
                ids = tok.encode(p, add_special_tokens=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is an empty token list")
            bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {model.config.vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


def check_lengths(model: Model, prompt_ids, max_new_tokens: int):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    ctx = model.config.max_context
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > ctx:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's context of {ctx} tokens")


def pad(prompt_ids, device, value=0):
    """(B, Lmax) int64 right-padded tokens and (B,) int32 lengths."""
    lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.int32)
    tokens = torch.full((len(prompt_ids), int(lens.max())), value, dtype=torch.int64)
    for b, p in enumerate(prompt_ids):
        tokens[b, : len(p)] = torch.tensor(p)
    return tokens.to(device), lens.to(device)


def prefill(net, cache, prompt_ids):
    """Run the prompts (ragged) into the cache; logits (B, V) at each prompt's last token."""
    tokens, lens = pad(prompt_ids, net.device)
    logits = net(tokens, cache, num_new=lens, logits_at=(lens.long() - 1).view(-1, 1))
    cache.advance(lens)
    return logits[:, 0]


def eos_tensor(model: Model, device):
    eos = set(model.config.eos_token_ids)
    tok = model.tokenizer
    if tok is not None and tok.eos_token_id is not None:
        eos.add(int(tok.eos_token_id))
    return torch.tensor(sorted(eos) or [-1], device=device)


@torch.inference_mode()
def autoregressive(model: Model, prompt_ids, max_new_tokens: int, params: SamplingParams):
    """Plain AR decoding of a ragged batch. Returns (generated ids per prompt, stats).

    A request that emits EOS leaves the batch (its cache rows with it), as in the speculative
    engine: finished requests cost no forward rows in either, so neither is favoured."""
    net, device = model.net, model.device
    B = len(prompt_ids)
    temperature, top_k, top_p, seeds = params.tensors(B, device)
    eos = eos_tensor(model, device)
    t0 = time.perf_counter()  # the prefill's time includes the cache's allocation, as in the speculative engine
    cache = net.new_cache(B, max(len(p) for p in prompt_ids) + max_new_tokens)
    out = torch.full((B, max_new_tokens), -1, dtype=torch.int64, device=device)
    active = torch.arange(B, device=device)  # (B',) the requests still decoding
    one = torch.ones(B, dtype=torch.int32, device=device)
    logits = prefill(net, cache, prompt_ids)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    t_prefill = time.perf_counter() - t0
    steps = 0
    for t in range(max_new_tokens):
        u = None if params.greedy else uniforms(seeds, torch.full_like(seeds, t), 1)[:, 0]
        token = sample(logits, temperature, top_k, top_p, u)  # (B',)
        out[active, t] = token
        steps += 1
        if t == max_new_tokens - 1:
            break
        finished = torch.isin(token, eos)
        if bool(finished.any()):  # the step's one host sync (the loop's exit test needs it)
            keep = survivors(~finished)
            if keep.numel() == 0:
                break
            active, token, one = active[keep], token[keep], one[keep]
            temperature, top_k, top_p, seeds = (x[keep] for x in (temperature, top_k, top_p, seeds))
            cache.reorder(keep)
        logits = net(token.view(-1, 1), cache)[:, 0]  # (B', V)
        cache.advance(one)
    ids = [[x for x in row if x >= 0] for row in out[:, :steps].tolist()]  # .tolist() syncs
    return ids, dict(prefill_seconds=t_prefill, decode_steps=steps)


def _validate_draft_size(num_draft_tokens):
    if num_draft_tokens == "auto":
        return
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be an integer >= 0 or 'auto', got {num_draft_tokens!r}")


_CONTROLLERS = weakref.WeakKeyDictionary()  # drafter instance -> {(model, device): controller}


def make_controller(model: Model, num_draft_tokens, drafter=None, max_k: int = 16):
    """A speculation-length controller for "auto" (its cost curve is measured once, then cached).

    One controller per (drafter instance, model): what it learned about the drafter's acceptance
    and drafting time carries over to the next generate call with the same drafter instance.
    """
    if num_draft_tokens != "auto":
        return None
    from specdec.controller import CostModel, SpeculationController

    per_model = _CONTROLLERS.setdefault(drafter, {}) if drafter is not None else {}
    key = (model.name, str(model.device), str(model.dtype), max_k)
    if key not in per_model:
        per_model[key] = SpeculationController(CostModel.cached(model.net, model.name), max_k=max_k)
    return per_model[key]


def clone_drafter(drafter):
    """An independent copy of a drafter instance and of what its "auto" controllers have learned:
    decoding with one leaves the other as it was (a benchmark repeats a measurement from one state)."""
    if isinstance(drafter, str):
        return drafter
    twin = copy.deepcopy(drafter)
    if drafter in _CONTROLLERS:
        _CONTROLLERS[twin] = copy.deepcopy(_CONTROLLERS[drafter])
    return twin


def _prepare(model, prompts, max_new_tokens, drafter, num_draft_tokens, params, chat, drafter_options):
    from drafters import make_drafter

    prompt_ids = encode_prompts(model, prompts, chat)
    check_lengths(model, prompt_ids, max_new_tokens)
    _validate_draft_size(num_draft_tokens)
    if isinstance(drafter, str) and drafter == "none":
        if drafter_options:
            raise TypeError(f"unexpected options for drafter 'none': {sorted(drafter_options)}")
        return prompt_ids, None
    return prompt_ids, make_drafter(drafter, **drafter_options)


def generate(model: Model, prompts, max_new_tokens: int = 128, drafter="none", num_draft_tokens="auto",
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, chat=None, **drafter_options) -> GenerationResult:
    """Decode `prompts` (strings or token-id lists) as one batch.

    drafter: "none" (plain autoregressive decoding), a registered name ("ngram", ...) or a
    `drafters.Drafter` instance; extra keyword arguments go to the drafter's constructor.
    num_draft_tokens: draft tree size per step, or "auto": chosen each step by the
    hardware-aware controller (specdec.controller) from the measured verification cost.
    Greedy at temperature 0, else sampling (temperature, top_k, top_p), seeded per request.
    Returns texts, generated token ids (without the prompt) and stats: tokens, seconds,
    tokens_per_s, prefill_seconds, decode_tokens_per_s (after each request's first token), and
    with a drafter mean_accepted_tokens (per verification step, the model's own token included),
    accepted_length_histogram and time_split.
    """
    from specdec.engine import speculative

    params = SamplingParams(temperature, top_k, top_p, seed)
    prompt_ids, drafter_obj = _prepare(model, prompts, max_new_tokens, drafter, num_draft_tokens, params, chat,
                                       drafter_options)
    controller = None if drafter_obj is None else make_controller(model, num_draft_tokens, drafter_obj)  # not timed
    t0 = time.perf_counter()
    if drafter_obj is None:
        ids, stats = autoregressive(model, prompt_ids, max_new_tokens, params)
    else:
        ids = [[] for _ in prompt_ids]
        steps = speculative(model, prompt_ids, max_new_tokens, params, drafter_obj, num_draft_tokens, controller)
        t_prefill = None
        with torch.inference_mode():
            while True:
                try:
                    rows, new = next(steps)
                except StopIteration as stop:
                    stats = stop.value.summary()
                    break
                for b, toks in zip(rows, new):
                    ids[b].extend(toks)
                if t_prefill is None:  # the first yield is the prefill's token (already on the host)
                    t_prefill = time.perf_counter() - t0
        stats["prefill_seconds"] = t_prefill
    seconds = time.perf_counter() - t0
    tokens = sum(len(x) for x in ids)
    name = drafter if isinstance(drafter, str) else type(drafter).__name__
    # Decode-only throughput: tokens after each request's first one (which the prefill produces).
    decode_seconds = seconds - stats["prefill_seconds"]
    stats = dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, drafter=name,
                 decode_tokens_per_s=(tokens - len(ids)) / max(decode_seconds, 1e-9), **stats)
    return GenerationResult(texts=decode(model, ids), token_ids=ids, stats=stats)


def stream(model: Model, prompt, max_new_tokens: int = 128, drafter="ngram", num_draft_tokens="auto",
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, chat=None, **drafter_options):
    """Yield the completion of one prompt as text pieces, as soon as each step accepts them."""
    from drafters import Drafter
    from specdec.engine import speculative

    params = SamplingParams(temperature, top_k, top_p, seed)
    prompt_ids, drafter_obj = _prepare(model, [prompt] if isinstance(prompt, str) else prompt, max_new_tokens,
                                       drafter, num_draft_tokens, params, chat, drafter_options)
    if len(prompt_ids) != 1:
        raise ValueError("stream takes one prompt")
    drafter_obj = drafter_obj or Drafter()  # "none": the engine without drafts is AR decoding
    ids, shown = [], ""
    with torch.inference_mode():
        for _, new in speculative(model, prompt_ids, max_new_tokens, params, drafter_obj, num_draft_tokens,
                                  make_controller(model, num_draft_tokens, drafter_obj)):
            ids.extend(new[0])
            text = decode(model, [ids])[0]
            if text != shown and not text.endswith("\ufffd"):  # hold back half a multi-byte character
                yield text[len(shown):]
                shown = text


def decode(model: Model, ids) -> list[str]:
    tok = model.tokenizer
    if tok is None:
        return ["" for _ in ids]
    return [tok.decode(x, skip_special_tokens=True) for x in ids]
