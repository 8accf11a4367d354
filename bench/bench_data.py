"""Data preparation: sftrainer vs TRL's SFTTrainer side by side, each run in its own subprocess.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/bench_data.py prepare              # 100k rows of each format, cold and cached
    .venv/bin/python bench/bench_data.py prepare --rows 20000 # quicker
    .venv/bin/python bench/bench_data.py prepare --num-proc 2 --repeat 3  # same processes, best of 3
    .venv/bin/python bench/bench_data.py prepare --formats multi_turn --trl-masked  # TRL masks turns too
    .venv/bin/python bench/bench_data.py stream               # 100k and 1M rows streamed with packing

``prepare``: load a JSONL file + detect / format + tokenize + labels (+ pack with ``--packing``),
as each trainer does it before training, in three formats:

- ``pair``: prompt/completion strings, trained raw (loss on the completion and EOS) by both.
- ``chat_pair``: one prompt and its answer through the chat template, loss on the answer. sftrainer
  reads ``prompt``/``response`` rows; TRL, which has no such format, gets the same text as
  conversational prompt/completion (``prompt: [user]``, ``completion: [assistant]``).
- ``multi_turn``: ``messages`` with a system prompt and 1-3 user/assistant turns, one file for
  both. sftrainer trains the assistant turns only; TRL 1.16 by default trains every token (it can
  mask assistant turns only for templates with ``{% generation %}`` markers), so it does less work.
  ``--trl-masked`` gives TRL the template with those markers and ``assistant_only_loss=True``: both
  then train the same tokens.

``cold``: a new, empty datasets cache (``HF_DATASETS_CACHE``) and a new process; ``cached``: a second
process on the cache the cold run left. The time is wall-clock from the file path to the prepared
data set (imports and building the trainer excluded for both: TRL's ``_prepare_dataset`` is called on
a trainer built beforehand, sftrainer's ``DataPipeline`` the same way), with ``dataset_num_proc``
unset unless ``--num-proc`` is given: TRL then uses one process, sftrainer one per 10,000 rows up to
the number of CPU cores. ``--repeat N`` runs each cold measurement N times, alternating the trainers,
and the table shows the best.

``stream``: sftrainer reads the file as a stream (``IterableDataset``), tokenizes and packs it on the
fly while a loop draws packed rows; peak RSS of the subprocess at each size (TRL cannot pack a stream).

Both trainers use the same locally built byte-level BPE tokenizer (8,192 tokens, trained on the
generated words) with Qwen2.5-Instruct's chat template (a copy from tests/data/chat_templates).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "tests" / "data" / "chat_templates" / "qwen2.5-instruct.jinja"
FORMATS = ("pair", "chat_pair", "multi_turn")
TRAINERS = ("sftrainer", "trl")
SYLLABLES = [a + b for a in "bcdfghklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ar", "en", "is", "on")]


def _words(n: int, rng: random.Random) -> list[str]:
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


VOCAB = _words(6000, random.Random(1))


def sentence(rng: random.Random, low: int, high: int) -> str:
    """Words of a Zipf-like draw, so frequent words become single tokens as in real text."""
    n = int(rng.triangular(low, high, low + (high - low) / 5))
    words = [VOCAB[min(int(rng.paretovariate(1.1)) - 1, len(VOCAB) - 1)] for _ in range(n)]
    return " ".join(words).capitalize() + "."


def rows_of(fmt: str, trainer: str, n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        if fmt == "multi_turn":
            messages = [{"role": "system", "content": sentence(rng, 5, 30)}]
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": sentence(rng, 5, 80)})
                messages.append({"role": "assistant", "content": sentence(rng, 3, 120)})
            yield {"messages": messages}
            continue
        prompt, answer = sentence(rng, 5, 120), sentence(rng, 3, 120)
        if fmt == "pair":
            yield {"prompt": prompt, "completion": " " + answer}
        elif trainer == "sftrainer":
            yield {"prompt": prompt, "response": answer}
        else:
            yield {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": answer}],
            }


def data_file(workdir: Path, fmt: str, trainer: str, n: int) -> Path:
    # The pair file is the same for both trainers; chat_pair differs only in layout.
    owner = "both" if fmt != "chat_pair" else trainer
    path = workdir / f"{fmt}-{owner}-{n}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            for row in rows_of(fmt, trainer, n):
                fh.write(json.dumps(row) + "\n")
        tmp.rename(path)
    return path


def tokenizer_dir(workdir: Path) -> Path:
    path = workdir / "tokenizer"
    if path.is_dir():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(2)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((sentence(rng, 5, 60) for _ in range(20000)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    fast.chat_template = TEMPLATE.read_text()
    fast.save_pretrained(path)
    return path


def marked_template(template: str) -> str:
    """Qwen2.5's template with ``{% generation %}`` around each plain assistant answer and its
    end-of-turn token (what sftrainer trains), so that TRL's ``assistant_only_loss`` can mask."""
    turn = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    assert turn in template, "the template's plain-turn line changed"
    marked = (
        "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
        "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
        + turn
        + "{%- endif %}"
    )
    return template.replace(turn, marked)


def _peak_rss_mb() -> float:
    from sftrainer.memory_estimate import (
        peak_process_memory,
    )  # VmHWM, not ru_maxrss (the parent's RSS at fork)

    return peak_process_memory() / 2**20


def _tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def run_prepare(trainer_name: str, fmt: str, args: argparse.Namespace) -> dict:
    """One measurement in this process (HF_DATASETS_CACHE was set by the parent)."""
    from datasets import Dataset, load_dataset
    from transformers import AutoTokenizer

    workdir = Path(args.workdir)
    path = data_file(workdir, fmt, trainer_name, args.rows)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(workdir))
    tiny = Dataset.from_list(list(rows_of(fmt, trainer_name, 4, seed=99)))
    common = dict(
        output_dir=str(workdir / "out"),
        max_length=args.max_length,
        packing=args.packing,
        report_to="none",
        use_cpu=True,
        dataset_num_proc=args.num_proc,
    )
    if trainer_name == "trl":
        from trl import SFTConfig, SFTTrainer

        if args.trl_masked and fmt == "multi_turn":  # like for like: TRL masks the assistant turns too
            tokenizer.chat_template = marked_template(tokenizer.chat_template)
            common["assistant_only_loss"] = True
        config = SFTConfig(**common)
        trainer = SFTTrainer(
            model=_tiny_model(tokenizer), args=config, train_dataset=tiny, processing_class=tokenizer
        )
        start = time.perf_counter()
        dataset = load_dataset("json", data_files=str(path), split="train")
        prepared = trainer._prepare_dataset(dataset, tokenizer, config, args.packing, None, "train")
    else:
        from sftrainer import SFTConfig
        from sftrainer.pipeline import DataPipeline

        config = SFTConfig(**common)
        pipeline = DataPipeline(tokenizer, config)
        start = time.perf_counter()
        prepared = pipeline(str(path), "train", args.packing)
    seconds = time.perf_counter() - start
    labels = prepared["labels"]
    trained = sum(sum(1 for t in row[1:] if t != -100) for row in labels)
    return {
        "trainer": trainer_name,
        "format": fmt,
        "rows": args.rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(args.rows / seconds, 1),
        "out_rows": len(prepared),
        "trained_tokens": trained,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "trl_masked": bool(args.trl_masked and trainer_name == "trl" and fmt == "multi_turn"),
    }


def run_stream(rows: int, args: argparse.Namespace) -> dict:
    """Stream a JSONL file through sftrainer's pipeline with packing; draw every packed row."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from sftrainer import SFTConfig
    from sftrainer.pipeline import DataPipeline

    workdir = Path(args.workdir)
    path = data_file(workdir, "pair", "sftrainer", rows)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(workdir))
    config = SFTConfig(
        output_dir=str(workdir / "out"),
        max_length=args.max_length,
        packing=True,
        report_to="none",
        use_cpu=True,
    )
    stream = load_dataset("json", data_files=str(path), split="train", streaming=True)
    start = time.perf_counter()
    prepared = DataPipeline(tokenizer, config)(stream, "train", True)
    sequences = tokens = 0
    rss_at = {}
    for row in prepared:
        sequences += 1
        tokens += len(row["input_ids"])
        if sequences % 5000 == 0:
            rss_at[sequences] = round(_peak_rss_mb(), 1)
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "sequences": sequences,
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_by_sequence": rss_at,
    }


def _child(argv: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"child {argv} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suite", choices=["prepare", "stream"])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--stream-rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="cold runs per trainer and format (best shown)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument(
        "--trl-masked",
        action="store_true",
        help="multi_turn: TRL trains the assistant turns only too (assistant_only_loss, marked template)",
    )
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--workdir", default="/tmp/sftrainer-bench-data")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    if args.child:  # one measurement, printed as the last line of output
        kind, *rest = args.child
        result = run_prepare(rest[0], rest[1], args) if kind == "prepare" else run_stream(int(rest[0]), args)
        print(json.dumps(result))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir(workdir)
    common = [f"--rows={args.rows}", f"--max-length={args.max_length}", f"--workdir={workdir}"]
    common += ["--packing"] * args.packing + ([f"--num-proc={args.num_proc}"] if args.num_proc else [])
    common += ["--trl-masked"] * args.trl_masked
    results = []
    if args.suite == "prepare":
        for fmt in args.formats:
            for trainer in args.trainers:
                data_file(workdir, fmt, trainer, args.rows)  # generated before timing
            # Cold runs alternate between the trainers, each on an empty cache; the cached run reads
            # the last one's. Repeats smooth out a shared machine's changing speed: the table shows
            # the best of them (all are in the JSON).
            for repeat in range(args.repeat):
                for trainer in args.trainers:
                    cache = workdir / f"cache-{trainer}-{fmt}-{args.rows}-{os.getpid()}-{repeat}"
                    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "true"}
                    phases = ("cold", "cached") if repeat == args.repeat - 1 else ("cold",)
                    for phase in phases:
                        result = _child(["prepare", *common, "--child", "prepare", trainer, fmt], env)
                        result.update(phase=phase, repeat=repeat)
                        results.append(result)
                        print(json.dumps(result), flush=True)
        _print_prepare_table(results)
    else:
        for rows in args.stream_rows:
            data_file(workdir, "pair", "sftrainer", rows)
            env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / f"cache-stream-{os.getpid()}")}
            argv = ["stream", f"--max-length={args.max_length}", f"--workdir={workdir}"]
            result = _child([*argv, "--child", "stream", str(rows)], env)
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def _print_prepare_table(results: list[dict]) -> None:
    by: dict[tuple[str, str, str], dict] = {}
    for r in results:  # the best of the repeats
        key = (r["trainer"], r["format"], r["phase"])
        if key not in by or r["rows_per_s"] > by[key]["rows_per_s"]:
            by[key] = r
    print(
        f"\n{'format':<12}{'phase':<8}{'sftrainer rows/s':>18}{'TRL rows/s':>12}{'ratio':>8}{'sftrainer s':>13}"
    )
    for fmt in FORMATS:
        for phase in ("cold", "cached"):
            ours, theirs = by.get(("sftrainer", fmt, phase)), by.get(("trl", fmt, phase))
            if ours is None:
                continue
            ratio = f"{ours['rows_per_s'] / theirs['rows_per_s']:.2f}x" if theirs else "-"
            trl = f"{theirs['rows_per_s']:.0f}" if theirs else "-"
            print(
                f"{fmt:<12}{phase:<8}{ours['rows_per_s']:>18.0f}{trl:>12}{ratio:>8}{ours['seconds']:>13.2f}"
            )


if __name__ == "__main__":
    main()
