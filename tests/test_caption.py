"""Caption stage: template captions from attributes; tiny random BLIP, Florence-2 and Qwen2.5-VL models
run from local folders (built from their configs, nothing downloaded)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from datakit import schema
from datakit.engine.steps import decide
from portrait.decode import load_rgb
from datakit.stages.caption import (
    CHAT_PROMPT, CaptionSettings, CaptionStage, caption_problem, first_names, shrunk, template_caption,
)  # fmt: skip

TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]",
    "a", "photo", "of", "woman", "man", "person", "smiling", "in", "the", "portrait", "close", "up",
]  # fmt: skip


def rows(n, status=None, **columns) -> pa.Table:
    data = {
        "image_id": [f"id{i}" for i in range(n)],
        "status": status or [schema.KEPT] * n,
        "drop_stage": [None] * n,
        "reason": [None] * n,
        "detail": [None] * n,
    }
    data.update(columns)
    return pa.table(data)


def test_template_captions_say_what_the_attributes_say():
    table = rows(
        7,
        gender=["female", "male", None, "female", "male", None, "female"],
        age=[34.0, None, None, 8.0, 15.5, 71.0, 19.0],
        face_area_fraction=[0.12, 0.45, None, 0.3, 0.1, 0.2, 0.05],
    )
    stage = CaptionStage(CaptionSettings(), {})
    out = decide(stage, table)
    assert out.column("caption").to_pylist() == [
        "a photo of a woman in her thirties",
        "a close-up portrait photo of a man",
        "a photo of a person",
        "a close-up portrait photo of a girl",
        "a photo of a teenage boy",
        "a photo of a person in their seventies",
        "a photo of a young woman",
    ]
    assert set(out.column("caption_source").to_pylist()) == {"template"}
    assert decide(stage, table).equals(out)  # deterministic


def test_template_threshold_and_missing_columns():
    assert template_caption("male", 45.0, 0.2, closeup=0.15) == "a close-up portrait photo of a man in his forties"
    assert template_caption("male", 45.0, 0.2, closeup=0.3) == "a photo of a man in his forties"
    assert template_caption("female", 123.0, None, closeup=0.3) == "a photo of a woman in her nineties"
    # a table with no attribute columns at all (attributes stage not in the recipe)
    out = decide(CaptionStage(CaptionSettings(), {}), rows(2))
    assert out.column("caption").to_pylist() == ["a photo of a person"] * 2


def test_dropped_rows_keep_no_caption():
    table = rows(2, status=[schema.DROPPED, schema.KEPT], gender=["male", "male"])
    out = decide(CaptionStage(CaptionSettings(), {}), table).to_pylist()
    assert out[0]["caption"] is None and out[0]["caption_source"] is None and out[0]["status"] == schema.DROPPED
    assert out[1]["caption"] == "a photo of a man"


# ---------------------------------------------------------------- vlm


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A randomly initialised BLIP captioner (2 layers of width 32) with a BERT tokenizer built
    from a tiny vocabulary file, saved with save_pretrained: the real loading and generation code
    runs, offline, in about a second."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder = tmp_path_factory.mktemp("vlm")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(TINY_VOCAB) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    ids = {t: TINY_VOCAB.index(t) for t in ("[PAD]", "[SEP]", "[DEC]")}
    text = dict(
        vocab_size=len(TINY_VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
        pad_token_id=ids["[PAD]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"], bos_token_id=ids["[DEC]"],
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    path = folder / "tiny-blip"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def demo_photos(demo_dir, n):
    files = sorted((demo_dir / "folder").glob("*/*.jpg"))[:n]
    return [p.read_bytes() for p in files]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_vlm_captions_a_batch_of_photos(tiny_blip, demo_dir, dtype):
    import torch

    data = demo_photos(demo_dir, 5)
    status = [schema.KEPT, schema.KEPT, schema.DROPPED, schema.KEPT, schema.KEPT]
    table = rows(5, status=status, image_bytes=data)
    settings = CaptionSettings(mode="vlm", model_path=str(tiny_blip), device="cpu", dtype=dtype, batch_size=2, max_new_tokens=6)
    stage = CaptionStage(settings, {})
    stage.setup()
    assert stage.captioner.model.dtype == getattr(torch, dtype)
    calls = []
    real_caption = stage.captioner.caption
    stage.captioner.caption = lambda images: calls.append(len(images)) or real_caption(images)
    out = decide(stage, table).to_pylist()

    assert calls == [2, 2]  # 4 live rows in batches of 2; the dropped row is not captioned
    for row, st in zip(out, status):
        if st == schema.KEPT:
            assert isinstance(row["caption"], str) and row["caption"]
            assert set(row["caption"].split()) <= set(TINY_VOCAB)
            assert row["caption_source"] == "vlm:tiny-blip"
        else:
            assert row["caption"] is None and row["caption_source"] is None
    stage.captioner.caption = real_caption
    assert decide(stage, table).to_pylist() == out  # greedy decoding: same weights, same captions


def test_vlm_prompt_starts_the_caption(tiny_blip, demo_dir):
    settings = CaptionSettings(mode="vlm", model_path=str(tiny_blip), device="auto", prompt="a photo of", max_new_tokens=4)
    stage = CaptionStage(settings, {})
    out = decide(stage, rows(2, image_bytes=demo_photos(demo_dir, 2)))
    for caption in out.column("caption").to_pylist():
        assert caption.startswith("a photo of")


def test_vlm_relative_model_path_is_taken_from_the_recipe_folder(tiny_blip):
    settings = CaptionSettings(mode="vlm", model_path="tiny-blip", device="cpu")
    stage = CaptionStage(settings, {"recipe_dir": str(tiny_blip.parent)})
    stage.setup()
    assert stage.captioner.name == "tiny-blip"
    info = CaptionStage.provenance(settings, {"recipe_dir": str(tiny_blip.parent)})
    assert info["mode"] == "vlm" and len(info["files_sha256"]["model.safetensors"]) == 64


def test_missing_model_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    stage = CaptionStage(CaptionSettings(mode="vlm", model_path=str(missing)), {})
    with pytest.raises(FileNotFoundError, match=r"caption\.model_path") as error:
        stage.setup()
    assert str(missing) in str(error.value)


def test_vlm_needs_a_model_path():
    with pytest.raises(ValueError, match=r"caption\.model_path is required"):
        CaptionSettings(mode="vlm")
    with pytest.raises(ValueError):
        CaptionSettings(mode="vlm", model_path="x", dtype="float8")


def test_caption_problem_catches_names_and_empty_captions():

    def code(text, label=None):
        problem = caption_problem(text, label, first_names())
        return problem and problem[0]

    assert code("a man in a grey suit, smiling", "Colin_Powell") is None
    assert code("Colin Powell in a grey suit", "Colin_Powell") == "vlm_names_person"
    assert code("a portrait of powell at a desk", "Colin Powell") == "vlm_names_person"
    assert code("  ", "Colin_Powell") == "vlm_empty" and code("", None) == "vlm_empty"
    assert code("a woman with red hair", None) is None
    # somebody else's name: a first name and a capitalised word, or a title and a name
    assert caption_problem("Smiling Tom Hanks at a premiere", "Ann_Lee", first_names()) == (
        "vlm_names_someone", "the model's caption names 'Tom Hanks'")  # fmt: skip
    assert code("a man beside Dr. Smith") == "vlm_names_someone"
    # capitalised ordinary words are no name, title case included
    assert code("Brown hair. The Golden Gate Bridge behind A Young Woman With Long Red Hair in New York") is None
    assert code("Summer light on a man") is None



def test_a_vlm_caption_that_names_the_person_falls_back_to_the_template(tiny_blip, demo_dir):
    settings = CaptionSettings(mode="vlm", model_path=str(tiny_blip), device="cpu", max_new_tokens=6)
    data = demo_photos(demo_dir, 2)
    plain = decide(CaptionStage(settings, {}), rows(2, image_bytes=data)).to_pylist()
    said = next(w for w in plain[0]["caption"].split() if len(w) >= 3)  # a word the model writes for photo 0
    table = rows(2, image_bytes=data, label=[f"{said.title()}_Smith", "Zed_Quux"], gender=["male", None],
                 age=[42.0, None], face_area_fraction=[0.5, 0.2])  # fmt: skip
    out = decide(CaptionStage(settings, {}), table).to_pylist()
    assert out[0]["caption_source"] == "template:fallback:vlm_names_person"
    assert out[0]["caption"] == "a close-up portrait photo of a man in his forties"
    assert (out[1]["caption"], out[1]["caption_source"]) == (plain[1]["caption"], "vlm:tiny-blip")


@pytest.fixture(scope="module")
def tiny_florence2(tmp_path_factory):
    """A random Florence-2 (DaViT vision tower + BART) built from its config, saved with
    save_pretrained: the family people caption with now, run by the same code as a real one."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<image>", *TINY_VOCAB[6:]])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    images = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False)
    images.image_seq_length = 65  # 8x8 patches after two stages + one pooled token
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
                  embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], window_size=4, projection_dim=32,
                  max_temporal_embeddings=4, max_position_embeddings=16)  # fmt: skip
    text = dict(vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text, image_token_id=4))
    path = tmp_path_factory.mktemp("models") / "tiny-florence2"
    model.save_pretrained(path)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_florence2_captions_in_batches_and_an_empty_caption_falls_back(tiny_florence2, demo_dir):
    settings = CaptionSettings(mode="vlm", model_path=str(tiny_florence2), device="cpu", batch_size=2, max_new_tokens=5)
    stage = CaptionStage(settings, {})
    stage.setup()
    assert stage.captioner.prompt == "<MORE_DETAILED_CAPTION>"
    calls = []
    real = stage.captioner.caption
    stage.captioner.caption = lambda images: calls.append(len(images)) or [t if i else "" for i, t in enumerate(real(images))]
    table = rows(3, image_bytes=demo_photos(demo_dir, 3), label=["Ann_Lee", "Bo_Chan", "Cy_Dee"],
                 gender=["female", "male", None], age=[33.0, None, None], face_area_fraction=[0.2, 0.2, 0.2])  # fmt: skip
    out = decide(stage, table).to_pylist()
    assert calls == [2, 1]
    # the first of each batch came back empty: the template stands in and says why
    assert (out[0]["caption"], out[0]["caption_source"]) == ("a photo of a woman in her thirties", "template:fallback:vlm_empty")
    assert out[2]["caption_source"] == "template:fallback:vlm_empty"
    for row in (out[1],):
        if row["caption_source"] == "vlm:tiny-florence2":
            assert row["caption"] and set(row["caption"].split()) <= set(TINY_VOCAB)
        else:  # a random model may well say nothing at all
            assert row["caption_source"] == "template:fallback:vlm_empty"


@pytest.fixture(scope="module")
def tiny_qwen25vl(tmp_path_factory):
    """A random Qwen2.5-VL (1 vision block, 1 text layer of width 32) with a word-level tokenizer
    that has Qwen's special tokens and a chat template, saved with save_pretrained as a Qwen
    folder is. Its image processor makes 4 image tokens of a 150 px photo, 8 of a 100x60 one."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from datakit.stages.caption import still_image_processor

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    vocab = {t: i for i, t in enumerate([*special, "<unk>", "user", "assistant", *TINY_VOCAB[6:], "Tom"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", additional_special_tokens=special)  # fmt: skip
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 112, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = still_image_processor("qwen2_5_vl")(image_processor=images, tokenizer=tokenizer, chat_template=template)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                initializer_range=0.5)  # wide weights: the captions differ from photo to photo  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=32, fullatt_block_indexes=[0], initializer_range=0.5)  # fmt: skip
    ids = {k: vocab[f"<|{k}|>"] for k in ("image_pad", "video_pad", "vision_start", "vision_end")}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                              vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])  # fmt: skip
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl"
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def jpeg(data: bytes, size) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize(size).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_qwen25vl_captions_a_batch_in_one_left_padded_call(tiny_qwen25vl, demo_dir):
    """A chat model: the written prompt in a chat turn, photos of different sizes (so different
    numbers of image tokens) padded on the left in one generate call, each caption the same as
    the photo's caption alone; a caption naming somebody falls back to the template."""
    settings = CaptionSettings(mode="vlm", model_path=str(tiny_qwen25vl), device="cpu", batch_size=4, max_new_tokens=5)
    stage = CaptionStage(settings, {})
    stage.setup()
    captioner = stage.captioner
    assert captioner.chat and captioner.prompt == CHAT_PROMPT and CHAT_PROMPT in captioner.chat_text()
    photos = demo_photos(demo_dir, 4)
    photos[1] = jpeg(photos[1], (100, 60))  # 8 image tokens where the 150 px photos have 4
    table = rows(4, image_bytes=photos, label=["Ann_Lee", "Bo_Chan", "Cy_Dee", "Di_Eve"],
                 gender=[None, None, "male", None], age=[None, None, 50.0, None], face_area_fraction=[0.2] * 4)  # fmt: skip

    generate_calls, padded = [], []
    real_generate, real_caption = captioner.model.generate, captioner.caption

    def generate(**inputs):
        generate_calls.append(len(inputs["input_ids"]))
        padded.append(inputs["attention_mask"][:, 0].tolist())
        return real_generate(**inputs)

    captioner.model.generate = generate
    batch = decide(stage, table).to_pylist()
    assert generate_calls == [4]
    assert padded == [[0, 1, 0, 0]]  # the longer prompt fills the batch; the others are padded on the left
    captions = [r["caption"] for r in batch]
    # a padded photo and the longest one caption as they do alone (right padding breaks the first)
    assert captions[:2] == [real_caption([load_rgb(p)])[0] for p in photos[:2]] and len(set(captions)) > 1
    assert {r["caption_source"] for r in batch} == {"vlm:tiny-qwen2.5-vl"}
    for caption in captions:  # only the new tokens: not the chat turn ("user ... assistant") before them
        assert caption and set(caption.split()) <= set(TINY_VOCAB) and "assistant" not in caption

    captioner.caption = lambda images: [*real_caption(images)[:2], "Tom Beta smiling in the portrait", ""]
    out = decide(stage, table).to_pylist()
    assert [r["caption"] for r in out[:2]] == captions[:2] and out[0]["caption_detail"] is None
    assert out[2]["caption"] == "a photo of a man in his fifties"
    assert out[2]["caption_source"] == "template:fallback:vlm_names_someone"
    assert out[2]["caption_detail"] == "the model's caption names 'Tom Beta'"
    assert out[3]["caption_source"] == "template:fallback:vlm_empty" and out[3]["caption"] == "a photo of a person"


def test_the_model_sees_images_shrunk_to_max_side():
    from PIL import Image

    assert shrunk(Image.new("RGB", (4000, 3000)), 1024).size == (1024, 768)
    small = Image.new("RGB", (150, 90))
    assert shrunk(small, 1024) is small
