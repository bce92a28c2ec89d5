"""flexbatch as a model of lm-evaluation-harness (`pip install 'flexbatch[eval]'`).

Importing this module registers the model name `flexbatch` with lm-eval (lm-eval 0.4.13
does not load plugins by entry point, so import it, or run `flexbatch eval`):

    import lm_eval
    from flexbatch.integrations.lm_eval import FlexbatchLM
    results = lm_eval.simple_evaluate(model=FlexbatchLM(pretrained="path/to/model", gpu_batch_size=16,
                                                        percent="0 100 100 0 100 0"), tasks=["hellaswag"])

or `lm_eval.simple_evaluate(model="flexbatch", model_args="pretrained=...,compress_weight=True")`.
The model arguments are the options of `flexbatch run`, written key=value (flexbatch/options.py).

loglikelihood scores through `LLM.score_continuations`: prefill only, requests that share a
context in one pass, blocks of rows longest first. loglikelihood_rolling splits each text into
non-overlapping windows of the model's context and scores those the same way; generate_until
runs `LLM.generate` with each request's stop strings, max_gen_toks and sampling settings.
"""
from __future__ import annotations

from ..api import LLM
from ..config import SamplingParams
from ..errors import ConfigError
from ..options import parse_option_dict, run_settings
from ..prepare import prepare_scoring

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra is missing
    raise ImportError("lm-evaluation-harness is not installed: pip install 'flexbatch[eval]' "
                      "(or pip install lm-eval==0.4.13)") from e

SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "top_k", "seed"}


@register_model("flexbatch")
class FlexbatchLM(TemplateLM):
    """An lm-eval model running on flexbatch.

    pretrained (or model): an HF folder, .gguf file or converted store (default: the default
    model). Without policy options the planner chooses the policy for a scoring workload
    within this machine's memory (or cpu_memory=...; no_plan=True keeps everything in memory).
    batch_size: rows per block (lm-eval's --batch_size; "auto" leaves it to the planner).
    max_length: the context to score in (default: the model's). max_gen_toks: tokens to
    generate when a task gives no limit (256, as lm-eval's hf model). Every other
    keyword is a policy or compression option of `flexbatch run`, e.g. percent="0 100 100 0 100 0",
    gpu_batch_size=8, compress_weight=True, offload_dir=/ssd/tmp. Or pass a loaded `llm`.
    """

    def __init__(self, pretrained: str | None = None, llm: LLM | None = None, batch_size: int | str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, max_batch_size: int | None = None,
                 **options):
        super().__init__()
        self.llm = llm if llm is not None else _load(pretrained, batch_size, options)
        if self.llm.tokenizer is None:
            raise ConfigError(f"{self.llm.model_path} has no tokenizer files; lm-eval needs one to encode its text.")
        self.tokenizer = self.llm.tokenizer
        self._max_length = max_length or self.llm.config.max_position_embeddings
        self._max_gen_toks = max_gen_toks

    # ---- what lm-eval asks of a model -----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else min(self.llm.eos_ids)

    @property
    def prefix_token_id(self) -> int:
        """The context of text scored from its start: BOS if the model has one, else EOS (as hf)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.model_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As lm-eval's hf model: the tokenizer's own default, unless the text already starts with BOS.
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---- scoring --------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) for
        ((context, continuation) strings or None, context ids, continuation ids) requests."""
        pairs = [self._fit(context, continuation) for _, context, continuation in requests]
        scores = self.llm.score_continuations(pairs, progress=not disable_tqdm)
        answers = [(score.total, score.is_greedy) for score in scores]
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Cut the context from the left so context + continuation (less its last token) fits
        the model's window, as lm-eval's hf model does."""
        if len(continuation) > self.max_length:
            raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's context "
                              f"of {self.max_length}")
        keep = self.max_length - len(continuation) + 1
        return context[-keep:], continuation

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts, each split into non-overlapping windows of max_length
        tokens (the first conditioned on the prefix token), all windows scored together."""
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self.llm.score_continuations(windows, progress=not disable_tqdm)):
            totals[owner] += score.total
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, cut at its first stop string; requests with different
        settings run in the same blocks (sampling settings are per sequence)."""
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (r.args for r in requests):
            settings, until = self._sampling(gen_kwargs)
            prompts.append(self.tok_encode(context)[-(self.max_length - settings.max_new_tokens):])
            params.append(settings)
            stops.append(until)
        outputs = self.llm.generate_ids(prompts, params, progress=not disable_tqdm)
        texts = [postprocess_generated_text(out.text, until, None) for out, until in zip(outputs, stops)]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        max_new_tokens = kwargs.pop("max_gen_toks")
        unknown = set(kwargs) - SAMPLING_KEYS
        if unknown:
            raise ConfigError(f"generation setting(s) {', '.join(sorted(unknown))} are not supported by flexbatch; "
                              f"supported: until, max_gen_toks, {', '.join(sorted(SAMPLING_KEYS))}")
        if max_new_tokens >= self.max_length:
            raise ConfigError(f"max_gen_toks {max_new_tokens} leaves no room for a prompt in the model's context "
                              f"of {self.max_length} tokens")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        if kwargs.get("do_sample") and temperature == 0.0:
            temperature = 1.0  # transformers samples at temperature 1 when none is given
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                                seed=kwargs.get("seed"), stop=tuple(s for s in until if s))
        return params, until


def _load(pretrained: str | None, batch_size, options: dict) -> LLM:
    """The LLM that lm-eval's model arguments describe, read by the CLI's own option parser."""
    if "model" in options:
        if pretrained is not None:
            raise ConfigError("give the model once: pretrained= or model=, not both")
        pretrained = options.pop("model")
    options.pop("trust_remote_code", None)  # lm-eval adds it; flexbatch runs no remote code anyway
    if isinstance(batch_size, str) and not batch_size.isdigit():
        batch_size = None  # "auto": flexbatch's blocks are sized by the policy, not by probing
    args = parse_option_dict({"model": pretrained, "batch_size": batch_size, **options}, prog="flexbatch model_args")
    return prepare_scoring(run_settings(args)).build_llm()
