"""Tables as --data: CSV, TSV, JSONL, parquet files and datasets folders; text tokenised with the model folder's
tokenizer, image paths and image bytes decoded like an image folder's; columns, labels and splits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ftdoctor.data import DataOptions, load_data
from ftdoctor.errors import FtdoctorError
from hf_helpers import SENTENCES, SENTIMENT, bert_folder, reviews_csv, reviews_dataset

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("m") / "bert", labels=["neg", "pos"])


def _text(data, bert, **kw):
    return load_data(DataOptions(str(data), model_folder=str(bert), batch_size=8, **kw))


def _tokens(bundle):
    batch = next(iter(bundle.loader(batch_size=len(bundle.dataset))))
    return batch


def test_a_csv_of_texts_is_tokenised_with_the_model_folder_s_tokenizer(tmp_path, bert):
    from transformers import AutoTokenizer

    bundle = _text(reviews_csv(tmp_path / "r.csv"), bert)
    assert bundle.kind == "text" and bundle.num_classes == 2 and bundle.num_samples == 48
    inputs, y, idx = _tokens(bundle)
    theirs = AutoTokenizer.from_pretrained(bert)(SENTENCES * 4, padding="longest", return_tensors="pt")
    assert torch.equal(inputs["input_ids"], theirs["input_ids"])
    assert torch.equal(inputs["attention_mask"], theirs["attention_mask"])
    assert y.tolist() == [int(s == "pos") for s in SENTIMENT * 4]      # sorted order: neg=0, pos=1
    assert any("sorted order" in n or "label2id" in n for n in bundle.notes)


def test_string_labels_follow_the_model_s_label2id_else_sorted_order(tmp_path):
    model = bert_folder(tmp_path / "m", labels=["pos", "neg"])             # the model says pos=0
    bundle = load_data(DataOptions(str(reviews_csv(tmp_path / "r.csv")), model_folder=str(model),
                                   class_names=("pos", "neg")))
    assert bundle.labels.tolist()[:2] == [0, 1] and any("label2id: pos=0, neg=1" in n for n in bundle.notes)
    bundle = load_data(DataOptions(str(tmp_path / "r.csv"), model_folder=str(model)))
    assert bundle.labels.tolist()[:2] == [1, 0] and any("sorted order: neg=0, pos=1" in n for n in bundle.notes)


def test_tsv_jsonl_and_parquet_give_the_same_examples_as_the_csv(tmp_path, bert):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    reviews_csv(tmp_path / "r.csv")
    reviews_csv(tmp_path / "r.tsv", delimiter="\t")
    with open(tmp_path / "r.jsonl", "w") as f:
        for text, label in zip(SENTENCES * 4, SENTIMENT * 4):
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    pq.write_table(pa.table({"text": SENTENCES * 4, "label": SENTIMENT * 4}), tmp_path / "r.parquet")
    reference = _tokens(_text(tmp_path / "r.csv", bert))
    for name in ("r.tsv", "r.jsonl", "r.parquet"):
        inputs, y, _ = _tokens(_text(tmp_path / name, bert))
        assert torch.equal(inputs["input_ids"], reference[0]["input_ids"]) and torch.equal(y, reference[1]), name


def test_sentence_pairs_and_named_columns(tmp_path, bert):
    from transformers import AutoTokenizer

    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for a, b, label in zip(SENTENCES, SENTENCES[::-1], range(12)):
            f.write(json.dumps({"premise": a, "hypothesis": b, "gold": label % 3}) + "\n")
    bundle = _text(path, bert, label_column="gold")
    inputs, y, _ = _tokens(bundle)
    theirs = AutoTokenizer.from_pretrained(bert)(SENTENCES, SENTENCES[::-1], padding="longest", return_tensors="pt")
    assert torch.equal(inputs["token_type_ids"], theirs["token_type_ids"]) and bundle.num_classes == 3
    named = _text(path, bert, text_column="hypothesis", label_column="gold")
    assert any("text from hypothesis" in n for n in named.notes)


def test_max_length_truncates_and_says_how_many(tmp_path, bert):
    bundle = _text(reviews_csv(tmp_path / "r.csv"), bert, max_length=4)
    assert _tokens(bundle)[0]["input_ids"].shape[1] == 4
    assert any("truncated to --max-length 4" in n for n in bundle.notes)
    with pytest.raises(FtdoctorError, match="longer than the model takes"):
        _text(tmp_path / "r.csv", bert, max_length=64, model_max_length=32)


def test_a_datasets_folder_picks_its_split_and_keeps_its_class_names(tmp_path, bert):
    pytest.importorskip("datasets")
    folder = reviews_dataset(tmp_path / "ds")
    train = _text(folder, bert)
    assert train.num_samples == 48 and train.num_classes == 2
    validation = _text(folder, bert, split="validation")
    assert validation.num_samples == 12
    with pytest.raises(FtdoctorError, match="no test split"):
        _text(folder, bert, split="test")
    few = _text(folder, bert, max_samples=10)
    assert few.num_samples == 10 and sorted(np.bincount(few.labels.numpy()).tolist()) == [5, 5]


def test_a_csv_of_image_paths_reads_the_images_beside_it(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = ["path,label"]
    pixels = []
    for i in range(6):
        array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(array).save(tmp_path / "img" / f"{i}.png")
        pixels.append(array)
        rows.append(f"img/{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "images.csv").write_text("\n".join(rows) + "\n")
    bundle = load_data(DataOptions(str(tmp_path / "images.csv"), normalize="none"))
    assert bundle.kind == "image" and bundle.image_shape == (3, 8, 8) and bundle.num_classes == 2
    x, y, _ = next(iter(bundle.loader(batch_size=6)))
    assert torch.allclose(x[0], torch.from_numpy(pixels[0]).permute(2, 0, 1).float() / 255)
    assert y.tolist() == [1, 0, 1, 0, 1, 0]        # cat=0, dog=1 (sorted)


def test_an_image_datasets_folder_is_decoded_by_ftdoctor(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    datasets.disable_progress_bars()
    images = [Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)) for i in range(6)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    datasets.Dataset.from_dict({"img": images, "label": [0, 1, 2, 0, 1, 2]}, features=features).save_to_disk(
        str(tmp_path / "ds"))
    bundle = load_data(DataOptions(str(tmp_path / "ds"), normalize="none", subset="first"))
    x, y, _ = next(iter(bundle.loader(batch_size=6)))
    assert bundle.num_classes == 3 and y.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([40.0 * i / 255 for i in range(6)]))


@pytest.mark.parametrize("content, kw, match", [
    ("words,label\nhello,1\n", {}, "no text or image column"),
    ("text,stars\nhello,1\n", {}, "no label column"),
    ("text,label\nhello,1\n", {"label_column": "gold"}, "no such column"),
    ("text,label\nhello,-1\nbye,0\n", {}, "negative"),
    ("text,label\nhello,1\n", {"split": "test"}, "holds one split"),
    ("text,label\nhello,1\n", {"text_column": "a,b,c"}, "names 3 columns"),
])
def test_bad_tables_are_one_line_errors(tmp_path, bert, content, kw, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(FtdoctorError, match=match):
        _text(path, bert, **kw)


def test_text_without_a_tokenizer_says_where_to_get_one(tmp_path):
    with pytest.raises(FtdoctorError, match="needs a tokenizer"):
        load_data(DataOptions(str(reviews_csv(tmp_path / "r.csv"))))
    with pytest.raises(FtdoctorError, match="has none"):
        load_data(DataOptions(str(tmp_path / "r.csv"), tokenizer=str(tmp_path)))


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path, bert):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 0}\n[1, 2]\n')
    with pytest.raises(FtdoctorError, match="line 2"):
        _text(path, bert)


def test_a_tokenizer_that_asks_for_its_own_code_runs_nothing(tmp_path):
    """Loaded from local files without remote code: the library falls back to tokenizer.json (or refuses);
    the folder's Python file never runs."""
    model = bert_folder(tmp_path / "m")
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Tok: pass\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.Tok", "evil.Tok"]}
    config["tokenizer_class"] = "Tok"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        bundle = load_data(DataOptions(str(reviews_csv(tmp_path / "r.csv")), model_folder=str(model)))
        assert bundle.kind == "text"
    except FtdoctorError as exc:
        assert "tokenizer" in exc.cause
    assert not marker.exists()


def test_a_parquet_file_that_decodes_past_the_memory_bound_is_refused(tmp_path, bert, monkeypatch):
    """Dictionary encoding keeps 300 copies of one long text small on disk; the decoded size is counted
    before any row is materialised."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    import ftdoctor.safety

    pq.write_table(pa.table({"text": ["x" * 100_000] * 300, "label": [i % 2 for i in range(300)]}),
                   tmp_path / "bomb.parquet", compression="zstd")
    assert (tmp_path / "bomb.parquet").stat().st_size < 100_000
    monkeypatch.setattr(ftdoctor.safety, "MAX_IN_MEMORY_BYTES", 10 * 2**20)
    with pytest.raises(FtdoctorError, match="decodes to more than"):
        _text(tmp_path / "bomb.parquet", bert)
