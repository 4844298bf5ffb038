"""Tiny Hugging Face and timm model folders, a WordPiece tokenizer and small text tables, all built offline."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

SENTENCES = ["the movie was great", "a terrible boring film", "i loved the acting", "worst plot ever",
             "what a wonderful day", "the food was awful", "great fun for everyone", "not good at all",
             "a fine and moving story", "the ending was bad", "simply the best", "a waste of time"]
SENTIMENT = ["pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg"]


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def wordpiece_tokenizer():
    """A BERT-style fast tokenizer whose WordPiece vocabulary is trained on :data:`SENTENCES`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    transformers = _quiet_transformers()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(
        vocab_size=80, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def bert_folder(path: Path, num_labels: int = 2, labels: list[str] | None = None, seed: int = 0,
                max_shard_size: str | None = None) -> Path:
    """A tiny BertForSequenceClassification and its tokenizer, saved with save_pretrained."""
    transformers = _quiet_transformers()
    tokenizer = wordpiece_tokenizer()
    names = labels or [f"LABEL_{i}" for i in range(num_labels)]
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def vit_folder(path: Path, num_labels: int = 3, image_size: int = 32, seed: int = 0,
               max_shard_size: str | None = None) -> Path:
    """A tiny ViTForImageClassification, saved with save_pretrained."""
    transformers = _quiet_transformers()
    config = transformers.ViTConfig(image_size=image_size, patch_size=8, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    num_labels=num_labels)
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return path


def timm_folder(path: Path, name: str = "resnet18", num_classes: int = 4, **model_args) -> Path:
    """A timm hub folder (config.json with architecture, num_classes, model_args; model.safetensors)."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args).eval()
    path.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(path), model_config={"num_classes": num_classes}, model_args=model_args or None,
                safe_serialization=True)
    return path


def reviews_csv(path: Path, delimiter: str = ",", repeat: int = 4, label_column: str = "label",
                text_column: str = "text") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow([text_column, label_column])
        for text, label in zip(SENTENCES * repeat, SENTIMENT * repeat):
            writer.writerow([text, label])
    return path


def reviews_dataset(path: Path, repeat: int = 4) -> Path:
    """A DatasetDict (train, validation) with a ClassLabel, written by save_to_disk."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    labels = [int(s == "pos") for s in SENTIMENT * repeat]
    train = datasets.Dataset.from_dict({"text": SENTENCES * repeat, "label": labels}, features=features)
    datasets.DatasetDict({"train": train, "validation": train.select(range(12))}).save_to_disk(str(path))
    return path
