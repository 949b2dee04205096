"""Generation: lmscope's greedy loop with per-step interventions, and the native ``generate``.

:func:`generate` is the one decoding loop of lmscope (steering, Patchscopes and attribution of
generations use it): greedy, with a KV cache, and with interventions chosen per forward from the
absolute positions of the tokens fed in. It always produces ``max_new_tokens`` tokens.
:func:`sample` hands the prompt to the model's own ``generate`` for what the loop does not do
(sampling, beam search, stopping at EOS); it applies no interventions.

Shapes: B prompts, P prompt tokens (left-padded), n or G new tokens, V vocabulary.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from lmscope.errors import InputError

if TYPE_CHECKING:
    from lmscope.models.model import Model, StepInterventions


def _check_length(model: Model, prompt_tokens: int, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: ask for at least 1 new token.")
    if prompt_tokens + max_new_tokens > model.spec.n_ctx:
        raise InputError(f"The prompt has {prompt_tokens} tokens; {max_new_tokens} more would pass "
                         f"{model.name}'s context limit of {model.spec.n_ctx}. Ask for fewer new tokens.")


def cache_kwarg(model: Model) -> str:
    """The forward's KV-cache argument: ``cache`` from transformers 5.24, ``past_key_values`` before; RWKV's
    recurrent ``state``."""
    params = inspect.signature(model.hf.forward).parameters
    return "cache" if "cache" in params else "state" if "state" in params else "past_key_values"


def generate(model: Model, inputs, max_new_tokens: int, interventions: StepInterventions | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with a KV cache: new ids (B, n) and the log-probabilities (B, n, V) of each step.

    ``interventions(positions, mask)`` gives each forward's list: ``positions`` (B, t) are the
    absolute positions of the tokens fed in (the prompt on the first forward, one new token
    afterwards) and ``mask`` (B, t) marks real (non-pad) tokens. Needs left padding.
    """
    batch = model.encode(inputs, "left")
    if batch.padding_side != "left":
        raise InputError("Generation needs a left-padded batch: encode the prompts with padding_side='left'.")
    _check_length(model, batch.input_ids.shape[1], max_new_tokens)
    dev, kv = model.device, cache_kwarg(model)
    ids, full_mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    pos, step_mask = batch.position_ids.to(dev), batch.attention_mask.to(dev).bool()
    past, new, logps = None, [], []
    for _ in range(max_new_tokens):
        ivs = interventions(pos.cpu(), step_mask.cpu()) if interventions else []
        with model.hooks(interventions=ivs), torch.no_grad():
            # a recurrent model (no attention) masks the tokens it is fed, not the whole sequence so far
            mask = full_mask if "attention" in model.parts else full_mask[:, -ids.shape[1]:]
            out = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kv: past})
        past = out[kv]
        lp = out.logits[:, -1].float().log_softmax(-1)
        nxt = lp.argmax(-1)
        new.append(nxt.cpu())
        logps.append(lp.cpu())
        ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        step_mask = torch.ones_like(ids, dtype=torch.bool)
        full_mask = torch.cat([full_mask, torch.ones_like(ids, dtype=full_mask.dtype)], dim=1)
    return torch.stack(new, 1), torch.stack(logps, 1)


def sample(model: Model, inputs, max_new_tokens: int, generate_kwargs: dict | None = None) -> torch.Tensor:
    """(B, P + G) ids: the left-padded prompts and their continuations by the native ``generate``.

    ``generate_kwargs`` go to it unchanged (``do_sample``, ``temperature``, ``top_p``, ``num_beams``, ...);
    without them decoding is greedy. Generation stops at EOS (rows that stop early are padded).
    """
    batch = model.encode(inputs, "left")
    _check_length(model, batch.input_ids.shape[1], max_new_tokens)
    tok = model.tokenizer
    kwargs = {"do_sample": False, **(generate_kwargs or {})}
    kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if "wkv" in model.parts and not bool(batch.attention_mask.all()):
        return _sample_rows(model, batch, max_new_tokens, kwargs)
    with torch.no_grad():
        out = model.hf.generate(input_ids=batch.input_ids.to(model.device),
                                attention_mask=batch.attention_mask.to(model.device),
                                max_new_tokens=max_new_tokens, **kwargs)
    return out.cpu()


def _sample_rows(model: Model, batch, max_new_tokens: int, kwargs: dict) -> torch.Tensor:
    """RWKV's own ``generate`` ignores the attention mask, so padding would enter the shorter prompts' state: each
    prompt is generated alone, and the rows laid out as a batched ``generate`` lays them out (prompts left-padded,
    continuations padded after an early stop)."""
    pad, p = kwargs["pad_token_id"], batch.input_ids.shape[1]
    rows = []
    for ids, mask in zip(batch.input_ids, batch.attention_mask.bool()):
        real = ids[mask][None].to(model.device)
        with torch.no_grad():
            out = model.hf.generate(input_ids=real, attention_mask=torch.ones_like(real), max_new_tokens=max_new_tokens,
                                    **kwargs)
        rows.append(torch.cat([ids[~mask], out[0].cpu()]))  # the row's own left padding, then prompt and continuation
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, torch.full((width - len(r),), pad, dtype=r.dtype)]) for r in rows])


def eos_token_ids(model: Model) -> tuple[int, ...]:
    """The ids that end a native generation: the generation config's ``eos_token_id`` (one or a list)."""
    config = getattr(model.hf, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
