"""LLMEngine: requests in, one batched step at a time, RequestOutputs out (vLLM's interface)."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import numbers
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import EngineArgs
from ..errors import ConfigError, InvalidRequestError, LoRAError
from ..lora.catalog import AdapterCatalog
from ..lora.manager import LoRAManager, LoRAManagerConfig
from ..lora.request import LoRARequest
from ..model_loader.loader import load_config, load_model, resolve_model_path
from ..models import CausalLM, LlavaForConditionalGeneration
from ..multimodal import ImageInputProcessor, MultiModalInputs, load_image_processor
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..tokenizer import load_tokenizer, stop_token_ids_of
from .block_pool import BlockPool
from .kv_budget import available_host_memory, cpu_kv_budget, gpu_kv_budget
from .model_runner import KVCache, ModelRunner
from .output_processor import Emitted, OutputProcessor
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival: float
    lora_request: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    emitted: list[Emitted] = field(default_factory=list)  # per sequence, kept by the OutputProcessor
    prompt_logprobs: list[Any] | None = None  # filled by the OutputProcessor (SamplingParams.prompt_logprobs)

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)



def default_max_num_batched_tokens(chunked_prefill: bool, device: torch.device, max_model_len: int) -> int:
    """The step's token budget when none is given. With chunked prefill, vLLM's 2048 on a GPU; on
    a CPU 512, where a 512-token step already keeps the cores busy and every running stream waits
    for the whole step (a 2048-token step of even a 135M model takes seconds on 2 cores). Without
    it, a whole prompt of max_model_len tokens must fit in one step."""
    if not chunked_prefill:
        return max(max_model_len, 2048)
    return 512 if device.type == "cpu" else 2048

class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.device = args.torch_device()
        self.dtype = args.torch_dtype(self.device)
        self.model_path = resolve_model_path(args.model, args.revision, args.download_dir)
        self.model_config = load_config(self.model_path)
        self.text_config = self.model_config.get_text_config()  # the language model's (LLaVA nests it)
        self.tokenizer = load_tokenizer(args.tokenizer or self.model_path)
        self.max_model_len = self._max_model_len()
        self.max_num_batched_tokens = args.max_num_batched_tokens or default_max_num_batched_tokens(
            args.enable_chunked_prefill, self.device, self.max_model_len)
        if self.max_num_batched_tokens < self.max_model_len and not args.enable_chunked_prefill:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) without chunked prefill, so a long prompt could never be scheduled; "
                "raise max_num_batched_tokens, lower max_model_len or enable chunked prefill"
            )
        self.model = load_model(self.model_path, self.model_config, self.max_model_len, self.dtype, self.device)
        if args.quantization is not None:
            self._attach_quantized_weights(args.quantization)
        layer = self.model.layers[0]
        num_blocks = self._num_kv_blocks(layer.num_kv_heads, layer.head_dim)
        self.kv_cache = KVCache(len(self.model.layers), num_blocks, args.block_size, layer.num_kv_heads,
                                layer.head_dim, self.dtype, self.device)
        self.served_model_name = args.served_model_name or (args.model if args.model else self.model_path.name)
        self.lora_manager = self._lora_manager() if args.enable_lora else None
        self.lora_catalog = self._lora_catalog(self.lora_manager) if self.lora_manager is not None else None
        self.lora_resolution = self.lora_catalog.resolution if self.lora_catalog is not None else None
        self.image_processor = self._image_input_processor()
        self.default_mm_loras = self._register_default_mm_loras()
        self.scheduler = Scheduler(BlockPool(num_blocks, args.block_size, args.enable_prefix_caching), args.max_num_seqs,
                                   self.max_num_batched_tokens, self.lora_manager, args.enable_chunked_prefill)
        self.runner = ModelRunner(self.model, self.kv_cache, args.block_size, self.device, self.dtype, self.lora_manager)
        self.sampler = Sampler(args.seed, self.device)
        self.eos_token_ids = stop_token_ids_of(self.tokenizer, self.model_path)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    # ---- configuration ------------------------------------------------------------------------

    def _max_model_len(self) -> int:
        limit = getattr(self.text_config, "max_position_embeddings", None) or 2048
        if self.args.max_model_len is None:
            return limit
        if self.args.max_model_len > limit:
            raise ConfigError(
                f"max_model_len={self.args.max_model_len} exceeds the model's max_position_embeddings "
                f"({limit}); lower max_model_len to at most {limit}"
            )
        return self.args.max_model_len

    def _num_kv_blocks(self, num_kv_heads: int, head_dim: int) -> int:
        per_token = KVCache.bytes_per_token(len(self.model.layers), num_kv_heads, head_dim, self.dtype)
        budget = self._kv_budget()
        num_blocks = budget // (per_token * self.args.block_size)
        if num_blocks * self.args.block_size < self.max_model_len:
            need = -(-self.max_model_len // self.args.block_size) * self.args.block_size * per_token
            raise ConfigError(
                f"the KV cache budget of {budget} bytes holds {num_blocks * self.args.block_size} tokens "
                f"({per_token} bytes each), fewer than one sequence of max_model_len={self.max_model_len}; "
                f"raise kv_cache_memory_bytes to at least {need} or lower max_model_len"
            )
        return num_blocks

    def _lora_manager(self) -> LoRAManager:
        args = self.args
        served = {self.served_model_name, self.model_path.name}
        config = LoRAManagerConfig(args.max_loras, args.max_lora_rank, args.max_cpu_loras or args.max_loras, served,
                                   dtype=args.lora_torch_dtype(self.dtype))
        return LoRAManager(self.model, config)

    def _lora_catalog(self, manager: LoRAManager) -> AdapterCatalog:
        """The adapters' catalog, with the resolvers of the installed plugins (loaded once per process)."""
        from ..plugins import load_plugins
        from ..resolver import LoRAResolverRegistry

        load_plugins()
        # resolvers get the model as it was named (vLLM passes its `model` argument)
        return AdapterCatalog(manager, LoRAResolverRegistry, self.args.model or self.served_model_name)

    def _attach_quantized_weights(self, method: str) -> None:
        from ..model_loader.gguf_weights import attach_gguf_weights, find_gguf_file

        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ConfigError(f"quantization={method!r} runs on the CPU in float32; got device={str(self.device)!r}, "
                              f"dtype={self.dtype}: pass device='cpu' (and leave dtype at 'auto' or 'float32')")
        if not isinstance(self.model, CausalLM):
            raise ConfigError(f"quantization={method!r} serves text-only decoders; {type(self.model).__name__} "
                              "models are served with float weights: leave quantization unset")
        attach_gguf_weights(self.model, find_gguf_file(self.model_path))

    def _image_input_processor(self) -> ImageInputProcessor | None:
        """What turns a prompt's images into pixel values and placeholders; None for a text-only model."""
        if not isinstance(self.model, LlavaForConditionalGeneration):
            return None
        token_id = self.model.image_token_id
        limit = (self.args.limit_mm_per_prompt or {}).get("image", 999)
        return ImageInputProcessor(load_image_processor(self.model_path), token_id,
                                   self.tokenizer.convert_ids_to_tokens(token_id), self.model.image_feature_size, limit)

    def _register_default_mm_loras(self) -> dict[str, str]:
        """Add the adapters of `default_mm_loras`, each named after its modality (as vLLM does)."""
        defaults = self.args.default_mm_loras or {}
        if defaults and self.image_processor is None:
            raise ConfigError(f"default_mm_loras is set but the model at {str(self.model_path)!r} takes text only; "
                              "leave default_mm_loras unset, or serve a vision-language model")
        for modality in sorted(defaults):
            self.lora_catalog.register(self.lora_catalog.request_for(modality, defaults[modality]))
        return {modality: modality for modality in defaults}

    def _kv_budget(self) -> int:
        """The KV cache's bytes (see kv_budget): refused when more than the device has left."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return gpu_kv_budget(self.args.kv_cache_memory_bytes, self.args.gpu_memory_utilization, free, total)
        return cpu_kv_budget(self.args.kv_cache_memory_bytes, available_host_memory())

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        lora_request: LoRARequest | str | None = None,
    ) -> None:
        """Queue a prompt (text, `{"prompt": ...}` or `{"prompt_token_ids": [...]}`) for generation;
        a dict prompt may carry images as `"multi_modal_data": {"image": PIL image or list}`.

        `lora_request` is a LoRARequest or a string: the name of an adapter already added, a local
        adapter directory, a name the resolvers find, or a Hub repo id (see loraplex.lora.catalog).
        The adapter is loaded and checked here, so a bad one fails this call and nothing else.

        Everything is checked before anything is allocated: the id, the parameters and the
        prompt first, then the adapter. A request refused here leaves the engine as it was.
        """
        if not isinstance(request_id, str):
            raise InvalidRequestError(f"request_id must be a string; got {type(request_id).__name__} {request_id!r}")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use; give each request a unique id")
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams; got {type(params).__name__}")
        params.verify()  # again: a field may have been changed since construction
        params.update_from_tokenizer(self.tokenizer, self.text_config.vocab_size)
        if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(arrival_time, (int, float))
                                         or not math.isfinite(arrival_time)):
            raise InvalidRequestError(f"arrival_time must be None or a finite number of seconds; got {arrival_time!r}")
        text, token_ids = self._tokenize(prompt)
        images = None
        if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None:
            token_ids, images = self._process_images(token_ids, prompt["multi_modal_data"])
        self._validate_prompt(token_ids)
        if lora_request is None and images is not None:
            lora_request = self._default_mm_lora(images)
        lora_request = self._lookup_lora(lora_request) if lora_request is not None else None
        adapter_version = self.lora_catalog.version(lora_request.lora_name) if lora_request is not None else 0
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed + index)
            seq = Sequence(next(self._seq_ids), request_id, index, list(token_ids), params, arrival, generator,
                           lora_name=lora_request.lora_name if lora_request else None, adapter_version=adapter_version,
                           multi_modal=images.for_sequence() if images is not None else None)
            seqs.append(seq)
        request = _Request(request_id, text, list(token_ids), params, seqs, arrival, lora_request)
        request.metrics["arrival_time"] = arrival
        if lora_request is not None:
            self.lora_manager.record_request(lora_request.lora_name, len(token_ids))
        self.output_processor.add_request(request)
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)

    def _process_images(self, token_ids: list[int], multi_modal_data: object) -> tuple[list[int], MultiModalInputs | None]:
        if self.image_processor is None:
            raise InvalidRequestError(
                f"the prompt carries multi_modal_data, but the model {self.served_model_name!r} takes text only; "
                "send the prompt without images, or serve a vision-language model"
            )
        return self.image_processor.process(token_ids, multi_modal_data)

    def _default_mm_lora(self, images: MultiModalInputs) -> str | None:
        """vLLM's rule for a request that names no adapter: the default adapter of the one modality
        it carries; none when it carries several modalities that each have one."""
        names = [self.default_mm_loras[m] for m in sorted(images.modalities) if m in self.default_mm_loras]
        return names[0] if len(names) == 1 else None

    def _lookup_lora(self, lora_request: LoRARequest | str) -> LoRARequest:
        if self.lora_catalog is None:
            name = lora_request.lora_name if isinstance(lora_request, LoRARequest) else lora_request
            raise InvalidRequestError(
                f"LoRA adapter {name!r} was requested but LoRA is not enabled; start the engine with enable_lora=True (--enable-lora)"
            )
        return self.lora_catalog.lookup(lora_request)

    async def resolve_lora(self, lora_name: str) -> LoRARequest:
        """An adapter by name: one already added, else one the resolvers find (loaded, checked and
        added). Never a path or a Hub id (HTTP's rule; see loraplex.lora.catalog).

        Needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True for names not added yet; see loraplex.lora.resolution.
        """
        catalog = self._catalog()
        return catalog.register_found(await catalog.resolve(lora_name))

    # ---- adapters (vLLM's engine methods) ---------------------------------------------------------

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Add an adapter (checked now); False if it was there already. With `load_inplace=True` for
        an added name, its new weights are checked now and replace the old ones as soon as no
        sequence started on them is left (at once if none is; else at the start of a step)."""
        done = self._add_lora(lora_request)
        return done.result() if done.done() else True

    def _add_lora(self, lora_request: LoRARequest) -> concurrent.futures.Future[bool]:
        """add_lora's future: it ends when the adapter is added or, for a reload in place, swapped in."""
        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError(f"add_lora takes a LoRARequest; got {type(lora_request).__name__}")
        catalog = self._catalog()
        done = catalog.add(lora_request)
        if not done.done():
            self._hold_for_reload(lora_request.lora_name)
        return done

    def _hold_for_reload(self, name: str) -> None:
        """A reload of `name` is pending: sequences of requests not started yet will run on the new
        weights (the next version) and wait for them; started ones finish on the old weights."""
        version = self.lora_catalog.version(name)  # the pending reload's
        for request in self.requests.values():
            seqs = [seq for seq in request.seqs if seq.lora_name == name]
            started = any(seq.status is not SequenceStatus.WAITING or seq.output_token_ids for seq in request.seqs)
            if seqs and not started:
                for seq in seqs:
                    seq.adapter_version = version
        self._apply_reloads()

    def _apply_reloads(self) -> None:
        """Swap in the pending in-place reloads that no sequence on the old weights still needs."""
        catalog = self.lora_catalog
        if catalog is None:
            return
        pending = catalog.pending_reloads()
        if pending:
            blocked = {(seq.lora_name, seq.adapter_version) for request in self.requests.values() for seq in request.seqs
                       if seq.lora_name in pending and not seq.is_finished}
            catalog.apply_reloads(blocked)
            pending = catalog.pending_reloads()
        self.scheduler.held_versions = pending

    def remove_lora(self, lora_id: int | str) -> bool:
        catalog = self._catalog()
        name = catalog.name_of(lora_id)
        if name is None:
            return False
        queued = sum(1 for seq in self.scheduler.waiting if seq.lora_name == name)
        if queued:  # the scheduler would look the removed adapter up when it admits them
            raise LoRAError(
                f"LoRA adapter {name!r} is needed by {queued} queued sequence(s); "
                "abort them or wait for them to finish before removing it"
            )
        return catalog.remove(name)

    def pin_lora(self, lora_id: int | str) -> bool:
        return self._catalog().pin(lora_id)

    def list_loras(self) -> set[int]:
        """The ids of the adapters held in the CPU cache, as vLLM's (an evicted adapter drops out)."""
        return self._catalog().list_loras()

    def list_adapters(self) -> dict[str, LoRARequest]:
        """Every adapter added, by name, whether its weights are cached or not."""
        return self._catalog().list_adapters()

    def _catalog(self) -> AdapterCatalog:
        if self.lora_catalog is None:
            raise ConfigError("LoRA is not enabled on this engine; create it with enable_lora=True (--enable-lora)")
        return self.lora_catalog

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """The prompt's text (None when given as token ids) and its token ids, as Python ints."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise InvalidRequestError(f"prompt['prompt'] must be a string or absent; got {type(text).__name__}")
            return text, self._token_ids(prompt["prompt_token_ids"], "prompt['prompt_token_ids']")
        if isinstance(prompt, dict) and "prompt" in prompt:
            if not isinstance(prompt["prompt"], str):
                raise InvalidRequestError(f"prompt['prompt'] must be a string; got {type(prompt['prompt']).__name__}")
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        if isinstance(prompt, (list, tuple)):
            return None, self._token_ids(prompt, "prompt")
        raise InvalidRequestError(
            f"prompt must be a string, {{'prompt': str}} or {{'prompt_token_ids': [int, ...]}}; got {type(prompt).__name__}"
        )

    @staticmethod
    def _token_ids(ids: object, where: str) -> list[int]:
        """`ids` as a list of ints; bools, floats and strings are refused (the model indexes with them)."""
        if not isinstance(ids, (list, tuple)):
            raise InvalidRequestError(f"{where} must be a list of integer token ids; got {type(ids).__name__}")
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise InvalidRequestError(
                    f"{where} must be a list of integer token ids; item {position} is {token!r} ({type(token).__name__}); "
                    "pass token ids as ints, or the prompt as text"
                )
        return [int(token) for token in ids]

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        if len(token_ids) > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt is {len(token_ids)} tokens long, more than max_model_len={self.max_model_len}; "
                "shorten the prompt or start the engine with a larger max_model_len"
            )
        vocab = self.text_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab}) of the model; "
                                      "give ids the model's tokenizer produces")

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish("abort")
                self.scheduler.free(seq)
        self._apply_reloads()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block (vLLM's method), e.g. after the cache's memory was written
        to from outside; requests running keep their blocks."""
        self.scheduler.reset_prefix_cache()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batched forward pass; return the outputs of the requests it advanced.

        What each output carries follows its request's `SamplingParams.output_kind`; a
        FINAL_ONLY request that has not finished yet, for one, has no output this step.
        """
        self._apply_reloads()  # before scheduling: waiting sequences then start on the new weights
        batch = self.scheduler.schedule()
        touched: dict[str, _Request] = {}
        for seq, error in batch.failed:
            # this request alone ends; the rest of the batch goes on
            logger.error("request %s aborted: %s", seq.request_id, error)
            seq.finish("abort")
            self.scheduler.free(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        if not batch:
            outputs = self._outputs(touched)
            self._apply_reloads()
            return outputs
        seqs = batch.sampled  # a prefill chunk that leaves part of its prompt for later samples nothing
        processor = self.output_processor
        logits = self.runner.execute(batch)  # [B, V]
        rows = [processor.sampling_row(seq, self.runner.prompt_logits.get(seq.seq_id)) for seq in seqs]
        sampled = self.sampler(logits, rows)
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            request = self.requests[seq.request_id]
            processor.append_token(request, seq, sampled, i, now)
            if seq.lora_name is not None:
                self.lora_manager.record_generated(seq.lora_name)
            if seq.is_finished:
                self.scheduler.free(seq)
            touched[request.request_id] = request
        outputs = self._outputs(touched)
        self._apply_reloads()  # the last sequence on the old weights may have just finished
        return outputs

    def _outputs(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        outputs = []
        for request in touched.values():
            out = self.output_processor.make_output(request)
            if out is not None:
                outputs.append(out)
            if request.finished:
                self.requests.pop(request.request_id, None)
        return outputs
