"""A Hugging Face transformers model in this process (a trained folder, a merged model, or an adapter whose base
loads from a folder): chat through ``generate``, choice scoring from the last position's logits. One call at a
time per loaded model, in a worker thread. torch and transformers are imported when the backend is created."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio

from backends.errors import ConfigError, PermanentError
from backends.registry import BackendSettings
from backends.scoring import normalize_choice_logprobs
from backends.types import ChatRequest, ChatResult, ScoreRequest, ScoreResult, Usage, plain_messages

__all__ = ["TransformersBackend"]

_INSTALL_HINT = "pip install 'cai-async[train]'"
_MODELS: dict[str, tuple[Any, Any, anyio.CapacityLimiter]] = {}
_LOCK = threading.Lock()


class TransformersBackend:
    """``settings.model``: a local model folder (``config.json``) or a peft adapter folder
    (``adapter_config.json``). Options: ``max_context`` (tokens kept from the end of a long prompt: none by
    default, a prompt over the model's limit is a permanent error)."""

    def __init__(self, settings: BackendSettings) -> None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError(f"the transformers backend needs torch and transformers: {_INSTALL_HINT}") from None
        self.path = Path(settings.model)
        if not (self.path / "config.json").is_file() and not (self.path / "adapter_config.json").is_file():
            raise ConfigError(f"endpoint {settings.endpoint!r}: {self.path} is not a model folder "
                              "(config.json) or a peft adapter folder (adapter_config.json)")
        self.name = settings.endpoint
        self.model_name = self.path.name if self.path.name not in ("merged", "") else self.path.parent.name
        self._loaded: tuple[Any, Any, anyio.CapacityLimiter] | None = None

    def _load(self) -> tuple[Any, Any, anyio.CapacityLimiter]:
        key = str(self.path.resolve())
        with _LOCK:
            if key not in _MODELS:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                if (self.path / "adapter_config.json").is_file():
                    from peft import AutoPeftModelForCausalLM

                    model = AutoPeftModelForCausalLM.from_pretrained(self.path)
                else:
                    model = AutoModelForCausalLM.from_pretrained(self.path)
                model.eval()
                tokenizer = AutoTokenizer.from_pretrained(self.path)
                _MODELS[key] = (model, tokenizer, anyio.CapacityLimiter(1))
            return _MODELS[key]

    def _prompt_ids(self, tokenizer: Any, messages: list[dict[str, str]], prefix: str = "") -> Any:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def _chat_sync(self, model: Any, tokenizer: Any, request: ChatRequest) -> ChatResult:
        import torch

        start = time.perf_counter()
        ids = self._prompt_ids(tokenizer, plain_messages(request.messages))
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and ids.shape[1] + request.max_tokens > limit:
            raise PermanentError(f"endpoint {self.name!r}: prompt of {ids.shape[1]} tokens plus max_tokens "
                                 f"{request.max_tokens} exceeds the model's {limit}", endpoint=self.name)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p} \
            if request.temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        new = output[0][ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        for stop in request.stop:
            text = text.split(stop)[0]
        return ChatResult(text=text, finish_reason="length" if len(new) >= request.max_tokens else "stop",
                          usage=Usage(prompt_tokens=int(ids.shape[1]), completion_tokens=len(new)),
                          model=self.model_name, endpoint=self.name, latency_s=time.perf_counter() - start)

    def _score_sync(self, model: Any, tokenizer: Any, request: ScoreRequest) -> ScoreResult:
        import torch

        start = time.perf_counter()
        ids = self._prompt_ids(tokenizer, plain_messages(request.messages), request.answer_prefix)
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        candidates: dict[str, float] = {}
        for choice in request.choices:
            for variant in (choice, " " + choice):
                tokens = tokenizer.encode(variant, add_special_tokens=False)
                if len(tokens) == 1:
                    candidates[variant] = float(logprobs[tokens[0]])
        return ScoreResult(probs=normalize_choice_logprobs(candidates, request.choices, endpoint=self.name),
                           method="logits", usage=Usage(prompt_tokens=int(ids.shape[1]), completion_tokens=0),
                           model=self.model_name, endpoint=self.name, latency_s=time.perf_counter() - start)

    async def _run(self, fn: Any, request: Any) -> Any:
        if self._loaded is None:
            self._loaded = await anyio.to_thread.run_sync(self._load)
        model, tokenizer, limiter = self._loaded
        async with limiter:
            return await anyio.to_thread.run_sync(fn, model, tokenizer, request)

    async def chat(self, request: ChatRequest) -> ChatResult:
        result: ChatResult = await self._run(self._chat_sync, request)
        return result

    async def score(self, request: ScoreRequest) -> ScoreResult:
        result: ScoreResult = await self._run(self._score_sync, request)
        return result

    async def aclose(self) -> None:
        """Models stay cached for other endpoints of this process."""
