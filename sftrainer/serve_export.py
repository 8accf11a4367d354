"""A LoRA run served by vLLM or SGLang: check what the server loads as an adapter, write the adapter
in the layout it reads, and give the command that serves it and a request that uses it.

``export_for_server(run_dir, out_dir, server)`` checks first and writes nothing when the adapter
cannot be served (``RunDirError`` listing every problem); ``serve_problems`` is the check alone, on an
``adapter_config.json`` mapping.

What the servers load, and where that is written (read for this module; no server runs here):

- vLLM, ``vllm/lora/peft_helper.py`` (``PEFTHelper._validate_features`` / ``validate_legal``): a
  non-empty ``modules_to_save`` ("vLLM only supports modules_to_save being None") and ``use_dora``
  ("vLLM does not yet support DoRA") are refused; ``r`` above ``--max-lora-rank`` is refused;
  ``bias`` other than "none" needs a bias switch that newer releases dropped; ``use_rslora`` is
  honoured (scaling alpha / sqrt(r)). ``rank_pattern`` / ``alpha_pattern`` are not among its fields
  (``from_dict`` drops unknown keys), so per-module ranks would be served with the global ``r``.
- vLLM, ``vllm/config/lora.py``: ``max_lora_rank`` defaults to 16 and takes one of
  1, 8, 16, 32, 64, 128, 256, 320, 512 (``MaxLoRARanks``); ``--max-loras`` (default 1) adapters
  per batch; adapters are named with ``--lora-modules NAME=PATH`` and chosen per request by
  ``"model": NAME``.
- vLLM issue #36501 (open, 2026): PEFT's trainable tokens (``trainable_token_indices``, weights
  ``...token_adapter.trainable_tokens_delta``) are "unsupported LoRA weight". vLLM PR #28545 removed
  the extra vocabulary of adapters: an adapter shares the base's vocabulary.
- SGLang, ``python/sglang/srt/lora/lora_config.py``: reads ``target_modules``, ``r``, ``lora_alpha``,
  ``rank_pattern`` / ``alpha_pattern`` and ``use_dora``; not ``use_rslora`` (so rsLoRA would be
  scaled alpha / r), ``modules_to_save`` or ``trainable_token_indices``. ``lora/utils.py``: the
  target modules it knows (``_KNOWN_LORA_TARGET_MODULES``, with q/k/v -> qkv_proj and gate/up ->
  gate_up_proj), a string ``target_modules`` only as 'all' / 'all-linear'.
- SGLang docs (``docs/advanced_features/lora``): ``--lora-paths NAME=PATH``; ``--max-lora-rank`` and
  ``--lora-target-modules`` are inferred from the adapters given at launch; the OpenAI-compatible
  API selects an adapter with ``"model": "BASE:NAME"``.

The projections both serve for the supported architectures (Llama, Mistral, Qwen2/3, Gemma, Phi-3)
are the attention and MLP linears below; ``embed_tokens`` / ``lm_head`` as LoRA targets are served
by recent releases of both (vLLM's ``embedding_modules``, SGLang's ``EMBEDDING_NAMES``) and are
accepted with a note. DoRA is refused for both: neither applies the magnitude vector.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftrainer.errors import RunDirError
from sftrainer.run import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Run, read_run, resolve_base

logger = logging.getLogger(__name__)

SERVERS = ("vllm", "sglang")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # written where the run's template is not the base's
VLLM_DEFAULT_MAX_RANK = 16
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py, MaxLoRARanks
PROJECTIONS = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}
)
EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
EXAMPLE_MESSAGES = [{"role": "user", "content": "Reverse the words: cat dog"}]


@dataclass
class ServeExport:
    """What ``export_for_server`` wrote and how to serve it."""

    server: str
    out_dir: Path
    name: str  # the adapter's name on the server
    base: str  # the base model the server loads (a local path or a hub id)
    command: str  # the shell command that starts the server
    request: dict[str, Any]  # an OpenAI-compatible /v1/chat/completions body that uses the adapter
    prompt: str  # the prompt the server builds for ``request`` (the run's chat template)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The report as the CLI prints it: the command, the request, then the notes."""
        body = json.dumps(self.request, indent=2, ensure_ascii=False)
        lines = [
            f"Wrote the adapter for {self.server} to {self.out_dir}",
            "",
            "Serve it:",
            f"  {self.command}",
            "",
            "Ask it (OpenAI-compatible, port 8000 for vLLM, 30000 for SGLang):",
            f"  curl http://localhost:{8000 if self.server == 'vllm' else 30000}/v1/chat/completions \\",
            "    -H 'Content-Type: application/json' -d @- <<'EOF'",
            *("  " + line for line in body.splitlines()),
            "EOF",
            "",
            "The prompt the server builds for it (the run's chat template):",
            *("  " + line for line in self.prompt.splitlines()),
        ]
        if self.notes:
            lines += ["", "Notes:", *(f"  - {note}" for note in self.notes)]
        return "\n".join(lines)


@dataclass
class Compatibility:
    """``serve_problems``' answer: what stops the server loading the adapter, the flags it needs,
    and what to know."""

    problems: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _target_names(targets: Any) -> list[str] | None:
    """The module names of ``target_modules`` (a list, or a string), or None for a regex string."""
    if isinstance(targets, str):
        return None if targets not in ("all-linear",) else ["all-linear"]
    return sorted({str(t).split(".")[-1] for t in targets or []})


def serve_problems(adapter: dict[str, Any], server: str) -> Compatibility:
    """Whether ``server`` ('vllm' or 'sglang') serves the PEFT adapter whose ``adapter_config.json``
    is ``adapter``: every problem found (none: it loads), the launch flags it needs, and notes."""
    if server not in SERVERS:
        raise RunDirError(f"server must be one of {list(SERVERS)}, got {server!r}")
    out = Compatibility()
    label = {"vllm": "vLLM", "sglang": "SGLang"}[server]
    peft_type = adapter.get("peft_type", "LORA")
    if peft_type != "LORA":
        out.problems.append(f"the adapter is {peft_type}, not LoRA: {label} serves LoRA adapters only")
        return out
    if adapter.get("use_dora"):
        out.problems.append(
            f"DoRA (use_dora: true): {label} does not serve DoRA; merge it instead (`sftrainer merge`)"
        )
    if adapter.get("modules_to_save"):
        out.problems.append(
            f"modules_to_save {adapter['modules_to_save']}: {label} loads LoRA weights only, not fully "
            "trained modules; merge it instead"
        )
    if adapter.get("trainable_token_indices"):
        out.problems.append(
            f"trainable tokens (trainable_token_indices {adapter['trainable_token_indices']}): {label} does not "
            "load PEFT's trainable_tokens_delta" + (" (vllm-project/vllm#36501)" if server == "vllm" else "")
            + "; merge it instead"
        )  # fmt: skip
    if adapter.get("bias", "none") != "none":
        out.problems.append(
            f"bias={adapter['bias']!r}: trained biases are not served as LoRA weights; merge it instead"
        )
    if adapter.get("use_rslora") and server == "sglang":
        out.problems.append(
            "rank-stabilised LoRA (use_rslora: true): SGLang reads r and lora_alpha, not use_rslora, and would "
            "scale the adapter by alpha/r instead of alpha/sqrt(r); serve it with vLLM or merge it"
        )
    patterns = {k: adapter.get(k) for k in ("rank_pattern", "alpha_pattern") if adapter.get(k)}
    if patterns and server == "vllm":
        out.problems.append(
            f"per-module ranks or alphas ({', '.join(patterns)}): vLLM reads r and lora_alpha only and would "
            "scale those modules wrongly; serve it with SGLang or merge it"
        )
    if adapter.get("layers_to_transform") or adapter.get("layers_pattern"):
        out.problems.append("layers_to_transform / layers_pattern: not read by the servers; merge it instead")
    names = _target_names(adapter.get("target_modules"))
    if names is None:
        out.problems.append(
            f"target_modules is a pattern ({adapter.get('target_modules')!r}): give the module names as a list"
        )
    else:
        unknown = [n for n in names if n not in PROJECTIONS | EMBEDDINGS | {"all-linear"}]
        if unknown:
            out.problems.append(
                f"target modules {unknown}: {label} serves LoRA on {sorted(PROJECTIONS)} "
                f"(and {sorted(EMBEDDINGS)} in recent releases)"
            )
        if EMBEDDINGS & set(names):
            out.notes.append(
                f"LoRA on {sorted(EMBEDDINGS & set(names))}: served by recent {label} releases only (older ones "
                "refuse the adapter); the vocabulary must be the base's"
            )
    rank = int(adapter.get("r", 8))
    ranks = [rank, *[int(r) for r in (adapter.get("rank_pattern") or {}).values()]]
    if server == "vllm":
        need = next((r for r in VLLM_RANKS if r >= max(ranks)), None)
        if need is None:
            out.problems.append(f"rank {max(ranks)}: vLLM's --max-lora-rank is at most {VLLM_RANKS[-1]}")
        elif need > VLLM_DEFAULT_MAX_RANK:
            out.flags += ["--max-lora-rank", str(need)]
            out.notes.append(
                f"rank {max(ranks)} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: the command "
                f"raises it to {need} (allowed values {', '.join(map(str, VLLM_RANKS))})"
            )
    return out


def _chat_template(source: str) -> str | None:
    from transformers import AutoTokenizer  # only where a tokenizer is read

    try:
        template = AutoTokenizer.from_pretrained(source).chat_template
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) else None


def _base_notes(run: Run, base: str) -> list[str]:
    notes = []
    if Path(base).is_dir():
        notes.append(f"the base is the local directory {base}: the server machine needs it at this path")
    else:
        notes.append(
            f"the base is the hub model {base}: the server downloads it (it must be the same revision)"
        )
    if run.was_quantized:
        notes.append(
            "the run trained on a quantized base (QLoRA); the server applies the adapter to the base as it loads "
            "it (full precision unless told to quantize), which differs slightly from training"
        )
    return notes


def export_for_server(
    run_dir: str | Path,
    out_dir: str | Path,
    server: str,
    *,
    name: str | None = None,
    base: str | None = None,
) -> ServeExport:
    """Check that ``server`` ('vllm' / 'sglang') serves the LoRA adapter of ``run_dir``, then copy it
    (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT saved them) to ``out_dir``, with
    the run's chat template where it is not the base's. ``name``: the adapter's name on the server
    (default: ``out_dir``'s name); ``base``: the base model (default: ``resolve_base``). Raises
    ``RunDirError`` listing every problem before anything is written."""
    run = read_run(run_dir)
    if server not in SERVERS:
        raise RunDirError(f"--format must be one of {list(SERVERS)} here, got {server!r}")
    if not run.is_adapter:
        raise RunDirError(
            f"{run_dir} holds a full model, not a LoRA adapter: serve it directly (`vllm serve {run_dir}` / "
            f"`python -m sglang.launch_server --model-path {run_dir}`)"
        )
    out = Path(out_dir)
    adapter = json.loads((run.path / ADAPTER_CONFIG).read_text())
    check = serve_problems(adapter, server)
    if not (run.path / ADAPTER_WEIGHTS).is_file():
        check.problems.append(
            f"{run.path / ADAPTER_WEIGHTS} is missing (the servers read safetensors weights)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        check.problems.append(
            f"{out_dir} already exists and is not empty; give a new or empty output directory"
        )
    base_model = resolve_base(run, base)
    if check.problems:
        listed = "\n".join(f"  - {p}" for p in check.problems)
        raise RunDirError(f"{server} cannot serve the adapter of {run_dir}; nothing was written:\n{listed}")

    name = name or out.resolve().name
    run_template, base_template = _chat_template(str(run.path)), _chat_template(base_model)
    out.mkdir(parents=True, exist_ok=True)
    for filename in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(run.path / filename, out / filename)
    flags = list(check.flags)
    notes = [*check.notes, *_base_notes(run, base_model)]
    if run_template is not None and run_template != base_template:
        (out / CHAT_TEMPLATE_FILE).write_text(run_template, encoding="utf-8")
        flags += ["--chat-template", str(out.resolve() / CHAT_TEMPLATE_FILE)]
        notes.append(
            "the run's chat template is not the base tokenizer's: the command passes it with --chat-template "
            "(server-wide: every request, the base model's too, uses it)"
        )
    elif run_template is None:
        notes.append("the run saved no chat template: the server uses the base tokenizer's")
    adapter_path = str(out.resolve())
    if server == "vllm":
        command = [
            "vllm",
            "serve",
            base_model,
            "--enable-lora",
            "--lora-modules",
            f"{name}={adapter_path}",
            *flags,
        ]
        request_model = name
    else:
        command = ["python", "-m", "sglang.launch_server", "--model-path", base_model, "--enable-lora",
                   "--lora-paths", f"{name}={adapter_path}", *flags]  # fmt: skip
        request_model = f"{base_model}:{name}"  # SGLang's base-model:adapter-name
    request = {"model": request_model, "messages": EXAMPLE_MESSAGES, "max_tokens": 64, "temperature": 0}
    report = ServeExport(
        server=server,
        out_dir=out,
        name=name,
        base=base_model,
        command=" ".join(_quote(part) for part in command),
        request=request,
        prompt=_render(run_template, run, base_model),
        notes=notes,
    )
    logger.info("Wrote the adapter of %s for %s to %s", run_dir, server, out)
    return report


def _render(template: str | None, run: Run, base: str) -> str:
    from transformers import AutoTokenizer  # only where a tokenizer is read

    tokenizer = AutoTokenizer.from_pretrained(str(run.path) if template is not None else base)
    text = tokenizer.apply_chat_template(EXAMPLE_MESSAGES, tokenize=False, add_generation_prompt=True)
    return str(text)


def _quote(part: str) -> str:
    import shlex

    return shlex.quote(part)
