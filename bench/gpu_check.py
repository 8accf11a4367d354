"""One command that proves sftrainer's GPU path, made to run once on a lent GPU (issue 22, §1).

    bash bench/gpu_wheels.sh            # here: the wheels the GPU machine lacks, into bench/gpu_wheels/
    python bench/gpu_check.py           # there (carry: ["bench/gpu_wheels"]): writes $OUT/gpu-check.json
    python bench/gpu_check.py --dry-run # here, on the CPU: every part on a tiny model, in about a minute

Parts, in the order they run, each in a process of its own with a time limit of its own:

  install       the carried wheels into a private folder (pip --no-index --no-deps --target)
  env           versions, the device and its driver, a measured bf16 matmul peak
  bf16_master   a bf16 checkpoint trained under bf16 autocast: every trainable weight moves and stays fp32
  packing       packed rows are isolated, and their per-token losses equal those of each row alone:
                sdpa (fp32 and bf16), flash_attention_2 and a `kernels` kernel where available
  chunked_loss  sftrainer's chunked loss equals the model's own loss and gradients, fp32 and bf16
  qlora         a 4-bit base trains only its LoRA adapter (needs bitsandbytes, which is not carried)
  offload       activation_offloading=True trains and lowers the peak of torch.cuda.max_memory_allocated
  resume        a run SIGKILLed after a checkpoint and resumed ends as an uninterrupted run does
  speed/...     sftrainer vs TRL, same model, tokenizer, data and settings, one process per config:
                Qwen2.5-0.5B- and 1.5B-shaped models, bf16 autocast, max_length 2048, packed and padded,
                full fine-tune and LoRA (r16, all-linear), gradient checkpointing on for both
  longest/...   the longest sequence each trainer fits (1.5B LoRA, one row, doubling from 4096)

A part ends as pass, fail, skip (with the reason) or timeout (past its limit: it is killed and the run
goes on). The budget (--budget-s) is shared out as the run goes: a part may use what is left less the
minimum kept back for each part after it, up to its own cap, so a slow part cannot eat the rest.
Processes are forked from this one after torch, transformers, datasets, trl and sftrainer are imported
(saving the import in every part; CUDA is first touched in the parts, never here); --spawn starts a fresh
interpreter per part instead, which this run also falls back to if a forked part cannot use CUDA.

Output: progress lines, then ONE table (the last thing printed), ONE JSON file ($OUT/gpu-check.json
where $OUT is set, else --out) and, beside it, a .log file with the end of each part's log.

Throughput is trained tokens (label != -100) per second of wall time from the end of the warm-up steps
to the end of the last step (so collating the next batch and logging count), the device synchronised. Model FLOPs per step (the MFU numerator):
  full fine-tune  6 * N * T + 12 * L * d * P
  LoRA            (4 * N + 6 * N_lora) * T + 12 * L * d * P   (frozen weights get no weight gradient)
N: parameters of the matrix multiplications (the layers and the LM head; the input embedding is a
lookup), T: non-padding tokens, L: layers, d: hidden size (heads x head dim), P: the causal query-key
pairs, n(n+1)/2 for each row of n tokens (a packed row's pieces counted apart). Gradient-checkpointing
recomputation is not counted. MFU divides by the card's dense bf16 peak (PEAK_TFLOPS, picked by device
name) and, beside it, by the bf16 matmul peak measured in `env`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import lzma
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = REPO / "tests" / "data" / "tokenizers"  # released tokenizers the tests use (see its README)
WHEELS = REPO / "bench" / "gpu_wheels"
SIDES = ("sftrainer", "trl")
DRY_RUN = "--dry-run" in sys.argv  # targets are not judged on a tiny CPU model
NO_CUDA = "no CUDA device is visible"
# What the CPU suite runs with; the GPU machine has transformers 5.17 (the run goes on, and says so).
TESTED_WITH = {"transformers": "5.25.0", "trl": "1.16.0", "datasets": "5.2.0"}
VERSIONS = ("torch", "transformers", "peft", "accelerate", "tokenizers", "datasets", "trl", "dill")
VERSIONS += ("multiprocess", "pyarrow", "fsspec", "huggingface_hub", "numpy", "safetensors", "bitsandbytes")
VERSIONS += ("flash_attn", "kernels", "triton")
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a piece of torch.cuda.get_device_name(); first match.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)
SHAPES = {  # Qwen2 models, random weights, the tokenizer's vocabulary (128,256), tied embeddings
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    | dict(intermediate_size=4864),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
    | dict(intermediate_size=8960),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    | dict(intermediate_size=128),
}
WORDS = tuple(
    """the of and to in is that for it as with was on be by this are from at or an have not but which they
    one all were we can there their been has more if when will would who so no out up into them some time
    than only other its new about may two could these then first also any like after over such our most
    made very through between where before many should even well because those being must each under same
    three might much both own while see way last here how long great part down still found work life just
    world year place good small every water light house city music paper river number story market garden
    question answer reason system power field morning window letter summer winter animal forest table""".split()  # noqa: SIM905
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of one kind of run: the GPU run, or the dry run on the CPU (the same code, tiny sizes)."""

    name: str
    device: str
    tokenizer: str  # a folder of tests/data/tokenizers
    small: dict[str, int]  # the correctness parts' Qwen2
    small_length: int  # their max_length
    small_words: tuple[tuple[int, int, int], tuple[int, int, int]]  # (low, high, mode) prompt, completion
    shapes: tuple[str, ...]  # speed parts, the first run before the longest-sequence parts
    methods: tuple[str, ...]
    max_length: int
    packed_batch: int  # packed sequences of max_length per step
    padded_batch: int  # rows per step when padded: about the rows packed_batch sequences hold
    words: tuple[tuple[int, int, int], tuple[int, int, int]]
    rows: int
    warmup: int  # optimizer steps before the timed ones
    timed: int
    long_shape: str
    long_start: int
    long_cap: int
    resume: tuple[int, int, int]  # max_steps, save_steps, SIGKILL after this step
    offload: dict[str, int]  # offloading part's model
    offload_length: int
    budget_s: float


GPU = Scale(
    name="gpu",
    device="cuda",
    tokenizer="llama-3.1-instruct",  # 128,256 tokens: the vocabulary where the loss's memory matters
    small=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    | dict(intermediate_size=688),
    small_length=512,
    small_words=((4, 160, 24), (4, 160, 32)),
    shapes=("1.5B", "0.5B"),
    methods=("full", "lora"),
    max_length=2048,
    packed_batch=4,
    padded_batch=16,
    words=((8, 700, 40), (8, 700, 60)),  # about 500 tokens a row: 4 rows fill a 2048-token sequence
    rows=400,
    warmup=2,
    timed=6,
    long_shape="1.5B",
    long_start=4096,
    long_cap=131072,
    resume=(14, 4, 6),
    offload=dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
    | dict(intermediate_size=2816),
    offload_length=2048,
    budget_s=480,
)
DRY = Scale(
    name="dry-run",
    device="cpu",
    tokenizer="mistral-7b-v0.1",  # 32,000 tokens: the same code, a quarter of the CPU time per logit
    small=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    | dict(intermediate_size=64),
    small_length=64,
    small_words=((2, 24, 4), (2, 24, 6)),
    shapes=("tiny",),
    methods=("full", "lora"),
    max_length=128,
    packed_batch=2,
    padded_batch=6,
    words=((2, 40, 8), (2, 40, 10)),
    rows=24,
    warmup=1,
    timed=1,
    long_shape="tiny",
    long_start=64,
    long_cap=64,  # one try: the doubling is a loop around it
    resume=(4, 2, 3),
    offload=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    | dict(intermediate_size=64),
    offload_length=64,
    budget_s=300,  # a cap, not a target (the parts' reserves are sized for the GPU run)
)


class Skip(Exception):
    """The part cannot run here; the message says why."""


@dataclasses.dataclass
class Ctx:
    """What a part's process knows: the scale, where to write, its deadline; ``numbers`` is its result."""

    scale: Scale
    workdir: Path
    deadline: float  # time.time() at which the part is killed
    result: Path
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dry(self) -> bool:
        return self.scale.device == "cpu"

    def out(self, name: str) -> Path:
        return self.workdir / "runs" / name.replace("/", "-")

    def note(self, text: str) -> None:
        """The part's line in the table."""
        self.numbers["summary"] = text

    def save(self, status: str = "running", reason: str = "") -> None:
        """Write the result now (again at the end): a part killed at its limit keeps what it had."""
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, "reason": reason, "numbers": self.numbers}, default=str))
        tmp.replace(self.result)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# ---- shared helpers: tokenizer, models, data, trainers, meters -------------------------------------------


def prepare_tokenizer(name: str, workdir: Path) -> dict[str, Any]:
    """Decompress a released tokenizer of tests/data/tokenizers into workdir/tokenizer, its sha256
    checked against index.json; returns its provenance (index.json's entry)."""
    index = json.loads((TOKENIZERS / "index.json").read_text(encoding="utf-8"))[name]
    raw = lzma.decompress((TOKENIZERS / name / "tokenizer.json.xz").read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != index["tokenizer.json sha256"]:
        raise SystemExit(f"{TOKENIZERS / name}: tokenizer.json sha256 {digest} is not index.json's")
    out = workdir / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes(raw)
    shutil.copy(TOKENIZERS / name / "tokenizer_config.json", out / "tokenizer_config.json")
    keys = ("source", "model", "len", "tokenizer.json sha256")
    return {"name": name, "files": str((TOKENIZERS / name).relative_to(REPO))} | {k: index[k] for k in keys}


def load_tokenizer(ctx: Ctx) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ctx.workdir / "tokenizer"))


def qwen2(
    tokenizer: Any, dims: dict[str, int], dtype: Any, device: str, attn: str = "sdpa", positions: int = 0
):
    """A Qwen2 causal LM with random weights (seed 0), built on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        max_position_embeddings=max(positions, 32768),
        rope_theta=1e6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **dims,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


def small_model(ctx: Ctx, tokenizer: Any, dtype: Any = None, attn: str = "sdpa") -> Any:
    import torch

    return qwen2(tokenizer, ctx.scale.small, dtype or torch.float32, ctx.scale.device, attn)


def saved_small_model(ctx: Ctx, tokenizer: Any, name: str, dtype: Any) -> Path:
    """The small model saved as a checkpoint in ``dtype`` (built on the CPU: nothing here touches CUDA)."""
    model = qwen2(tokenizer, ctx.scale.small, dtype, "cpu")
    path = ctx.out(name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_rows(n: int, words: tuple, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-like prompt/completion rows of varied length (word counts drawn from triangular laws)."""
    rng = random.Random(seed)

    def text(low: int, high: int, mode: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(int(rng.triangular(low, high, mode))))

    return [{"prompt": text(*words[0]), "completion": " " + text(*words[1])} for _ in range(n)]


def small_rows(ctx: Ctx, n: int = 48) -> list[dict[str, str]]:
    return make_rows(n, ctx.scale.small_words, seed=2)


def sft_args(ctx: Ctx, name: str, **overrides: Any) -> Any:
    """sftrainer's SFTConfig for a short correctness run on the scale's device, bf16 autocast."""
    from sftrainer import SFTConfig

    values: dict[str, Any] = dict(
        output_dir=str(ctx.out(name)),
        max_length=ctx.scale.small_length,
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=True,
        use_cpu=ctx.dry,
        overwrite_output_dir=True,
    )
    return SFTConfig(**(values | overrides))


def lora_config(r: int = 16) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def make_trainer(ctx: Ctx, side: str, model: Any, tokenizer: Any, rows: list, name: str, **run: Any) -> Any:
    """``side``'s SFTTrainer on the same model, tokenizer, rows and settings (``run``: max_length, packing,
    batch, steps, lora)."""
    import datasets

    common: dict[str, Any] = dict(
        output_dir=str(ctx.out(name)),
        max_length=run["max_length"],
        packing=run["packing"],
        per_device_train_batch_size=run["batch"],
        gradient_accumulation_steps=1,
        max_steps=run["steps"],
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # TRL's default; sftrainer's is off. The same on both: it trades compute for activation memory.
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=ctx.dry,
    )
    data = datasets.Dataset.from_list(rows)
    peft = lora_config() if run["lora"] else None
    if side == "trl":
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer as TRLTrainer

        args = TRLConfig(**common)
        return TRLTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft
        )
    from sftrainer import SFTConfig, SFTTrainer

    args = SFTConfig(**common, overwrite_output_dir=True)
    return SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft
    )


def need_trl(side: str) -> None:
    if side != "trl":
        return
    try:
        import trl  # noqa: F401
    except Exception as error:
        raise Skip(
            f"trl is not importable here ({type(error).__name__}: {error}; bash bench/gpu_wheels.sh)"
        ) from None


def segments(feature: dict[str, Any]) -> list[int]:
    """Lengths of the rows a collator input holds: a packed sequence's pieces, else the row itself."""
    if feature.get("seq_lengths") is not None:
        return [int(n) for n in feature["seq_lengths"]]
    positions = feature.get("position_ids")
    if positions is not None:
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        return [b - a for a, b in itertools.pairwise(starts) if b > a]
    return [len(feature["input_ids"])]


def meter(collator: Any) -> list[dict[str, int]]:
    """Count what every batch the collator makes holds. The collator's class becomes a subclass (so the
    trainers' isinstance checks, e.g. sftrainer's isolation check, still see what it is)."""
    records: list[dict[str, int]] = []
    base = type(collator)

    def __call__(self: Any, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = base.__call__(self, features)
        labels = batch["labels"]
        rows = [n for f in features for n in segments(f)]
        records.append(
            dict(
                positions=labels.numel(),
                tokens=sum(rows),
                trained=int((labels[:, 1:] != -100).sum()),
                pairs=sum(n * (n + 1) // 2 for n in rows),
                longest=max(rows),
            )
        )
        return batch

    collator.__class__ = type(f"Metered{base.__name__}", (base,), {"__call__": __call__})
    return records


def step_clock(cuda: bool, records: list) -> Any:
    """A TrainerCallback timing each optimizer step (``.times``: from its start to its end; ``.ends``: the
    clock at each end), the device synchronised there. It empties ``records`` (``meter``'s) when training
    begins: sftrainer's isolation probe, run by its own on_train_begin before this one's, lays out its rows
    with the same collator."""
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.ends: list[float] = []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            records.clear()

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            sync()
            self.ends.append(time.perf_counter())
            self.times.append(self.ends[-1] - self.start)

    return StepClock()


def param_counts(model: Any) -> dict[str, int]:
    """total (tied weights once), matmul (layers + LM head: what 6N counts) and the embedding."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return {"total": total, "matmul": total - embed + head, "embedding": embed}


def reset_peak(ctx: Ctx) -> None:
    import torch

    if not ctx.dry:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(ctx: Ctx) -> float | None:
    import torch

    return None if ctx.dry else torch.cuda.max_memory_allocated() / 2**30


def is_oom(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def free() -> None:
    """Return the memory of what the caller dropped (its references must be gone) to the device."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def autocast(ctx: Ctx, enabled: bool = True) -> Any:
    import torch

    return torch.autocast(ctx.scale.device, dtype=torch.bfloat16, enabled=enabled)


def token_losses(model: Any, inputs: dict[str, Any], labels: Any) -> Any:
    """Cross-entropy of every position's next token, [B, T - 1] (0 where the label is ignored)."""
    import torch.nn.functional as F

    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")


# ---- the parts -----------------------------------------------------------------------------------------


def part_env(ctx: Ctx) -> None:
    """Versions, the device and its driver, and a measured bf16 matmul peak (the second MFU denominator)."""
    import platform

    import torch

    versions = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import sftrainer

    versions["sftrainer"] = sftrainer.__version__
    versions["cuda"] = torch.version.cuda
    ctx.numbers["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    ctx.numbers["versions"] = versions
    ctx.numbers["sftrainer_path"] = str(Path(sftrainer.__file__).parent)
    ctx.numbers["sftrainer_code_sha256"] = code_hash()
    ctx.numbers["older_than_tested"] = older_than_tested(versions)
    if ctx.dry:
        device = {"name": f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "spec_tflops": None}
    else:
        check(torch.cuda.is_available(), NO_CUDA)
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        device = {
            "name": name,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(),
            "driver": nvidia_driver(),
            "spec_tflops": next((peak for key, peak in PEAK_TFLOPS if key in name), None),
        }
    device["matmul_tflops"] = float(f"{matmul_peak(ctx):.3g}")
    ctx.numbers["device"] = device
    old = ", ".join(f"{k} {v}" for k, v in ctx.numbers["older_than_tested"].items())
    ctx.note(
        f"{device['name']}, driver {device.get('driver', '-')}; torch {torch.__version__}, "
        f"transformers {versions['transformers']}{f' (older than tested: {old})' if old else ''}; "
        f"bf16 matmul {device['matmul_tflops']} TFLOP/s measured, spec {device['spec_tflops']}"
    )


def code_hash() -> str:
    """sha256 over sftrainer's source files (path and bytes): which code ran, where no .git travels."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "sftrainer").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def older_than_tested(versions: dict[str, str | None]) -> dict[str, str]:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())

    return {
        k: f"{versions[k]} < {v}"
        for k, v in TESTED_WITH.items()
        if versions.get(k) and key(versions[k]) < key(v)
    }


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def matmul_peak(ctx: Ctx) -> float:
    """Median of bf16 n x n x n products on random data after warm-up, TFLOP/s."""
    import torch

    n, reps = (512, 5) if ctx.dry else (8192, 20)
    a = torch.randn(n, n, device=ctx.scale.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.scale.device, dtype=torch.bfloat16)
    sync = (lambda: None) if ctx.dry else torch.cuda.synchronize
    times = []
    for i in range(reps + 3):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def part_bf16_master(ctx: Ctx) -> None:
    """(a) A bf16 checkpoint at lr 2e-5 under bf16 autocast: fp32 master weights that all move."""
    import torch

    from sftrainer import SFTTrainer

    tokenizer = load_tokenizer(ctx)
    path = saved_small_model(ctx, tokenizer, "bf16-checkpoint", torch.bfloat16)
    args = sft_args(ctx, "bf16_master", learning_rate=2e-5)
    trainer = SFTTrainer(
        model=str(path), args=args, train_dataset=small_rows(ctx), processing_class=tokenizer
    )
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen: set[str] = set()
    first_linear = model.model.layers[0].mlp.down_proj
    hook = first_linear.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype).replace("torch.", "")))
    trainer.train()
    hook.remove()
    now = dict(model.named_parameters())
    unmoved = [n for n, old in before.items() if torch.equal(now[n].detach(), old)]
    stuck_norms = [n for n in before if "norm" in n and not (now[n].detach() != before[n]).all()]
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in now.values() if p.requires_grad})
    ctx.numbers |= {
        "trainable_tensors": len(before),
        "unmoved": unmoved,
        "norms_with_unmoved_elements": stuck_norms,
        "trainable_dtypes": dtypes,
        "linear_output_dtypes": sorted(seen),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "device": str(next(model.parameters()).device),
    }
    ctx.note(
        f"{len(before) - len(unmoved)}/{len(before)} trainable tensors moved, every norm element moved: "
        f"{not stuck_norms}; weights {'/'.join(dtypes)}, matmuls in {'/'.join(sorted(seen))}"
    )
    check(not unmoved, f"weights that did not move: {unmoved[:5]}")
    check(not stuck_norms, f"norm weights with elements that did not move: {stuck_norms[:5]}")
    check(dtypes == ["float32"], f"trainable weights are {dtypes}, not float32 master weights")
    check(seen == {"bfloat16"}, f"the MLP's matmul ran in {seen}, not under bf16 autocast")


def attention_backends(ctx: Ctx) -> list[tuple[str, str | None]]:
    """(attn_implementation, why it cannot run here or None)."""
    flash = "kernels-community/flash-attn3"
    cuda_only = "needs a CUDA GPU" if ctx.dry else None
    return [
        ("sdpa", None),
        (
            "flash_attention_2",
            cuda_only or (None if importlib.util.find_spec("flash_attn") else "flash_attn is not installed"),
        ),
        (
            flash,
            cuda_only
            or (None if importlib.util.find_spec("kernels") else "the kernels package is not installed"),
        ),
    ]


def part_packing(ctx: Ctx) -> None:
    """(b) Per attention backend: sftrainer's isolation probe on packed rows, and the per-token losses of a
    packed batch (as sftrainer's collator lays it out for the backend) vs each row alone."""
    from sftrainer.isolation import FP32_ALONE, REDUCED_TOLERANCE

    tokenizer = load_tokenizer(ctx)
    results: dict[str, Any] = {}
    ctx.numbers["tolerance"] = {"fp32": FP32_ALONE, "bf16": REDUCED_TOLERANCE}
    ctx.numbers["backends"] = results
    for backend, unavailable in attention_backends(ctx):
        skipped = {"status": "skip", "reason": unavailable}
        results[backend] = skipped if unavailable else packing_backend(ctx, tokenizer, backend)
        ctx.save()
        free()
    parts = []
    for backend, entry in results.items():
        gaps = ", ".join(f"{p} {v['loss_gap']:.1e}" for p, v in entry.items() if isinstance(v, dict))
        parts.append(f"{backend.split('/')[-1]} {entry['status']}" + (f" ({gaps})" if gaps else ""))
    ctx.note("; ".join(parts) + " - largest per-token loss gap packed vs alone, relative")
    failed = [b for b, e in results.items() if e["status"] == "fail"]
    check(not failed, f"packed rows differ from rows alone with {failed}")


def packing_backend(ctx: Ctx, tokenizer: Any, backend: str) -> dict[str, Any]:
    import torch

    from sftrainer import SFTTrainer
    from sftrainer.isolation import FP32_ALONE, REDUCED_TOLERANCE, probe_rows

    try:
        model = small_model(ctx, tokenizer, attn=backend)
    except Exception as error:  # e.g. a kernel that must come from the hub, which is unreachable
        if backend == "sdpa":
            raise
        return {"status": "skip", "reason": f"cannot load: {type(error).__name__}: {error}"[:300]}
    args = sft_args(ctx, f"packing-{backend}", packing=True, max_steps=1)
    rows = small_rows(ctx, 24 if ctx.dry else 64)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))  # a training batch, as the collator lays it out
    collator = trainer.data_collator
    entry: dict[str, Any] = {"layout": "one flat row" if collator.flatten else "padded packed rows"}
    model.eval()  # before train(): afterwards accelerate's autocast wraps the model's forward
    for precision in ("fp32", "bf16") if backend == "sdpa" else ("bf16",):
        with torch.no_grad(), autocast(ctx, precision == "bf16"):
            probe = probe_rows(model, collator, "float32" if precision == "fp32" else "bfloat16")
            gap, tokens = packed_vs_alone(model, batch)
        tolerance = FP32_ALONE if precision == "fp32" else REDUCED_TOLERANCE
        entry[precision] = {
            "probe_neighbour": probe.neighbour,
            "probe_alone": probe.alone,
            "probe_isolated": probe.isolated(),
            "loss_gap": gap,
            "tokens_compared": tokens,
            "ok": probe.isolated() and gap <= tolerance,
        }
    model.train()
    trainer.train()  # one step: sftrainer's own isolation check runs first, on the device, under autocast
    entry["status"] = "pass" if all(v["ok"] for v in entry.values() if isinstance(v, dict)) else "fail"
    return entry


def packed_vs_alone(model: Any, batch: dict[str, Any]) -> tuple[float, int]:
    """Largest |per-token loss packed - the row alone| / max(1, |loss alone|) over the trained tokens of a
    packed batch (rows told apart by position_ids restarting at 0), and how many tokens were compared."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    labels = batch["labels"]
    packed = token_losses(model, inputs, labels)  # [B, T - 1]
    worst, compared = 0.0, 0
    for r in range(labels.shape[0]):
        starts = [*(batch["position_ids"][r] == 0).nonzero().flatten().tolist(), labels.shape[1]]
        for s, e in itertools.pairwise(starts):
            trained = labels[r, s + 1 : e] != -100
            if e - s < 2 or not trained.any():
                continue
            alone = token_losses(
                model, {"input_ids": batch["input_ids"][r : r + 1, s:e]}, labels[r : r + 1, s:e]
            )[0]
            gap = (packed[r, s : e - 1] - alone)[trained].abs() / alone[trained].abs().clamp(min=1)
            worst, compared = max(worst, gap.max().item()), compared + int(trained.sum())
    check(compared > 0, "the packed batch has no trained tokens to compare")
    return worst, compared


def part_chunked_loss(ctx: Ctx) -> None:
    """(c) sftrainer's chunked loss vs the model's own (transformers') loss: value, gradients, peak memory.
    Tolerances: fp32 |d loss| <= 1e-5 * max(1, loss) and |d grad| / |grad| <= 1e-4 (float noise); bf16
    autocast, as tests/test_chunked_loss.py: |d loss| <= 2e-2 + 1e-2 * loss and every gradient's cosine
    with the model's own >= 0.99 (both sides do bf16 matmuls; the chunked one in 16M-logit chunks)."""
    import torch

    from sftrainer.data.collate import PaddedCollator, PositionCollator
    from sftrainer.loss import chunk_positions, plan_loss

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here, whatever the machine's default
    tokenizer = load_tokenizer(ctx)
    model = small_model(ctx, tokenizer)
    features = tokenized(tokenizer, small_rows(ctx, 4 if ctx.dry else 32), ctx.scale.small_length)
    pad = tokenizer.eos_token_id
    results: dict[str, Any] = {}
    ctx.numbers |= {
        "results": results,
        "positions_per_chunk": chunk_positions(plan_loss(model), len(tokenizer)),
        "trained_tokens": sum(label != -100 for f in features for label in f["labels"][1:]),
    }
    for layout, collate in (("padded", PaddedCollator(pad)), ("packed", PositionCollator(pad, flatten=True))):
        batch = {k: v.to(ctx.scale.device) for k, v in collate(features).items()}
        for precision in ("float32", "bfloat16"):
            results[f"{layout}/{precision}"] = chunked_vs_own(ctx, model, batch, precision == "bfloat16")
    worst = {
        p: max(v["loss_gap"] for k, v in results.items() if k.endswith(p)) for p in ("float32", "bfloat16")
    }
    cos = min(v["grad_cosine_min"] for v in results.values())
    peaks = results["padded/bfloat16"]
    memory = ""
    if peaks["peak_gib_chunked"] is not None:
        memory = (
            f"; peak {peaks['peak_gib_chunked']:.2f} vs {peaks['peak_gib_model_loss']:.2f} GiB (padded bf16)"
        )
    ctx.note(
        f"|d loss| fp32 {worst['float32']:.1e}, bf16 {worst['bfloat16']:.1e}; grad cosine >= {cos:.4f}{memory}"
    )
    bad = [k for k, v in results.items() if not v["ok"]]
    check(not bad, f"chunked loss outside its tolerance: {bad}")


def chunked_vs_own(ctx: Ctx, model: Any, batch: dict[str, Any], bf16: bool) -> dict[str, Any]:
    import torch

    from sftrainer.loss import CHUNKED, plan_loss, sft_loss, verify_chunked

    own, own_grads, own_peak = loss_and_grads(ctx, model, bf16, lambda: model(**batch, use_cache=False).loss)
    with autocast(ctx, bf16):
        plan = verify_chunked(model, batch["input_ids"], plan_loss(model))
    check(plan.kind == CHUNKED and plan.verified, f"no verified chunked plan: {plan.describe()}")
    ours = lambda: sft_loss(model, {**batch, "use_cache": False}, plan=plan).loss  # noqa: E731
    loss, grads, peak = loss_and_grads(ctx, model, bf16, ours)
    errors = [((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in own_grads.items()]
    cosine = torch.nn.functional.cosine_similarity
    cosines = [cosine(grads[n].flatten(), g.flatten(), dim=0).item() for n, g in own_grads.items()]
    gap = abs(loss - own)
    if bf16:
        ok = gap <= 2e-2 + 1e-2 * abs(own) and min(cosines) >= 0.99
    else:
        ok = gap <= 1e-5 * max(1.0, abs(own)) and max(errors) <= 1e-4
    return {
        "model_loss": own,
        "chunked_loss": loss,
        "loss_gap": gap,
        "grad_rel_error_max": max(errors),
        "grad_cosine_min": min(cosines),
        "peak_gib_model_loss": own_peak,
        "peak_gib_chunked": peak,
        "ok": ok,
    }


def tokenized(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """Rows as input_ids / labels: the prompt ignored, the completion and EOS trained."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"]).input_ids
        completion = [
            *tokenizer(row["completion"], add_special_tokens=False).input_ids,
            tokenizer.eos_token_id,
        ]
        ids = (prompt + completion)[:max_length]
        out.append({"input_ids": ids, "labels": ([-100] * len(prompt) + completion)[:max_length]})
    return out


def loss_and_grads(
    ctx: Ctx, model: Any, bf16: bool, loss_fn: Callable[[], Any]
) -> tuple[float, dict, float | None]:
    """loss_fn()'s value (its forward under bf16 autocast if ``bf16``), the gradients it gives every
    parameter (fp32 copies) and the peak memory of the forward and backward pass (GiB, on CUDA)."""
    model.zero_grad(set_to_none=True)
    reset_peak(ctx)
    with autocast(ctx, bf16):
        loss = loss_fn()
    loss.backward()
    peak = peak_gib(ctx)
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, peak


def part_qlora(ctx: Ctx) -> None:
    """(d) QLoRA: a 4-bit (nf4) base trains only its LoRA adapter, which is fp32; the base stays packed."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip(f"bitsandbytes is not installed here and not carried ({bitsandbytes_size()})")
    from sftrainer import SFTTrainer

    tokenizer = load_tokenizer(ctx)
    path = saved_small_model(ctx, tokenizer, "qlora-base", torch.bfloat16)
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
    trainer = SFTTrainer(
        model=str(path),
        args=sft_args(ctx, "qlora"),
        train_dataset=small_rows(ctx),
        processing_class=tokenizer,
        quantization_config=quant,
        peft_config=lora_config(8),
    )
    model = trainer.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    now = dict(model.named_parameters())
    moved = [n for n, old in adapters.items() if not torch.equal(now[n].detach(), old)]
    changed = [n for n, old in frozen.items() if not torch.equal(now[n].detach(), old)]
    packed = sorted({type(now[n]).__name__ for n in frozen if n.endswith("base_layer.weight")})
    ctx.numbers |= {
        "adapter_tensors": len(adapters),
        "adapter_tensors_moved": len(moved),
        "non_adapter_trainable": [n for n in adapters if "lora_" not in n],
        "adapter_dtypes": sorted({str(p.dtype) for p in adapters.values()}),
        "frozen_changed": changed,
        "projection_weight_types": packed,
        "device": str(next(model.parameters()).device),
    }
    ctx.note(
        f"{len(moved)}/{len(adapters)} adapter tensors moved, base unchanged: {not changed}, weights {packed}"
    )
    check(adapters and not ctx.numbers["non_adapter_trainable"], "something besides the adapter trains")
    check(len(moved) == len(adapters), "adapter tensors that did not move")
    check(not changed, f"frozen weights changed: {changed[:5]}")
    check(packed == ["Params4bit"], f"projection weights are {packed}, not 4-bit")


def bitsandbytes_size() -> str:
    manifest = WHEELS / "MANIFEST.txt"
    lines = manifest.read_text().splitlines() if manifest.is_file() else []
    size = next((line for line in lines if line.startswith("bitsandbytes")), None)
    return size or "its wheel is too large to carry within the call's 64 MiB"


def part_offload(ctx: Ctx) -> None:
    """(e) activation_offloading=True: trains, and the peak allocated memory is lower than without."""
    from sftrainer.errors import ConfigError

    try:
        sft_args(ctx, "offload-probe", activation_offloading=True)
    except ConfigError as error:
        raise Skip(f"sftrainer refuses it here: {error}") from None
    tokenizer = load_tokenizer(ctx)
    rows = make_rows(64, ctx.scale.words, seed=3)
    runs: dict[str, Any] = {}
    ctx.numbers["runs"] = runs
    for offload in (False, True):
        runs["on" if offload else "off"] = offload_run(ctx, tokenizer, rows, offload)
        free()
    off, on = runs["off"], runs["on"]
    ctx.note(
        f"peak {on['peak_gib']:.2f} GiB with, {off['peak_gib']:.2f} without ({on['peak_gib'] / off['peak_gib']:.2f}x); "
        f"time {on['seconds'] / off['seconds']:.2f}x"
    )
    check(on["peak_gib"] < off["peak_gib"], "activation offloading did not lower the peak allocated memory")


def offload_run(ctx: Ctx, tokenizer: Any, rows: list, offload: bool) -> dict[str, Any]:
    import torch

    from sftrainer import SFTTrainer

    model = qwen2(tokenizer, ctx.scale.offload, torch.float32, ctx.scale.device)
    args = sft_args(
        ctx,
        f"offload-{offload}",
        activation_offloading=offload,
        packing=True,
        max_length=ctx.scale.offload_length,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-5,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    reset_peak(ctx)
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    trainer.train()
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "above_start_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,
        "seconds": time.perf_counter() - start,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }


def part_resume(ctx: Ctx) -> None:
    """(f) Kill (SIGKILL) a checkpointing run after a checkpoint, resume it: the per-step losses, gradient
    norms and final weights equal an uninterrupted run's (to 1e-6, tests/test_checkpoint.py's bound).
    Deterministic kernels (eager attention, torch's deterministic algorithms), so a difference is resume's."""
    import torch

    steps, save_every, kill_after = ctx.scale.resume
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # read when cuBLAS starts: before any CUDA work
    torch.use_deterministic_algorithms(True, warn_only=True)
    tokenizer = load_tokenizer(ctx)
    path, rows = ctx.out("resume-base"), small_rows(ctx, 64)

    def run(out: Path, kill: bool = False, resume: bool = False) -> tuple[dict, list]:
        from transformers import TrainerCallback

        from sftrainer import SFTTrainer

        class Kill(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if kill and state.global_step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

        args = sft_args(
            ctx,
            out.name,
            output_dir=str(out),
            packing=True,
            max_steps=steps,
            save_strategy="steps",
            save_steps=save_every,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            overwrite_output_dir=False,
            model_init_kwargs={"attn_implementation": "eager"},
        )
        trainer = SFTTrainer(
            model=str(path), args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[Kill()]
        )
        trainer.train(resume_from_checkpoint=True if resume else None)
        weights = {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}
        history = [(e["step"], e["loss"], e["grad_norm"]) for e in trainer.state.log_history if "loss" in e]
        del trainer
        free()
        return weights, history

    out = ctx.out("resume-killed")
    # The killed run (and the base model) first, in a forked process: this one has done no torch work yet.
    # Neither a CUDA context nor a CPU thread pool (OpenMP) survives fork.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            saved_small_model(ctx, tokenizer, path.name, torch.float32)
            run(out, kill=True)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    check(
        os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the run was not killed ({status})"
    )
    found = sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))
    expected = f"checkpoint-{kill_after // save_every * save_every}"
    ctx.numbers["checkpoints_after_kill"] = found
    check(found and found[-1] == expected, f"latest checkpoint after the kill: {found}, expected {expected}")
    resumed = run(out, resume=True)
    reference = run(ctx.out("resume-reference"))
    gaps = run_gaps(resumed, reference)
    ctx.numbers |= {"steps": steps, "killed_after_step": kill_after, "resumed_from": expected, "gaps": gaps}
    if max(gaps.values()) > 1e-6:  # tell nondeterminism from a resume bug: a second uninterrupted run
        ctx.numbers["reference_vs_reference"] = run_gaps(run(ctx.out("resume-reference-2")), reference)
    ctx.note(
        f"killed after step {kill_after}, resumed from {expected}: |d loss| {gaps['loss']:.1e}, "
        f"|d grad norm| {gaps['grad_norm']:.1e}, |d weight| {gaps['weight']:.1e} over {steps} steps"
    )
    check(max(gaps.values()) <= 1e-6, f"the resumed run differs from the uninterrupted one: {gaps}")


def run_gaps(a: tuple[dict, list], b: tuple[dict, list]) -> dict[str, float]:
    (weights_a, history_a), (weights_b, history_b) = a, b
    check([s for s, *_ in history_a] == [s for s, *_ in history_b], "the runs logged different steps")
    check(weights_a.keys() == weights_b.keys(), "the runs saved different weights")
    return {
        "loss": max(abs(x[1] - y[1]) for x, y in zip(history_a, history_b)),
        "grad_norm": max(abs(x[2] - y[2]) for x, y in zip(history_a, history_b)),
        "weight": max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a),
    }


def part_speed(ctx: Ctx, side: str, shape: str, method: str, batching: str) -> None:
    """Trained tokens per second, model TFLOP/s and peak allocated memory of one trainer configuration."""
    import torch

    need_trl(side)
    scale, lora, packing = ctx.scale, method == "lora", batching == "packed"
    tokenizer = load_tokenizer(ctx)
    # LoRA: a bf16 base (as released checkpoints load) with fp32 adapters on both sides; full fine-tune:
    # fp32 weights (both trainers keep fp32 master weights then), bf16 autocast.
    model = qwen2(tokenizer, SHAPES[shape], torch.bfloat16 if lora else torch.float32, scale.device)
    counts = param_counts(model)
    config = model.config
    start = time.perf_counter()
    trainer = make_trainer(
        ctx,
        side,
        model,
        tokenizer,
        make_rows(scale.rows, scale.words, seed=1),
        f"speed-{shape}-{method}-{batching}-{side}",
        max_length=scale.max_length,
        packing=packing,
        batch=scale.packed_batch if packing else scale.padded_batch,
        steps=scale.warmup + scale.timed,
        lora=lora,
    )
    prep = time.perf_counter() - start
    records = meter(trainer.data_collator)
    clock = step_clock(not ctx.dry, records)
    trainer.add_callback(clock)
    reset_peak(ctx)
    try:
        trainer.train()
    except Exception as error:
        if side == "trl" and is_oom(error):  # a measurement of TRL, not a failure of this check
            raise Skip(f"TRL ran out of memory: {str(error)[:200]}") from None
        raise
    # Wall time from the end of the last warm-up step to the end of the last: the steps and what runs
    # between them (fetching and collating the next batch, logging).
    timed, seconds = records[scale.warmup : len(clock.times)], clock.ends[-1] - clock.ends[scale.warmup - 1]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    per_token = (4 * counts["matmul"] + 6 * trainable) if lora else 6 * counts["matmul"]
    attention = 12 * config.num_hidden_layers * config.hidden_size
    flops = sum(per_token * r["tokens"] + attention * r["pairs"] for r in timed)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    ctx.numbers |= {
        "trained_tokens_per_s": sum(r["trained"] for r in timed) / seconds,
        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
        "padding_fraction": 1 - sum(r["tokens"] for r in timed) / sum(r["positions"] for r in timed),
        "achieved_tflops": flops / seconds / 1e12,
        "peak_gib": peak_gib(ctx),
        "seconds_timed": seconds,
        "seconds_in_steps": sum(clock.times[scale.warmup :]),
        "steps_timed": len(timed),
        "trained_tokens_per_step": sum(r["trained"] for r in timed) / len(timed),
        "positions_per_step": sum(r["positions"] for r in timed) / len(timed),
        "prep_seconds": prep,
        "final_loss": losses[-1] if losses else None,
        "params": counts | {"trainable": trainable},
        "flops_formula": "(4 N + 6 N_lora) T + 12 L d P" if lora else "6 N T + 12 L d P",
    }
    peak = f", peak {ctx.numbers['peak_gib']:.1f} GiB" if not ctx.dry else ""
    ctx.note(
        f"{ctx.numbers['trained_tokens_per_s']:,.0f} trained tok/s, {ctx.numbers['achieved_tflops']:.3g} TFLOP/s{peak}"
    )


def part_longest(ctx: Ctx, side: str) -> None:
    """The longest row each trainer trains an optimizer step on (LoRA, batch 1), doubling from
    long_start until it runs out of memory, long_cap, or the time left would not cover the next try."""
    need_trl(side)
    scale = ctx.scale
    tokenizer = load_tokenizer(ctx)
    tries: list[dict[str, Any]] = []
    ctx.numbers |= {"tries": tries, "longest": None, "stopped": None}
    length = scale.long_start
    while True:
        if length > scale.long_cap:
            ctx.numbers["stopped"] = f"cap {scale.long_cap} reached"
            break
        left = ctx.deadline - time.time()
        if tries and left < 1.5 * (tries[-1]["setup_s"] + 4 * tries[-1]["step_s"]):
            ctx.numbers["stopped"] = f"time: {left:.0f} s left would not cover {length}"
            break
        entry = longest_try(ctx, side, tokenizer, length)
        free()
        tries.append(entry)
        if entry["fits"]:
            ctx.numbers["longest"] = entry["tokens"]
        ctx.save()
        if not entry["fits"]:
            ctx.numbers["stopped"] = f"out of memory at {length}"
            break
        length *= 2
    ctx.note(f"longest {ctx.numbers['longest']} tokens; stopped: {ctx.numbers['stopped']}")
    check(ctx.numbers["longest"] is not None, f"not even {scale.long_start} tokens fit")


def longest_try(ctx: Ctx, side: str, tokenizer: Any, length: int) -> dict[str, Any]:
    """One optimizer step on one row of ``length`` tokens (max_length truncates a longer one)."""
    import torch

    model = qwen2(
        tokenizer,
        SHAPES[ctx.scale.long_shape],
        torch.bfloat16,
        ctx.scale.device,
        positions=ctx.scale.long_cap,
    )
    rng = random.Random(length)
    row = {"prompt": " ".join(rng.choice(WORDS) for _ in range(32))}
    row["completion"] = " " + " ".join(rng.choice(WORDS) for _ in range(length + 64))
    entry: dict[str, Any] = {"max_length": length}
    start = time.perf_counter()
    try:
        run = dict(max_length=length, packing=False, batch=1, steps=1, lora=True)
        trainer = make_trainer(ctx, side, model, tokenizer, [row, row], f"longest-{side}-{length}", **run)
        records = meter(trainer.data_collator)
        clock = step_clock(not ctx.dry, records)
        trainer.add_callback(clock)
        entry["setup_s"] = time.perf_counter() - start
        reset_peak(ctx)
        trainer.train()
        return entry | {
            "fits": True,
            "step_s": clock.times[0],
            "tokens": records[0]["tokens"],
            "peak_gib": peak_gib(ctx),
        }
    except Exception as error:
        if not is_oom(error):
            raise
        return entry | {"fits": False, "error": f"{type(error).__name__}: {str(error)[:200]}"}


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    run: Callable[..., None]
    cap_s: float  # the most it may take
    min_s: float  # kept back for it while the parts before it run
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def parts(scale: Scale) -> list[Part]:
    """The registry, in running order: correctness, the first shape's speed, the longest sequence, the rest."""
    out = [
        Part("env", part_env, 60, 8),
        Part("bf16_master", part_bf16_master, 60, 8),
        Part("packing", part_packing, 90, 10),
        Part("chunked_loss", part_chunked_loss, 60, 8),
        Part("qlora", part_qlora, 60, 5),
        Part("offload", part_offload, 90, 10),
        Part("resume", part_resume, 120, 12),
    ]
    speed = {
        shape: [
            Part(
                f"speed/{shape}/{method}/{batching}/{side}",
                part_speed,
                90,
                10,
                dict(side=side, shape=shape, method=method, batching=batching),
            )
            for method in scale.methods
            for batching in ("packed", "padded")
            for side in SIDES
        ]
        for shape in scale.shapes
    }
    longest = [Part(f"longest/{side}", part_longest, 150, 30, dict(side=side)) for side in SIDES]
    first, *rest = scale.shapes
    return out + speed[first] + longest + [p for shape in rest for p in speed[shape]]


def part_names(dry: bool) -> list[str]:
    """Every part a run records (the test checks the JSON against it)."""
    return ["install"] + [p.name for p in parts(DRY if dry else GPU)]


# ---- running the parts ---------------------------------------------------------------------------------


def install_wheels(scale: Scale, workdir: Path, deadline: float) -> dict[str, Any]:
    """pip-install bench/gpu_wheels/*.whl (no index, no dependencies) into workdir/site, which then leads
    sys.path here and PYTHONPATH in the parts; check datasets works, else try the fallback datasets. In the
    dry run, pip only checks (--dry-run) that the set installs on the GPU machine's Python 3.12."""
    start = time.time()
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return record(
            "skip", start, reason=f"no wheels in {WHEELS.relative_to(REPO)} (bash bench/gpu_wheels.sh)"
        )
    site = workdir / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(site)]
    if scale.device == "cpu":
        cmd += ["--dry-run", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        cmd += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]
    numbers: dict[str, Any] = {"wheels": [w.name for w in wheels]}
    done = run_command(cmd + [str(w) for w in wheels], deadline)
    if done.returncode != 0:
        return record("fail", start, numbers, f"pip: {done.stdout[-1500:]}")
    if scale.device == "cpu":
        numbers["summary"] = f"{len(wheels)} wheels install on Python 3.12 x86-64 (pip --dry-run)"
        return record("pass", start, numbers)
    sys.path.insert(1, str(site))  # after the repo (main() put it first): the tree that travelled wins
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site), os.environ.get("PYTHONPATH", "")])
    problem = smoke_datasets(deadline)
    fallback = sorted((WHEELS / "fallback").glob("datasets-*.whl"))
    if problem and fallback:
        numbers["datasets_problem"] = problem
        for old in [site / "datasets", *site.glob("datasets-*.dist-info")]:
            shutil.rmtree(old, ignore_errors=True)
        run_command(cmd + [str(w) for w in fallback], deadline)
        problem = smoke_datasets(deadline)
        numbers["datasets_fallback"] = fallback[0].name
    numbers["summary"] = f"{len(wheels)} wheels into {site}" + (
        f", datasets fallback {fallback[0].name}" if "datasets_fallback" in numbers else ""
    )
    return record("fail" if problem else "pass", start, numbers, problem or "")


def smoke_datasets(deadline: float) -> str | None:
    """None if datasets (with the machine's pyarrow, fsspec, ...) maps a row, else what went wrong."""
    code = "import datasets; datasets.Dataset.from_list([{'a': [1, 2]}]).map(lambda r: {'b': len(r['a'])})"
    done = run_command([sys.executable, "-c", code], deadline)
    return None if done.returncode == 0 else done.stdout[-1500:]


def run_command(cmd: list[str], deadline: float) -> subprocess.CompletedProcess:
    timeout = max(5.0, min(120.0, deadline - time.time()))
    try:
        return subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(cmd, 124, f"timed out after {timeout:.0f} s: {error}", None)


def record(status: str, start: float, numbers: dict | None = None, reason: str = "", **extra: Any) -> dict:
    return {
        "status": status,
        "seconds": round(time.time() - start, 1),
        "reason": reason,
        "numbers": numbers or {},
    } | extra


def preload() -> str | None:
    """Import what the parts use, once, before forking; None, or why forking will not do."""
    try:
        import torch

        for module in (
            "transformers",
            "peft",
            "accelerate",
            "datasets",
            "sftrainer.trainer",
            "sftrainer.config",
        ):
            __import__(module)
        from transformers import Qwen2ForCausalLM  # noqa: F401  (the lazy module, loaded once)

        if importlib.util.find_spec("trl") is not None:
            from trl import SFTTrainer  # noqa: F401
    except Exception as error:  # each part then fails with its own import error, in its own log
        return f"importing failed here ({type(error).__name__}: {error})"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "CUDA was initialised while importing"
    # What Python advises before fork(): the parts' garbage collections then skip the inherited objects
    # (all of torch, transformers, trl), rather than walk them and copy their memory pages.
    gc.freeze()
    return None


def launch(part: Part, scale: Scale, workdir: Path, limit: float, spawn: bool) -> dict[str, Any]:
    """Run ``part`` in a process of its own (forked, or a fresh interpreter), killed at ``limit``."""
    slug = part.name.replace("/", "-")
    result, log = workdir / "results" / f"{slug}.json", workdir / "logs" / f"{slug}.log"
    result.unlink(missing_ok=True)
    start = time.time()
    deadline = start + limit
    sys.stdout.flush()
    sys.stderr.flush()
    if spawn:
        with open(log, "wb") as out:
            argv = [
                sys.executable,
                __file__,
                "--child",
                part.name,
                "--workdir",
                str(workdir),
                "--deadline",
                str(deadline),
            ]
            proc = subprocess.Popen(
                argv + (["--dry-run"] if scale is DRY else []), stdout=out, stderr=out, start_new_session=True
            )
        pid = proc.pid
    else:
        pid = os.fork()
        if pid == 0:  # the part's process: its own session, so that it and its children die together
            code = 1
            try:
                os.setsid()
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  (to the end of the process)
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                child(part, Ctx(scale, workdir, deadline, result))
                code = 0
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    code = wait(pid, deadline)
    if spawn:
        proc.returncode = code  # waited for here; Popen need not
    data = json.loads(result.read_text()) if result.is_file() else {}
    status = data.get("status") or "fail"
    reason = data.get("reason", "")
    if code is None:
        status, reason = "timeout", f"killed at its {limit:.0f} s limit" + (f" ({reason})" if reason else "")
    elif status == "running" or not data:
        status, reason = "fail", f"the process ended ({code}) without a result"
    out = record(status, start, data.get("numbers"), reason, limit_s=round(limit))
    if status in ("fail", "timeout"):
        out["log_tail"] = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
    return out


def run_part(part: Part, scale: Scale, workdir: Path, limit: float, spawn: bool) -> dict[str, Any]:
    """``launch``, and a failure of the launching itself recorded as the part's (the run goes on)."""
    start = time.time()
    try:
        return launch(part, scale, workdir, limit, spawn)
    except Exception as error:
        return record("fail", start, reason=f"could not run the part: {type(error).__name__}: {error}")


def wait(pid: int, deadline: float) -> int | None:
    """The process's exit code (negative: killed by that signal), or None if it was killed at ``deadline``."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            with contextlib.suppress(ProcessLookupError):  # the part's group: it and what it started
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.1)


def child(part: Part, ctx: Ctx) -> None:
    """Inside the part's process: run it, write its result."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    status, reason = "pass", ""
    try:
        part.run(ctx, **part.kwargs)
    except Skip as skip:
        status, reason = "skip", str(skip)
    except BaseException as error:
        traceback.print_exc()
        status, reason = "fail", f"{type(error).__name__}: {error}"[:1000]
    ctx.save(status, reason)


def run_all(report: dict[str, Any], args: argparse.Namespace, scale: Scale, workdir: Path) -> None:
    """Install, then every part in turn, into ``report``."""
    deadline = time.time() + args.budget_s
    report["tokenizer"] = prepare_tokenizer(scale.tokenizer, workdir)
    report["parts"]["install"] = install_wheels(scale, workdir, deadline)
    progress("install", report["parts"]["install"])
    spawn = args.spawn
    if not spawn:
        why = preload()
        if why:
            spawn = True
            report["notes"].append(f"parts run in fresh interpreters: {why}")
    registry = parts(scale)
    chosen = [p for p in registry if p.name == "env" or not args.only or p.name.startswith(tuple(args.only))]
    for part in registry:  # every part has its place in the report, in running order
        why = "not run" if part in chosen else f"not selected (--only {' '.join(args.only or [])})"
        report["parts"][part.name] = record("skip", time.time(), reason=why)
    no_gpu = ""
    for i, part in enumerate(chosen):
        left = deadline - time.time()
        if no_gpu or left < part.min_s:
            why = no_gpu or f"budget exhausted ({left:.0f} s left)"
            report["parts"][part.name] = record("skip", time.time(), reason=why)
        else:
            limit = min(part.cap_s, max(left - sum(p.min_s for p in chosen[i + 1 :]), part.min_s))
            report["parts"][part.name] = outcome = run_part(part, scale, workdir, limit, spawn)
            failed = part.name == "env" and outcome["status"] != "pass" and scale is GPU
            if failed and NO_CUDA in outcome["reason"]:
                no_gpu = f"env found no CUDA device (python {sys.argv[0]} --dry-run runs on the CPU)"
            elif failed and not spawn and "cuda" in (outcome["reason"] + outcome.get("log_tail", "")).lower():
                # A forked process that cannot use CUDA: start each part in a fresh interpreter instead.
                spawn = True
                report["notes"].append(f"forked env failed ({outcome['reason'][:200]}); parts respawned")
                report["parts"][part.name] = run_part(part, scale, workdir, limit, spawn)
        progress(part.name, report["parts"][part.name])
    report["spawned"] = spawn


def finish(report: dict[str, Any], scale: Scale, start: float) -> None:
    report["wall_s"] = round(time.time() - start, 1)
    env = report["parts"].get("env", {}).get("numbers", {})
    report["versions"], report["device"] = env.get("versions"), env.get("device")
    try:
        report["targets"] = targets(report, scale)
    except Exception as error:  # the measurements are written all the same
        report["notes"].append(f"targets could not be computed: {type(error).__name__}: {error}")


def progress(name: str, outcome: dict[str, Any]) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {outcome['status']} ({outcome['seconds']} s)", flush=True)


# ---- the summary ---------------------------------------------------------------------------------------


def targets(report: dict[str, Any], scale: Scale) -> list[dict[str, Any]]:
    """MFU into each speed part; the issue's targets (shown, not asserted) from the measurements."""
    device = report.get("device") or {}
    speeds = {
        n: p["numbers"]
        for n, p in report["parts"].items()
        if n.startswith("speed/") and p["status"] == "pass"
    }
    for numbers in speeds.values():
        if device.get("spec_tflops"):
            numbers["mfu_spec"] = numbers["achieved_tflops"] / device["spec_tflops"]
        if device.get("matmul_tflops"):
            numbers["mfu_measured"] = numbers["achieved_tflops"] / device["matmul_tflops"]
    out = []
    for shape in scale.shapes:
        for method in scale.methods:
            ours = speeds.get(f"speed/{shape}/{method}/packed/sftrainer")
            theirs = [
                speeds[k] | {"mode": m}
                for m in ("packed", "padded")
                if (k := f"speed/{shape}/{method}/{m}/trl") in speeds
            ]
            best = max(theirs, key=lambda n: n["trained_tokens_per_s"], default=None)
            what = f"{shape} {method}, max_length {scale.max_length}"
            if ours and best:
                speed = ours["trained_tokens_per_s"] / best["trained_tokens_per_s"]
                out.append(
                    target(f"packed trained tok/s vs TRL's best ({best['mode']}), {what}", speed, 1.5, "x")
                )
                if ours["peak_gib"] and best["peak_gib"]:
                    out.append(
                        target(
                            f"peak memory vs TRL {best['mode']}, {what}",
                            ours["peak_gib"] / best["peak_gib"],
                            0.7,
                            "x",
                            at_most=True,
                        )
                    )
            else:
                out.append(target(f"packed trained tok/s vs TRL's best, {what}", None, 1.5, "x"))
    first = scale.shapes[0]
    full = speeds.get(f"speed/{first}/full/packed/sftrainer", {})
    mfu = full.get("mfu_spec", full.get("mfu_measured"))
    basis = "spec peak" if "mfu_spec" in full else "measured matmul peak"
    out.append(
        target(
            f"MFU, {first} full fine-tune packed (vs {basis})", None if mfu is None else 100 * mfu, 40, "%"
        )
    )
    runs = [report["parts"].get(f"longest/{s}", {}).get("numbers", {}) for s in SIDES]
    longest = [r.get("longest") for r in runs]
    capped = all(str(r.get("stopped", "")).startswith("cap") for r in runs)  # then the ratio says nothing
    ratio = longest[0] / longest[1] if all(longest) and not capped else None
    what = f"longest sequence vs TRL's ({longest[0]} vs {longest[1]} tokens{', both at the cap' if capped else ''})"
    out.append(target(what, ratio, 2, "x"))
    return out


def target(what: str, value: float | None, goal: float, unit: str, at_most: bool = False) -> dict[str, Any]:
    met = None if value is None or DRY_RUN else (value <= goal if at_most else value >= goal)
    return {
        "target": what,
        "value": value,
        "goal": f"{'<=' if at_most else '>='} {goal:g}{unit}",
        "met": met,
        "unit": unit,
    }


def table(report: dict[str, Any]) -> str:
    """The one table: every part (status, seconds, its line) and the targets."""
    rows = [("part", "status", "s", "result")]
    group = {"speed": 1, "longest": 2}  # the table groups what the run interleaves
    for name, p in sorted(report["parts"].items(), key=lambda item: group.get(item[0].split("/")[0], 0)):
        line = p["numbers"].get("summary") or ""
        if p["status"] != "pass" and p["reason"]:
            line = p["reason"] + (f" | {line}" if line else "")
        if name.startswith("speed/") and "mfu_spec" in p["numbers"]:
            line += f", MFU {100 * p['numbers']['mfu_spec']:.1f}%"
        rows.append((name, p["status"], f"{p['seconds']:.0f}", line.replace("\n", " ")[:150]))
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        rows.append(("target", met, "", f"{t['target']}: {value} (goal {t['goal']})"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    device = report.get("device") or {}
    head = f"gpu_check ({report['mode']}) on {device.get('name', '?')}: {report['wall_s']} s of {report['budget_s']} s"
    notes = [f"note: {n}" for n in report["notes"]]
    if "crash" in report:
        notes.append("CRASHED: " + report["crash"].strip().splitlines()[-1])
    return "\n".join([head, *notes, lines[0], "-" * len(lines[0]), *lines[1:]])


def write_outputs(report: dict[str, Any], path: Path, workdir: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    log = path.with_suffix(".log")
    with open(log, "w") as out:
        for name in report["parts"]:
            part_log = workdir / "logs" / f"{name.replace('/', '-')}.log"
            if part_log.is_file():
                out.write(f"===== {name} =====\n{part_log.read_text(errors='replace')[-20000:]}\n")
    return log


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="on the CPU, tiny models: checks the script itself"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="whole run, seconds (GPU 480, dry run 300)"
    )
    parser.add_argument("--out", default=None, help="the JSON ($OUT/gpu-check.json wins where $OUT is set)")
    parser.add_argument(
        "--workdir", default=None, help="models, runs and logs (default: a new temporary folder)"
    )
    parser.add_argument("--spawn", action="store_true", help="a fresh interpreter per part instead of fork")
    parser.add_argument(
        "--only", nargs="+", metavar="PREFIX", help="run only these parts (and env), e.g. speed/1.5B"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = DRY if args.dry_run else GPU
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    if args.child:  # a spawned part (--spawn)
        part = next(p for p in parts(scale) if p.name == args.child)
        slug = part.name.replace("/", "-")
        child(part, Ctx(scale, workdir, args.deadline, workdir / "results" / f"{slug}.json"))
        return
    for sub in ("results", "logs", "runs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    args.budget_s = args.budget_s or scale.budget_s
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(workdir / "hf"),
        SFTRAINER_HOME=str(workdir / "sftrainer-home"),
        PYTORCH_NVML_BASED_CUDA_CHECK="1",  # torch.cuda.is_available() without a CUDA context: forks stay usable
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    sys.path.insert(0, str(REPO))  # the tree that travelled, ahead of any installed sftrainer
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    start = time.time()
    report: dict[str, Any] = {
        "schema": 1,
        "script": "bench/gpu_check.py",
        "mode": scale.name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": args.budget_s,
        "workdir": str(workdir),
        "parts": {},
        "targets": [],
        "notes": [],
    }
    try:
        run_all(report, args, scale, workdir)
    except BaseException:  # a bug here: what was measured is written all the same
        report["crash"] = traceback.format_exc()
        print(report["crash"], file=sys.stderr)
    finish(report, scale, start)
    out = (
        Path(os.environ["OUT"]) / "gpu-check.json"
        if os.environ.get("OUT")
        else Path(args.out or default_out(args))
    )
    log = write_outputs(report, out, workdir)
    print(f"\nJSON: {out}  logs: {log}\n")
    print(table(report), flush=True)
    bad = [n for n, p in report["parts"].items() if p["status"] in ("fail", "timeout")]
    sys.exit(1 if bad or "crash" in report else 0)


def default_out(args: argparse.Namespace) -> Path:
    return REPO / "bench" / ("gpu-check-dry-run.json" if args.dry_run else "gpu-check.json")


if __name__ == "__main__":
    main()
