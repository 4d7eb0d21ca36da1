"""`kiln predict` with the runtime replaced by the fake backend (the real load() is tested in
tests/runtime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import kiln.runtime
from kiln.bundle import Bundle
from kiln.cli import main

from .conftest import FakeBackend, png


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(bundle: Bundle, backend: str = "auto", precision: str | None = None) -> FakeBackend:
        return FakeBackend(bundle if isinstance(bundle, Bundle) else Bundle.load(bundle), max_batch=2)

    monkeypatch.setattr(kiln.runtime, "load", load)


def test_predict_classify_text_json_and_save(
    classify_bundle: Bundle, tmp_path: Path, fake_runtime: None, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for i, value in enumerate((0, 255, 128)):  # 3 images with max batch 2: two backend calls
        p = tmp_path / f"img{i}.png"
        p.write_bytes(png(value=value))
        paths.append(str(p))
    assert main(["predict", str(classify_bundle.root), *paths, "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split()[0] for line in out] == ["0", "9", "5"]
    assert (
        main(["predict", str(classify_bundle.root), *paths, "--json", "--save", str(tmp_path / "out")]) == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "fake" and len(doc["predictions"]) == 3
    assert len(doc["predictions"][0]["top_k"]) == 3  # kiln.json's top_k
    saved = Image.open(tmp_path / "out" / "img1.png")
    assert saved.size == (252, 252)  # 28 px upscaled 9x so the label is legible


def test_predict_detect_draws_boxes(
    detect_bundle: Bundle, tmp_path: Path, fake_runtime: None, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "scene.png"
    img.write_bytes(png("RGB", (128, 64), (0, 0, 0)))
    assert main(["predict", str(detect_bundle.root), str(img), "--save", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "scene.png: 2 object(s)" in out and "circle" in out and "square" in out
    drawn = Image.open(tmp_path / "out" / "scene.png").convert("RGB")
    assert drawn.getpixel((16 * 2, 30 * 2)) != (0, 0, 0)  # the box outline was drawn (image upscaled 2x)


def test_predict_bad_image_is_one_line(classify_bundle: Bundle, tmp_path: Path, fake_runtime: None,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(classify_bundle.root), str(bad)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"kiln predict: error: {bad}: not an image: the data is not in a format PIL can read"
    )
    assert main(["predict", str(classify_bundle.root), str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ---- folder scale: the streaming pipeline, --out, --resume -------------------------------------------


def _folder(root: Path, values: list[int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, value in enumerate(values):
        (root / f"img{i:03d}.png").write_bytes(png(value=value))
    return root


def test_pipeline_holds_a_bounded_number_of_items_whatever_the_input_size() -> None:
    """10,000 items through 3 threads with a window of 4: never more than 4 started and not yet taken,
    counted from inside the work and the consumer, and every result in input order."""
    import threading

    from kiln.predict import in_order

    lock = threading.Lock()
    state = {"started": 0, "taken": 0, "most": 0}

    def work(i: int) -> int:
        with lock:
            state["started"] += 1
            state["most"] = max(state["most"], state["started"] - state["taken"])
        return i * 2

    got = []
    for value in in_order(range(10_000), work, threads=3, window=4):
        got.append(value)
        state["taken"] += 1
    assert got == [2 * i for i in range(10_000)]
    assert 1 <= state["most"] <= 4


def test_pipeline_takes_inputs_lazily() -> None:
    """A generator of paths is read only as far as the window: a folder's listing is never copied twice."""
    from kiln.predict import in_order

    pulled = []

    def source() -> Any:
        for i in range(1_000_000):
            pulled.append(i)
            yield i

    it = in_order(source(), lambda i: i, threads=2, window=3)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert len(pulled) <= 5 + 3
    it.close()


def test_pipeline_raises_a_work_error_in_order() -> None:
    from kiln.predict import in_order

    def work(i: int) -> int:
        if i == 7:
            raise ValueError("bad 7")
        return i

    got = []
    with pytest.raises(ValueError, match="bad 7"):
        for v in in_order(range(100), work, threads=2, window=4):
            got.append(v)
    assert got == list(range(7))


def test_predict_out_jsonl_one_line_per_image_in_order(classify_bundle: Bundle, tmp_path: Path,
                                                       fake_runtime: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs", [0, 255, 128, 30, 200])
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(out), "--batch", "2",
                 "--threads", "2", "--top-k", "2"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in lines] == [f"img{i:03d}.png" for i in range(5)]
    assert [r["top_k"][0]["label"] for r in lines] == ["0", "9", "5", "1", "7"]
    assert all(len(r["top_k"]) == 2 for r in lines)
    captured = capsys.readouterr()
    assert captured.out == "" and "predicted 5 image(s) in" in captured.err and str(out) in captured.err


def test_predict_out_csv_header_and_rows(classify_bundle: Bundle, tmp_path: Path, fake_runtime: None) -> None:
    import csv

    folder = _folder(tmp_path / "imgs", [0, 255, 128])
    out = tmp_path / "preds.csv"
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(out), "--top-k", "2"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image", "label_1", "score_1", "label_2", "score_2", "error"]
    assert [(Path(r[0]).name, r[1]) for r in rows[1:]] == [
        ("img000.png", "0"),
        ("img001.png", "9"),
        ("img002.png", "5"),
    ]
    assert 0.9 < float(rows[1][2]) <= 1.0 and rows[1][5] == ""


def test_predict_detect_csv_has_a_row_per_box(detect_bundle: Bundle, tmp_path: Path,
                                              fake_runtime: None) -> None:
    import csv

    img = tmp_path / "scene.png"
    img.write_bytes(png("RGB", (128, 64), (0, 0, 0)))
    out = tmp_path / "boxes.csv"
    assert main(["predict", str(detect_bundle.root), str(img), "--out", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image", "label", "score", "x1", "y1", "x2", "y2", "error"]
    assert len(rows) == 3 and {r[1] for r in rows[1:]} == {"circle", "square"}
    assert all(r[0] == str(img) and float(r[5]) > float(r[3]) for r in rows[1:])


def test_predict_unknown_out_suffix_is_one_line(classify_bundle: Bundle, tmp_path: Path, fake_runtime: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs", [0])
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(tmp_path / "p.xlsx")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kiln predict: error: --out {tmp_path / 'p.xlsx'}: unknown format '.xlsx'; use one of .jsonl, "
        ".json, .ndjson, .csv")


def test_predict_batch_over_the_backend_maximum_is_one_line(classify_bundle: Bundle, tmp_path: Path,
                                                            fake_runtime: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs", [0])
    assert main(["predict", str(classify_bundle.root), str(folder), "--batch", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln predict: error: --batch 3 is over the largest batch 2") and "\n" not in err


def test_predict_resume_skips_what_the_file_holds_and_drops_a_cut_line(
        classify_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run left 2 whole lines and half of a third: --resume runs the other 3 images only."""
    calls: list[int] = []

    def load(bundle: Bundle, backend: str = "auto", precision: str | None = None) -> FakeBackend:
        fake = FakeBackend(bundle if isinstance(bundle, Bundle) else Bundle.load(bundle), max_batch=2)
        real = fake._infer
        fake._infer = lambda feeds: calls.append(len(feeds["images"])) or real(feeds)  # type: ignore[method-assign]
        return fake

    monkeypatch.setattr(kiln.runtime, "load", load)
    folder = _folder(tmp_path / "imgs", [0, 255, 128, 30, 200])
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(out)]) == 0
    full = out.read_text().splitlines()
    out.write_text(full[0] + "\n" + full[1] + "\n" + full[2][: len(full[2]) // 2])
    calls.clear()
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(out), "--resume"]) == 0
    assert sum(calls) == 3
    assert out.read_text().splitlines() == full


def test_predict_resume_of_a_csv_appends_without_a_second_header(classify_bundle: Bundle, tmp_path: Path,
                                                                 fake_runtime: None) -> None:
    folder = _folder(tmp_path / "imgs", [0, 255, 128])
    out = tmp_path / "preds.csv"
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(out)]) == 0
    full = out.read_text()
    out.write_text("".join(full.splitlines(keepends=True)[:2]))  # the header and the first image
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(out), "--resume"]) == 0
    assert out.read_text() == full


def test_predict_resume_needs_out(classify_bundle: Bundle, tmp_path: Path, fake_runtime: None,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs", [0])
    assert main(["predict", str(classify_bundle.root), str(folder), "--resume"]) == 2
    assert "--resume continues a run written with --out FILE" in capsys.readouterr().err


def test_predict_bad_image_in_a_folder_stops_with_one_line_after_the_batches_before(
        classify_bundle: Bundle, tmp_path: Path, fake_runtime: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs", [0, 255, 128, 30])
    (folder / "img002.png").write_bytes(b"not an image")
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(out), "--batch", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"kiln predict: error: {folder / 'img002.png'}: not an image: "
                   "the data is not in a format PIL can read")
    assert len(out.read_text().splitlines()) == 2  # the first batch was written: --resume goes on from there


def test_predict_skip_bad_images_records_the_error(classify_bundle: Bundle, tmp_path: Path,
                                                   fake_runtime: None) -> None:
    folder = _folder(tmp_path / "imgs", [0, 255, 128])
    (folder / "img001.png").write_bytes(b"not an image")
    out = tmp_path / "preds.jsonl"
    assert (
        main(["predict", str(classify_bundle.root), str(folder), "--out", str(out), "--skip-bad-images"]) == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [("error" in r, r.get("top_k", [{}])[0].get("label")) for r in lines] == [
        (False, "0"),
        (True, None),
        (False, "5"),
    ]
    assert "not an image" in lines[1]["error"]


def test_predict_json_document_streams_every_prediction(classify_bundle: Bundle, tmp_path: Path,
                                                        fake_runtime: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs", [0, 255, 128])
    assert main(["predict", str(classify_bundle.root), str(folder), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["backend"], doc["task"], len(doc["predictions"])) == ("fake", "classify", 3)


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from kiln.predict import progress_bar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_bar(10, 0, True).disable
    monkeypatch.setattr("sys.stderr", Tty())
    bar = progress_bar(10, 4, True)
    assert not bar.disable
    bar.update(2)
    bar.close()
    text = sys.stderr.getvalue()
    assert "6/10" in text and "img/s" in text
    assert progress_bar(10, 0, False).disable  # --no-progress


def test_ctrl_c_with_out_keeps_what_was_written_and_says_how_to_resume(
        classify_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def load(bundle: Bundle, backend: str = "auto", precision: str | None = None) -> FakeBackend:
        fake = FakeBackend(bundle if isinstance(bundle, Bundle) else Bundle.load(bundle), max_batch=2)
        real = fake._infer

        def infer(feeds: Any) -> Any:
            if fake.calls:
                raise KeyboardInterrupt
            return real(feeds)

        fake._infer = infer  # type: ignore[method-assign]
        return fake

    monkeypatch.setattr(kiln.runtime, "load", load)
    folder = _folder(tmp_path / "imgs", [0, 255, 128, 30, 200])
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(classify_bundle.root), str(folder), "--out", str(out)]) == 130
    assert len(out.read_text().splitlines()) == 2
    assert capsys.readouterr().err.strip() == ("kiln predict: interrupted after 2 image(s), written to "
                                               f"{out}; "
                                               "run the same command with --resume to go on")
