"""``builtin-vlm``: a tiny LLaVA (CLIP vision tower, projector, Llama language model) with random
weights and its processor, built locally like the built-in text model, so that the vision-language
example (configs/vlm-lora.yaml) runs anywhere on a CPU in seconds. It has never seen an image:
it shows the shape of a run, not a useful model.

``save(directory)`` writes it with ``save_pretrained``; ``sftrainer.builtin`` keeps it in the cache
directory (``$SFTRAINER_HOME``), rebuilt when missing or broken (``FILES``), and it is loaded through
the same code as any checkpoint (``AutoModelForImageTextToText``, ``AutoProcessor``). The image
processor is CLIP's PIL one, which needs no torchvision. Imports nothing from sftrainer: the built-in
models' cache (``sftrainer.builtin``) imports this module, not the other way round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VERSION = "v1"
IMAGE_SIZE, PATCH = 32, 8  # 16 image tokens per image
# The layout of llava-hf/llava-1.5-7b-hf's template: typed content parts (a plain string renders as
# nothing), each image as "<image>\n" before the text, no end-of-turn token (sftrainer trains EOS).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<image>"]
CORPUS = [
    "USER: ASSISTANT: What colour is the shape? What shape is it? Describe the image. Red. Green. Blue.",
    "Yellow. A square. A circle. A red square on a white background. A blue circle on a white background.",
    "Are the two shapes the same colour? Yes, both are red. No: one is green, the other yellow.",
    "red green blue yellow square circle shape colour image picture white background both one other",
]


DIRECTORY = f"builtin-llava-{VERSION}"  # its name in the cache directory
FILES = ("config.json", "tokenizer.json", "processor_config.json", "model.safetensors")  # a whole copy


def save(directory: Path) -> None:
    """Build the model and its processor and save both in ``directory``."""
    processor = build_processor()
    build_model(processor.tokenizer).save_pretrained(directory)
    processor.save_pretrained(directory)


def build_processor() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )  # fmt: skip
    return llava_processor(tokenizer)


def llava_processor(tokenizer: Any) -> Any:
    """A LLaVA-1.5 processor for ``tokenizer``: CLIP's PIL image processor at ``IMAGE_SIZE`` pixels,
    ``PATCH``-pixel patches, and LLaVA-1.5's chat template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        images,
        tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64,
        ),
        text_config=LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=len(tokenizer), **ids,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_layer=-1,
        **ids,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
