"""Lay the stand-ins out as the Hugging Face caches do, so that ``from_pretrained("org/name")`` and
``load_dataset("org/name", config)`` find them with ``HF_HUB_OFFLINE=1``, through the libraries' own
offline paths (nothing is patched):

- models: ``<hub>/models--org--name/{refs/<revision>, snapshots/<commit>/...}`` (huggingface_hub);
- data sets: ``<datasets>/org___name/<config>/0.0.0/<hash>/`` with Arrow files and
  ``dataset_info.json``, the cache ``datasets`` falls back to when the hub cannot be reached.

``build(root)`` writes everything under ``root`` (``root/hub``, ``root/datasets``) once; a stamp
(a hash of the stand-in code) says whether the cache is current.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import standin_data
import standin_models
import standin_tokenizers

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# A revision of the Qwen2.5 tokenizer that TRL's tests pin (model_init_kwargs={"revision": ...}). The
# hub's template at that revision is 2558 characters long, 51 more than on main; the stand-in's is
# main's template with a 51-character Jinja comment appended (the content differs, the length and
# "not main's" are what the test checks).
PINNED_REVISIONS = {"trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": ("8913f5819566", 2558)}


def stamp() -> str:
    """A hash of everything the stand-ins are built from (code, chat templates)."""
    digest = hashlib.sha256()
    for path in sorted(HERE.glob("standin_*.py")):
        digest.update(path.read_bytes())
    for family in standin_tokenizers.FAMILIES.values():
        digest.update((standin_tokenizers.template_of(family) or "").encode())
    return digest.hexdigest()[:16]


def _commit(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def _place_model(hub: Path, repo_id: str, files: Path, revision: str = "main") -> Path:
    org, name = repo_id.split("/")
    repo = hub / f"models--{org}--{name}"
    commit = _commit(repo_id, revision)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit, encoding="utf-8")
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot, dirs_exist_ok=True)
    return snapshot


def _pinned_template(template: str, length: int) -> str:
    comment_len = length - len(template)
    if comment_len < 4:  # "{#" + "#}"
        raise ValueError(f"cannot make a {length}-character template from a {len(template)}-character one")
    return template + "{#" + "-" * (comment_len - 4) + "#}"


def _write_models(hub: Path, work: Path) -> None:
    corpus = standin_data.corpus()
    for repo in standin_models.REPOS:
        tokenizer = standin_tokenizers.build(standin_tokenizers.FAMILIES[repo.family], corpus)
        files = work / repo.repo_id.replace("/", "--")
        standin_models.save(repo, tokenizer, files)
        _place_model(hub, repo.repo_id, files)
        if repo.repo_id in PINNED_REVISIONS:
            revision, length = PINNED_REVISIONS[repo.repo_id]
            pinned = _pinned_template(tokenizer.chat_template, length)
            snapshot = _place_model(hub, repo.repo_id, files, revision)
            (snapshot / "chat_template.jinja").write_text(pinned, encoding="utf-8")


def _write_datasets(cache: Path, work: Path) -> None:
    from datasets.packaged_modules.arrow.arrow import Arrow

    for (repo_id, config), splits in standin_data.dataset_dicts().items():
        org, name = repo_id.split("/")
        source = work / "data" / name / config
        files = {}
        for split, data in splits.items():
            data.save_to_disk(str(source / split))
            files[split] = sorted(str(p) for p in (source / split).glob("*.arrow"))
        builder = Arrow(
            cache_dir=str(work / "builder"),
            config_name=config,
            data_files=files,
            hash="0" * 16,
            dataset_name=name,
        )
        builder.download_and_prepare()
        target = cache / f"{org}___{name}" / config / "0.0.0" / ("0" * 16)
        shutil.copytree(builder.cache_dir, target)


def build(root: Path) -> dict[str, Any]:
    """Build the stand-in caches under ``root`` unless they are current; returns the environment
    variables that point the libraries at them."""
    env = {
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_DATASETS_CACHE": str(root / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(root / "modules"),
    }
    marker = root / "stamp.json"
    current = stamp()
    if marker.is_file() and json.loads(marker.read_text())["stamp"] == current:
        return env
    logger.info("Building the stand-in models and data sets in %s", root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as work:
        _write_models(root / "hub", Path(work))
        _write_datasets(root / "datasets", Path(work))
    marker.write_text(json.dumps({"stamp": current}), encoding="utf-8")
    return env
