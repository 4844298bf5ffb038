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
    """A BERT-style fast tokenizer whose WordPiece vocabulary comes from :data:`SENTENCES`.

    The vocabulary is written out, not trained: the special tokens, every word, every character and its
    ``##`` continuation, each in sorted order, so the same ids come out in every process (WordPiece
    training breaks ties differently from run to run, which changed the model built on top of it).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    transformers = _quiet_transformers()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for s in SENTENCES for w in s.split()})
    chars = sorted({c for w in words for c in w})
    vocab = {t: i for i, t in enumerate(special + words + chars + [f"##{c}" for c in chars])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
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
