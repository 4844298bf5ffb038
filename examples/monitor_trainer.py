"""ftdoctor inside a real ``transformers.Trainer``: a short fine-tune with :class:`FtdoctorCallback`.

    pip install -e '.[hf]' accelerate tensorboard
    python examples/monitor_trainer.py --out monitor-run
    ftdoctor plot monitor-run/run.h5 -o monitor-run/run.html

Everything is built here, offline: a small BERT from its config (random weights: a stand-in for the
pretrained checkpoint you would load with ``from_pretrained``), a WordPiece tokenizer trained on the
example's own sentences, and a two-class sentiment task made of templated sentences. The callback measures
``ftdoctor probe``'s figures at its default schedule (steps 0, 1, 2, then every 50th), hands the scalars to
Trainer's logging (so they reach TensorBoard, W&B or MLflow, whichever ``report_to`` names), warns once in the
log when a finding fires, and writes the per-layer arrays to ``run.h5`` for ``ftdoctor plot``.
"""
from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import torch

POSITIVE = ["great", "wonderful", "moving", "brilliant", "fun", "lovely", "superb", "charming"]
NEGATIVE = ["terrible", "boring", "awful", "dull", "bad", "tedious", "weak", "clumsy"]
SUBJECTS = ["the movie", "the plot", "the acting", "this film", "the ending", "the story", "the cast", "the music"]
TEMPLATES = ["{s} was {w}", "{s} is {w} and {w2}", "i found {s} {w}", "honestly {s} felt {w}", "{w} , just {w2}"]


def sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` templated sentences and their labels (1: positive), balanced and shuffled by ``seed``."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        texts.append(rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), w=rng.choice(words), w2=rng.choice(words)))
        labels.append(label)
    order = list(range(n))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def tokenizer_for(texts: list[str]):
    """A BERT-style fast tokenizer whose WordPiece vocabulary is the words of ``texts``, sorted (no download;
    the same ids in every run, where WordPiece's trainer breaks its ties differently from run to run)."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    return transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("monitor-run"), help="output folder (run.h5, TensorBoard logs)")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import datasets
    import transformers

    from ftdoctor.monitor.hf import FtdoctorCallback

    transformers.utils.logging.set_verbosity_error()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")   # the callback's findings
    texts, labels = sentences(512, args.seed)
    tokenizer = tokenizer_for(texts)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=32,
                                     num_labels=2)
    torch.manual_seed(args.seed)
    model = transformers.BertForSequenceClassification(config)
    data = datasets.Dataset.from_dict({**tokenizer(texts, padding="max_length", max_length=16, truncation=True),
                                       "labels": labels})
    report = ["tensorboard"] if _has("tensorboard") else []
    targs = transformers.TrainingArguments(
        output_dir=str(args.out), per_device_train_batch_size=32, max_steps=args.steps, learning_rate=1e-3,
        warmup_steps=10, logging_steps=50, report_to=report, save_strategy="no", use_cpu=True, seed=args.seed,
        disable_tqdm=True)
    args.out.mkdir(parents=True, exist_ok=True)
    callback = FtdoctorCallback(hdf5=args.out / "run.h5")
    transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=[callback]).train()
    print(f"\nmeasured steps {[m.step for m in callback.monitor.history]}; per-layer arrays in {args.out / 'run.h5'}")
    print(f"draw them:  ftdoctor plot {args.out / 'run.h5'} -o {args.out / 'run.html'}")
    return args.out / "run.h5"


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
