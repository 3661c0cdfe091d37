"""Zero-shot classification and retrieval: exact numbers on a handcrafted model, agreement with
CLIP_benchmark's own functions on a real (tiny, random) open_clip checkpoint, and the data readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from evalkit import COLORS, SHAPES, make_checkpoint, make_snapshot, make_zeroshot_set, write_wds_set

from clipline.components.evaluate.datasets import DatasetError, PairSet, load_eval_dataset, load_snapshot_pairs
from clipline.components.evaluate.retrieval import retrieval_metrics, run_retrieval
from clipline.components.evaluate.zeroshot import (
    build_classifier,
    classification_metrics,
    embed_images,
    make_loader,
    run_zeroshot,
)

# ---------------------------------------------------------------- handcrafted model

C = 6
CLASSNAMES = [f"class{i}" for i in range(C)]
TEMPLATES = ["a {c}", "the {c}"]


def _order_vec(order: list[int]) -> list[float]:
    """A score vector whose ranking of the C classes is ``order`` (best first)."""
    v = [0.0] * C
    for rank, cls in enumerate(order):
        v[cls] = float(C - rank)
    return v


# (true class, predicted ranking best-first)
IMAGES = [
    (0, [0, 1, 2, 3, 4, 5]),  # top-1 hit
    (0, [1, 0, 2, 3, 4, 5]),  # rank 2
    (1, [1, 0, 2, 3, 4, 5]),
    (1, [1, 2, 0, 3, 4, 5]),
    (2, [3, 0, 1, 4, 5, 2]),  # rank 6: misses top-5
    (3, [3, 2, 1, 0, 4, 5]),
    (4, [5, 0, 4, 1, 2, 3]),  # rank 3
    (5, [5, 4, 3, 2, 1, 0]),
    (5, [5, 0, 1, 2, 3, 4]),
    (5, [0, 1, 2, 3, 5, 4]),  # rank 5
]


class Handcrafted(nn.Module):
    """encode_text: prompt i of class c -> e_c +/- a template offset (the offsets cancel in the mean);
    encode_image: image index -> the score vector above (the class matrix is the identity)."""

    def __init__(self):
        super().__init__()
        offset = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.2, -0.1])
        table = []
        for c in range(C):
            e = torch.zeros(C)
            e[c] = 1.0
            o = offset.clone()
            o[c] = 0.0  # orthogonal to the class axis: e+o and e-o have equal norms
            table += [e + o, e - o]  # "a {c}", "the {c}"
        self.text_table = torch.stack(table)
        self.image_table = torch.tensor([_order_vec(o) for _, o in IMAGES])

    def encode_text(self, idx: torch.Tensor) -> torch.Tensor:
        return self.text_table[idx]

    def encode_image(self, idx: torch.Tensor) -> torch.Tensor:
        return self.image_table[idx]


def handcrafted_tokenizer(texts: list[str]) -> torch.Tensor:
    prompts = [t.format(c=c) for c in CLASSNAMES for t in TEMPLATES]
    return torch.tensor([prompts.index(t) for t in texts])


def test_zeroshot_on_handcrafted_model_gives_exact_metrics():
    model = Handcrafted()
    clf = build_classifier(model, handcrafted_tokenizer, CLASSNAMES, TEMPLATES, batch_size=5)
    # the two templates' offsets cancel: each class vector is exactly its axis
    assert torch.allclose(clf, torch.eye(C), atol=1e-6)
    data = [(torch.tensor(i), label) for i, (label, _) in enumerate(IMAGES)]
    feats, targets = embed_images(model, make_loader(data, batch_size=3))
    res = classification_metrics(100.0 * feats @ clf, targets, CLASSNAMES, dataset="hand")
    assert res.acc1 == pytest.approx(6 / 10)
    assert res.acc5 == pytest.approx(9 / 10)
    # per class recall: 1/2, 2/2, 0/1, 1/1, 0/1, 2/3
    assert res.per_class_recall == pytest.approx([0.5, 1.0, 0.0, 1.0, 0.0, 2 / 3])
    assert res.mean_per_class_recall == pytest.approx((0.5 + 1 + 0 + 1 + 0 + 2 / 3) / 6)
    assert res.confusion[2][3] == 1 and res.confusion[5][0] == 1 and sum(map(sum, res.confusion)) == 10
    assert [w[0] for w in res.worst_classes(2)] == ["class2", "class4"]
    m = res.metrics("zeroshot/hand")
    assert set(m) == {"zeroshot/hand/acc1", "zeroshot/hand/acc5", "zeroshot/hand/mean_per_class_recall"}


def test_acc5_is_absent_below_five_classes():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    res = classification_metrics(logits, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    assert res.acc1 == pytest.approx(2 / 3)
    assert res.acc5 is None and "x/acc5" not in res.metrics("x")
    assert res.per_class_recall == [1.0, 1.0, 0.0]


def test_retrieval_recall_on_known_embeddings():
    # 4 images on the axes; text t is close to image perm[t]'s axis
    images = torch.eye(4)
    texts = torch.nn.functional.normalize(
        torch.tensor(
            [
                [1.0, 0.5, 0.0, 0.0],  # best image 0 (own): hit @1
                [0.0, 0.4, 1.0, 0.0],  # own image 1 ranked 2nd
                [0.0, 0.0, 0.2, 0.1],  # own image 2 first
                [1.0, 0.6, 0.0, 0.3],  # own image 3 ranked 3rd
            ]
        ),
        dim=-1,
    )
    res = retrieval_metrics(images, texts, [0, 1, 2, 3], ks=(1, 2, 5))
    assert res.text_to_image == pytest.approx({1: 0.5, 2: 0.75, 5: 1.0})
    # image -> text: image 0's best text is text 0 or 3 (cos 0.89 vs 0.82): 0; image 1: text 3 (0.5) beats text 1
    # image 2: text 1 (0.93) beats text 2 (0.89); image 3: text 2 (0.45) beats text 3 (0.25)
    assert res.image_to_text[1] == pytest.approx(0.25)
    assert res.metrics("retrieval/val")["retrieval/val/text_to_image_R2"] == pytest.approx(0.75)


# ---------------------------------------------------------------- agreement with CLIP_benchmark


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from clipline.components.model.checkpoint import load_checkpoint

    d = tmp_path_factory.mktemp("tiny")
    return load_checkpoint(make_checkpoint(d / "ckpt", seed=3), "cpu")


def test_zeroshot_agrees_with_clip_benchmark(tiny, tmp_path):
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from sklearn.metrics import balanced_accuracy_score

    classes = [(c, s) for c in list(COLORS)[:4] for s in SHAPES]  # 12 classes
    ds = load_eval_dataset(make_zeroshot_set(tmp_path / "zs", classes, per_class=3))
    ours = run_zeroshot(tiny.model, tiny.tokenizer, tiny.preprocess, ds, batch_size=7)

    ref_clf = zero_shot_classifier(tiny.model, tiny.tokenizer, ds.classnames, ds.templates, "cpu", amp=False)
    our_clf = build_classifier(tiny.model, tiny.tokenizer, ds.classnames, ds.templates, batch_size=7)
    assert torch.allclose(ref_clf, our_clf, atol=1e-5)
    logits, target = run_classification(
        tiny.model, ref_clf, make_loader(ds.torch_dataset(tiny.preprocess), 8), "cpu", amp=False
    )
    # CLIP_benchmark's accuracy() fails under NumPy 2.x; count top-k from its logits as it does
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    ref_acc1 = correct[:1].reshape(-1).float().sum().item() / len(target)
    ref_acc5 = correct[:5].reshape(-1).float().sum().item() / len(target)
    ref_recall = balanced_accuracy_score(target, logits.argmax(axis=1))
    assert ours.n_images == len(target) == 36
    assert ours.acc1 == pytest.approx(ref_acc1, abs=1e-4)
    assert ours.acc5 == pytest.approx(ref_acc5, abs=1e-4)
    assert ours.mean_per_class_recall == pytest.approx(ref_recall, abs=1e-4)


def test_webdataset_sets_read_as_clip_benchmark_reads_them_and_score_the_same(tiny, tmp_path):
    """CLIP_benchmark's wds layout, read by clipline and by CLIP_benchmark's own build_wds_dataset:
    the same class names and templates, and the same top-1, top-5 and mean per-class recall."""
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from sklearn.metrics import balanced_accuracy_score

    from clipline.components.evaluate.datasets import wds_location

    classes = [(c, s) for c in list(COLORS)[:4] for s in SHAPES]  # 12 classes
    src = load_eval_dataset(make_zeroshot_set(tmp_path / "zs", classes, per_class=3, int_labels=True))
    root = write_wds_set(tmp_path / "wds_shapes", src)
    path, name = wds_location("wds/shapes", str(tmp_path / "wds_{dataset}"))
    ds = load_eval_dataset(path, name=name)
    assert (ds.kind, ds.name, len(ds), ds.classnames, ds.templates) == (
        "wds",
        "shapes",
        36,
        src.classnames,
        src.templates,
    )
    ours = run_zeroshot(tiny.model, tiny.tokenizer, tiny.preprocess, ds, batch_size=7)

    ref_ds = build_wds_dataset("wds/shapes", transform=tiny.preprocess, split="test", data_dir=str(root))
    assert ref_ds.classes == ds.classnames and ref_ds.templates == ds.templates
    clf = zero_shot_classifier(tiny.model, tiny.tokenizer, ref_ds.classes, ref_ds.templates, "cpu", amp=False)
    loader = torch.utils.data.DataLoader(ref_ds, batch_size=8, num_workers=0)
    logits, target = run_classification(tiny.model, clf, loader, "cpu", amp=False)
    pred = logits.topk(5, 1, True, True)[1].t()  # accuracy() as CLIP_benchmark counts it (see above)
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    assert ours.n_images == len(target) == 36
    assert ours.acc1 == pytest.approx(correct[:1].reshape(-1).float().sum().item() / len(target), abs=1e-4)
    assert ours.acc5 == pytest.approx(correct[:5].reshape(-1).float().sum().item() / len(target), abs=1e-4)
    assert ours.mean_per_class_recall == pytest.approx(balanced_accuracy_score(target, logits.argmax(axis=1)), abs=1e-4)


def test_webdataset_sets_without_text_files_take_clip_benchmarks_shipped_names_or_say_what_is_missing(tmp_path):
    import json as _json

    import clip_benchmark.datasets as cb

    shipped = _json.loads((Path(cb.__file__).parent / "en_classnames.json").read_text())["mnist"]
    classes = [(c, s) for c in list(COLORS)[:4] for s in SHAPES][:10]  # 10 labels, as mnist has
    src = load_eval_dataset(make_zeroshot_set(tmp_path / "zs", classes, per_class=1, int_labels=True))
    write_wds_set(tmp_path / "wds_mnist", src, shards=1, with_text_files=False)
    ds = load_eval_dataset(tmp_path / "wds_mnist", name="mnist")
    assert ds.classnames == shipped and "clip_benchmark" in ds.templates_source and len(ds) == 10
    write_wds_set(tmp_path / "wds_mine", src, shards=1, with_text_files=False)
    with pytest.raises(DatasetError, match="no classnames.txt"):
        load_eval_dataset(tmp_path / "wds_mine", name="mine")
    (tmp_path / "wds_mine" / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(DatasetError, match="1.tar is missing"):
        load_eval_dataset(tmp_path / "wds_mine", name="mine")
    with pytest.raises(DatasetError, match="--dataset wds/NAME"):
        from clipline.components.evaluate.datasets import wds_location

        wds_location("cifar10", str(tmp_path))


def test_retrieval_agrees_with_clip_benchmark(tiny, tmp_path):
    from clip_benchmark.metrics import zeroshot_retrieval

    from clipline.components.evaluate.retrieval import _collate

    sid = make_snapshot(tmp_path / "snapshots", n_val=24)
    pairs = load_snapshot_pairs(tmp_path / "snapshots", sid, "val")
    assert len(pairs) == 24
    ours = run_retrieval(tiny.model, tiny.tokenizer, tiny.preprocess, pairs, batch_size=10, ks=(1, 5, 10))
    loader = make_loader(pairs.torch_dataset(tiny.preprocess), 10, collate_fn=_collate)
    ref = zeroshot_retrieval.evaluate(tiny.model, loader, tiny.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        assert ours.text_to_image[k] == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=1e-4)
        assert ours.image_to_text[k] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-4)


def _captioned_shapes(n: int) -> tuple[list[bytes], list[list[str]]]:
    from evalkit import draw

    combos = [(c, s) for c in COLORS for s in SHAPES][:n]
    images = [draw(c, s, seed=i) for i, (c, s) in enumerate(combos)]
    captions = [[f"a {c} {s}", f"a picture of a {s} in {c}"][: 1 + i % 2] for i, (c, s) in enumerate(combos)]
    return images, captions


def test_webdataset_retrieval_sets_score_as_clip_benchmark_scores_them(tiny, tmp_path):
    """A CLIP_benchmark retrieval set (wds_flickr30k's layout: captions one per line in <key>.txt,
    one or more per image): recall@k both ways equals CLIP_benchmark's own reader and metric."""
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics import zeroshot_retrieval
    from clip_benchmark.datasets.builder import get_dataset_collate_fn

    from evalkit import write_wds_retrieval_set

    images, captions = _captioned_shapes(20)
    root = write_wds_retrieval_set(tmp_path / "wds_shapes_captions", images, captions)
    pairs = load_eval_dataset(root, name="shapes_captions")
    assert isinstance(pairs, PairSet) and len(pairs) == 20 and sum(map(len, pairs.texts)) == 30
    ours = run_retrieval(tiny.model, tiny.tokenizer, tiny.preprocess, pairs, batch_size=6, ks=(1, 5, 10))
    assert ours.n_texts == 30

    ref_ds = build_wds_dataset("wds/shapes_captions", transform=tiny.preprocess, split="test", data_dir=str(root))
    loader = torch.utils.data.DataLoader(
        ref_ds, batch_size=6, num_workers=0, collate_fn=get_dataset_collate_fn("mscoco_captions")
    )
    ref = zeroshot_retrieval.evaluate(tiny.model, loader, tiny.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        assert ours.text_to_image[k] == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=1e-4)
        assert ours.image_to_text[k] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-4)


def test_webdataset_sets_are_read_from_a_url(tiny, tmp_path):
    """The same sets served over HTTP on loopback (any fsspec URL): the same data as from disk."""
    import functools
    import http.server
    import threading

    from clipline.components.evaluate.datasets import wds_location
    from evalkit import write_wds_retrieval_set

    classes = [(c, s) for c in list(COLORS)[:2] for s in SHAPES]
    src = load_eval_dataset(make_zeroshot_set(tmp_path / "zs", classes, per_class=2, int_labels=True))
    write_wds_set(tmp_path / "web" / "wds_shapes", src)
    images, captions = _captioned_shapes(8)
    write_wds_retrieval_set(tmp_path / "web" / "wds_captions", images, captions, shards=1)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "web"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        path, name = wds_location("wds/shapes", base + "/wds_{dataset}")
        ds = load_eval_dataset(path, name=name)
        assert (ds.name, ds.labels, ds.images, ds.classnames, ds.templates) == (
            "shapes",
            load_eval_dataset(tmp_path / "web" / "wds_shapes").labels,
            load_eval_dataset(tmp_path / "web" / "wds_shapes").images,
            src.classnames,
            src.templates,
        )
        pairs = load_eval_dataset(f"{base}/wds_captions/")
        assert isinstance(pairs, PairSet) and pairs.name == "wds_captions" and pairs.texts == captions
        with pytest.raises(DatasetError, match="not in CLIP_benchmark's webdataset layout"):
            load_eval_dataset(f"{base}/nothing-here")
    finally:
        server.shutdown()


# ---------------------------------------------------------------- datasets


def test_imagefolder_and_parquet_give_the_same_set(tmp_path, tiny):
    classes = [("blue", "square"), ("red", "circle")]  # ImageFolder classes are in sorted folder order
    pq_dir = make_zeroshot_set(tmp_path / "pq", classes, per_class=2, int_labels=True)
    folder = tmp_path / "folder"
    from evalkit import draw

    for ci, (c, s) in enumerate(classes):
        (folder / f"{c}_{s}").mkdir(parents=True)
        for k in range(2):
            (folder / f"{c}_{s}" / f"{k}.png").write_bytes(draw(c, s, seed=ci * 100 + k))
    a = load_eval_dataset(pq_dir)
    b = load_eval_dataset(folder, templates=pq_dir / "templates.json")
    assert a.classnames == b.classnames == ["blue square", "red circle"]
    assert a.labels == b.labels == [0, 0, 1, 1]
    ra = run_zeroshot(tiny.model, tiny.tokenizer, tiny.preprocess, a)
    rb = run_zeroshot(tiny.model, tiny.tokenizer, tiny.preprocess, b)
    assert ra.acc1 == rb.acc1 and ra.confusion == rb.confusion


def _folder_set(root: Path, folder_names: list[str]) -> Path:
    from evalkit import draw

    for ci, name in enumerate(folder_names):
        (root / name).mkdir(parents=True)
        (root / name / "0.png").write_bytes(draw("red", "circle", seed=ci))
    return root


def test_imagefolder_classnames_in_another_order_are_matched_by_name(tmp_path, tiny):
    """Folders named after the classes, a classnames file listing them in another order and
    another spelling: every image is scored against its own folder's class, as CLIP_benchmark does."""
    folder = _folder_set(tmp_path / "set", ["blue_square", "green_triangle", "red_circle"])
    cls_file = tmp_path / "classnames.json"
    cls_file.write_text(json.dumps(["Red Circle", "blue square", "green triangle"]))
    ds = load_eval_dataset(folder, classnames=cls_file)
    assert ds.classnames == ["Red Circle", "blue square", "green triangle"]  # the file's order, kept
    by_image = {Path(img).parent.name: ds.classnames[label] for img, label in zip(ds.images, ds.labels)}
    assert by_image == {"blue_square": "blue square", "green_triangle": "green triangle", "red_circle": "Red Circle"}
    # the same set given in sorted folder order scores the same
    sorted_file = tmp_path / "sorted.json"
    sorted_file.write_text(json.dumps(["blue square", "green triangle", "red circle"]))
    ref = load_eval_dataset(folder, classnames=sorted_file)
    ra = run_zeroshot(tiny.model, tiny.tokenizer, tiny.preprocess, ds)
    rb = run_zeroshot(tiny.model, tiny.tokenizer, tiny.preprocess, ref)
    assert ra.acc1 == rb.acc1 and ra.acc5 == rb.acc5


def test_imagefolder_with_ids_for_folders_reads_classnames_in_folder_order(tmp_path):
    """Folders named by id (ImageNet's WordNet ids) share no name with the classnames file: the
    file is read in sorted folder order, torchvision's and CLIP_benchmark's convention."""
    folder = _folder_set(tmp_path / "set", ["n02", "n01"])
    cls_file = tmp_path / "classnames.json"
    cls_file.write_text(json.dumps(["tench", "goldfish"]))
    ds = load_eval_dataset(folder, classnames=cls_file)
    by_image = {Path(img).parent.name: ds.classnames[label] for img, label in zip(ds.images, ds.labels)}
    assert by_image == {"n01": "tench", "n02": "goldfish"}


def test_imagefolder_and_classnames_that_half_agree_stop_with_the_mismatches(tmp_path):
    folder = _folder_set(tmp_path / "set", ["blue_square", "red_circle", "red_sqaure"])
    cls_file = tmp_path / "classnames.json"
    cls_file.write_text(json.dumps(["red circle", "red square", "blue square"]))
    with pytest.raises(DatasetError, match=r"1 of 3 class folders.*red_sqaure.*'red square'"):
        load_eval_dataset(folder, classnames=cls_file)
    cls_file.write_text(json.dumps(["red circle", "blue square"]))
    with pytest.raises(DatasetError, match="3 class folders but the classnames file lists 2"):
        load_eval_dataset(folder, classnames=cls_file)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_eval_dataset(tmp_path / "nope")
    d = make_zeroshot_set(tmp_path / "zs", [("red", "circle")], per_class=1, int_labels=True)
    (d / "classnames.json").unlink()
    with pytest.raises(DatasetError, match="integer labels but no classnames"):
        load_eval_dataset(d)
    (d / "classnames.json").write_text(json.dumps({"a": ["x"], "b": ["y"]}))
    with pytest.raises(DatasetError, match="none named 'zs'"):
        load_eval_dataset(d)
    bad_tpl = tmp_path / "tpl.json"
    bad_tpl.write_text(json.dumps(["a photo"]))
    (d / "classnames.json").write_text(json.dumps(["red circle"]))
    with pytest.raises(DatasetError, match=r"containing '\{c\}'"):
        load_eval_dataset(d, classnames=None, templates=bad_tpl)
    with pytest.raises(DatasetError, match="no manifest"):
        load_snapshot_pairs(tmp_path, "missing")


def test_unreadable_images_are_recorded_not_fatal(tmp_path, tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evalkit import draw

    pq.write_table(
        pa.table(
            {
                "image": [draw("red", "circle"), b"not an image", draw("blue", "square"), None],
                "label": ["red circle", "red circle", "blue square", "blue square"],
            }
        ),
        tmp_path / "set.parquet",
    )
    ds = load_eval_dataset(tmp_path / "set.parquet")
    assert len(ds) == 2 and ds.labels == [1, 0]  # sorted class names: blue square, red circle
    assert [s[0] for s in ds.skipped] == ["row 1", "row 3"]
    assert "UnidentifiedImageError" in ds.skipped[0][1] and ds.skipped[1][1] == "no image bytes"
    assert run_zeroshot(tiny.model, tiny.tokenizer, tiny.preprocess, ds).n_images == 2


def test_classnames_and_templates_in_clip_benchmark_files_work_as_they_are(tmp_path):
    """CLIP_benchmark's own packaged templates (keyed by dataset, imagenet1k as fallback) load unchanged."""
    import clip_benchmark.datasets as cbd

    tpl_file = Path(cbd.__file__).parent / "en_zeroshot_classification_templates.json"
    d = make_zeroshot_set(tmp_path / "cifar10", [("red", "circle"), ("blue", "square")], per_class=1)
    ds = load_eval_dataset(d / "heldout.parquet", templates=tpl_file, name="cifar10")
    assert ds.templates == json.loads(tpl_file.read_text())["cifar10"]
    ds2 = load_eval_dataset(d / "heldout.parquet", templates=tpl_file, name="mytoyset")
    assert ds2.templates == json.loads(tpl_file.read_text())["imagenet1k"]
