"""The offline API: ``LLM(model=...).generate(prompts)`` and ``.chat(messages)``."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from sagellm import chat_template as chat_template_lib
from sagellm.config import EngineConfig
from sagellm.engine.llm_engine import LLMEngine
from sagellm.errors import RequestError
from sagellm.outputs import RequestOutput
from sagellm.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


def _normalize_prompts(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # type: ignore[arg-type]
    return prompts  # type: ignore[return-value]


class LLM:
    """An engine plus a blocking batch API.

    ``model`` is a local HF directory, a ``.gguf`` file, or ``None`` for the embedded
    SmolLM2-135M-Instruct. Any :class:`~sagellm.config.EngineConfig` field may be passed.
    """

    def __init__(self, model: str | None = None, backend: str = "auto", **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, backend=backend, **kwargs))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, cache_salt: str | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        A prompt whose params ask for ``n > 1`` choices gives ``n`` consecutive outputs, choice
        0 first (``RequestOutput.index``; they share ``request_id``), so the list is grouped by
        prompt, then by choice; with ``n == 1`` everywhere it has one output per prompt.

        ``cache_salt``: these prompts share cached prefix KV only with requests of the same salt
        (see :meth:`LLMEngine.add_request`).

        If the engine fails one of the requests, the others are aborted and
        :class:`~sagellm.errors.RequestError` is raised, naming it.
        """
        items = _normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"{len(items)} prompts but {len(params)} sampling params")
        ids = [self.engine.add_request(p, sp, cache_salt=cache_salt)
               for p, sp in zip(items, params)]
        return self._run(ids, [sp.n for sp in params], use_tqdm)

    def chat(self, messages: Seq[Message] | Seq[Seq[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them and generate."""
        convs: list[Seq[Message]]
        if messages and isinstance(messages[0], dict):
            convs = [messages]  # type: ignore[list-item]
        else:
            convs = list(messages)  # type: ignore[arg-type]
        prompts: list[Prompt] = [self.apply_chat_template(c, add_generation_prompt, chat_template)
                                 for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: Seq[Message], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> list[int]:
        """The prompt's token ids; the template renders in the hardened sandbox the server uses,
        so a template that fails or runs away raises :class:`ChatTemplateError` here too."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        text = chat_template_lib.apply_chat_template(tok, list(messages), chat_template=chat_template,
                                                     add_generation_prompt=add_generation_prompt)
        return list(tok(text, add_special_tokens=False).input_ids)

    def _run(self, request_ids: list[str], num_choices: list[int], use_tqdm: bool
             ) -> list[RequestOutput]:
        keys = [(r, i) for r, n in zip(request_ids, num_choices) for i in range(n)]
        pending = set(keys)
        done: dict[tuple[str, int], RequestOutput] = {}
        bar = tqdm(total=len(keys), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while pending:
                for out in self.engine.step():
                    key = (out.request_id, out.index)
                    if out.error is not None and key in pending:
                        raise RequestError(out.request_id, out.error,
                                           request_ids.index(out.request_id), out)
                    if out.finished and key in pending:
                        pending.discard(key)
                        done[key] = out
                        bar.update(1)
        except BaseException:
            for rid in {r for r, _ in pending}:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[k] for k in keys]
