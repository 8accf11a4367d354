"""Tiny random-init vision-language models of real architectures, with their processors, built locally
(no network): LLaVA (CLIP vision tower, Llama text model), Idefics3 / SmolVLM (SigLIP-like vision
model, pixel-shuffle connector, Llama text model) and Gemma 3 (SigLIP vision tower, Gemma 3 text
model). Their image processors are the PIL ones (the default ones need torchvision).

``save_tiny_vlm(family, path)`` writes a directory that ``from_pretrained`` / ``AutoProcessor`` and
``SFTTrainer(model=dir)`` load. The chat templates reproduce the layout of the released ones:
llava-hf/llava-1.5-7b-hf (typed parts only, no end-of-turn token), HuggingFaceTB/SmolVLM-Instruct
(``<end_of_utterance>``) and google/gemma-3-4b-it (the released file, from tests/data/chat_templates).
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import torch

from sftrainer.vision import builtin as builtin_vlm

HERE = Path(__file__).parent
FAMILIES = ("llava", "idefics3", "gemma3")

SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CORPUS = [
    "What is in the picture? A red square on a white background. A blue circle. A green line.",
    "Describe the image. What colour is the shape? Is it round or square? Count the shapes.",
    "USER: ASSISTANT: User: Assistant: system user model You are a helpful assistant.",
    "red green blue yellow black white square circle triangle line dot big small left right top bottom",
    "0 1 2 3 4 5 6 7 8 9 one two three four five shapes colours, of course. The answer is",
]
ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
SPECIALS = {
    "llava": ("<s>", "</s>", "<pad>", "<image>"),
    "idefics3": (
        "<|im_start|>", "<|im_end|>", "<pad>", "<end_of_utterance>", "<fake_token_around_image>",
        "<image>", "<global-img>", *ROW_COL,
    ),
    "gemma3": (
        "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
        "<image_soft_token>",
    ),
}  # fmt: skip
TOKENS = {  # bos, eos, pad
    "llava": ("<s>", "</s>", "<pad>"),
    "idefics3": ("<|im_start|>", "<end_of_utterance>", "<pad>"),
    "gemma3": ("<bos>", "<eos>", "<pad>"),
}
IMAGE_SIZE, PATCH = builtin_vlm.IMAGE_SIZE, builtin_vlm.PATCH  # 4 x 4 patches per image
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH,
)


@functools.cache
def _tokenizer_json(family: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIALS[family]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok.to_str()


def build_tokenizer(family: str) -> Any:
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = TOKENS[family]
    tok = Tokenizer.from_str(_tokenizer_json(family))
    extra: dict[str, str] = {}
    if family in ("llava", "gemma3"):  # BOS before text, as Llama and Gemma tokenizers put it
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    if family == "gemma3":
        extra = {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        }
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in SPECIALS[family] if t not in (bos, eos, pad)],
        extra_special_tokens=extra,
    )


def build_processor(family: str, tokenizer: Any = None) -> Any:
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family)
    if family == "llava":  # the built-in demo's processor, for this tokenizer
        return builtin_vlm.llava_processor(tokenizer)
    if family == "idefics3":
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        # Images are resized to 64 px on their longest edge and split into 32 px tiles, plus the
        # whole image: a 64 x 64 image becomes 2 x 2 tiles + 1, each 4 tokens.
        images = Idefics3ImageProcessorPil(
            do_image_splitting=True,
            size={"longest_edge": 2 * IMAGE_SIZE},
            max_image_size={"longest_edge": IMAGE_SIZE},
        )
        return Idefics3Processor(images, tokenizer, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    if family == "gemma3":
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        template = (HERE / "data" / "chat_templates" / "gemma-3-it.jinja").read_text(encoding="utf-8")
        return Gemma3Processor(images, tokenizer, image_seq_length=4, chat_template=template)
    raise ValueError(family)


def build_config(family: str, tokenizer: Any) -> Any:
    vocab = len(tokenizer)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        return LlavaConfig(
            vision_config=CLIPVisionConfig(**VISION, projection_dim=32),
            text_config=LlamaConfig(**TEXT, vocab_size=vocab, **ids),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
            vision_feature_layer=-1,
            **ids,
        )
    if family == "idefics3":
        from transformers import Idefics3Config, LlamaConfig
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

        return Idefics3Config(
            vision_config=Idefics3VisionConfig(**VISION),
            text_config=LlamaConfig(**TEXT, vocab_size=vocab, **ids),
            scale_factor=2,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            **ids,
        )
    if family == "gemma3":
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

        return Gemma3Config(
            text_config=Gemma3TextConfig(**TEXT, head_dim=16, sliding_window=64, vocab_size=vocab, **ids),
            vision_config=SiglipVisionConfig(**VISION),
            mm_tokens_per_image=4,
            boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
            image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
            **ids,
        )
    raise ValueError(family)


def save_tiny_vlm(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build a random-init ``family`` model and its processor; save both to ``path``."""
    from transformers import AutoModelForImageTextToText

    processor = build_processor(family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(
        build_config(family, processor.tokenizer), dtype=torch.float32
    )
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ---- images ----------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def image(
    colour: str = "red", size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE), shape: str = "square"
) -> Any:
    """A small PIL image: a coloured square or circle on white."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def png_bytes(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
