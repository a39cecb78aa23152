"""palp study export / analyze: the paper's protocol, blinding, and Table 3 from known answers."""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest
from test_prepare import _pattern

from palp.cli import main
from palp.steps.study import HEADER_ROW, export

METHODS = ("palp", "ti-db")


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory):
    """Two subjects x one prompt x (palp, ti-db, base): sample sets of three methods."""
    from conftest import EXAMPLE_CAT

    root = tmp_path_factory.mktemp("study")
    toy = root / "toy-photos"
    toy.mkdir()
    for i in range(2):
        _pattern(20 + i).save(toy / f"toy{i}.png")
    assert main(["prepare", "--subject", f"cat={EXAMPLE_CAT}", "--subject", f"toy={toy}", "--class-word", "cat=cat",
                 "--class-word", "toy=toy", "--prompt", "A sketch of [V] in Paris at night", "--pretrained-model", "tiny",
                 "--output", str(root / "prep"), "--quiet"]) == 0
    for task in ("cat-00", "toy-00"):
        for method in METHODS:
            run = root / f"run-{task}-{method}"
            assert main(["train", "--prepared", str(root / "prep"), "--task", task, "--method", method, "--pretrained-model",
                         "tiny", "--steps", "1", "--batch-size", "1", "--lora-rank", "4", "--output", str(run), "--quiet"]) == 0
            out = root / f"samples-{method}"
            assert main(["sample", "--model", str(run), "--output", str(out), "--num-samples", "2", "--steps", "2", "--quiet"]) == 0
            if method == "palp":
                assert main(["sample", "--model", str(run), "--output", str(root / "samples-base"), "--reference",
                             "--num-samples", "2", "--steps", "2", "--quiet"]) == 0
    return root, [str(root / f"samples-{m}") for m in (*METHODS, "base")]


FIXED_SALT = "5a17"  # a known layout for the tests that look at one form; "" draws a secret one, as users get


def _export(study_inputs, out: Path, seed=0, forms=3, salt=FIXED_SALT):
    root, samples = study_inputs
    return export(samples, str(root / "prep"), str(out), forms=forms, seed=seed, image_size=64, salt=salt)


def test_protocol_balance_and_determinism(study_inputs, tmp_path):
    summary = _export(study_inputs, tmp_path / "a")
    key = pd.read_csv(tmp_path / "a" / "key" / "answer_key.csv", keep_default_na=False)
    assert summary["questions"] == len(key) == 2 * 2 * 3  # kinds x subjects x methods (one prompt)
    counts = key.groupby(["subject", "prompt", "method", "kind"]).size()
    assert set(counts) == {1} and len(counts) == 12
    sizes = key.groupby("form").size()
    assert sorted(sizes) == [4, 4, 4] and sizes.max() - sizes.min() <= 1
    same_pick = key.pivot_table(index=["subject", "method"], columns="kind", values="sample", aggfunc="first")
    assert (same_pick["elements"] == same_pick["similarity"]).all()  # both questions show the one picked sample
    for f in (1, 2, 3):
        form = pd.read_csv(tmp_path / "a" / "forms" / f"form-{f}.csv", keep_default_na=False)
        assert list(form["question_id"]) == list(key[key["form"] == f].sort_values("position")["question_id"])
    # The seed and the key's salt give the same layout; the ids are fresh `secrets` tokens on
    # every export (so nothing in the forms un-blinds them), hence the layout is compared, not the bytes.
    salt = json.loads((tmp_path / "a" / "key" / "layout.json").read_text())["salt"]
    _export(study_inputs, tmp_path / "b", salt=salt)
    assert _layout(tmp_path / "a") == _layout(tmp_path / "b")
    # The seed alone (which a participant may guess) does not: a fresh secret salt each time.
    _export(study_inputs, tmp_path / "unsalted", salt="")
    _export(study_inputs, tmp_path / "unsalted-2", salt="")
    assert _layout(tmp_path / "unsalted") != _layout(tmp_path / "unsalted-2")
    assert not list((tmp_path / "a" / "forms").rglob("layout.json"))
    for f in (1, 2, 3):
        shown = [pd.read_csv(tmp_path / d / "forms" / f"form-{f}.csv", keep_default_na=False).drop(columns=ID_COLUMNS)
                 for d in ("a", "b")]
        assert shown[0].equals(shown[1])
    _export(study_inputs, tmp_path / "c", seed=1, salt=salt)
    assert _layout(tmp_path / "a") != _layout(tmp_path / "c")


ID_COLUMNS = ["question_id", "image_id", "image_file", "reference_id", "reference_file"]


def _layout(out: Path) -> list[tuple]:
    """Each form's questions in order, by what they show (not by id)."""
    key = pd.read_csv(out / "key" / "answer_key.csv", keep_default_na=False).sort_values(["form", "position"])
    return list(zip(key["form"], key["subject"], key["prompt"], key["method"], key["kind"], key["run"], key["sample"]))


def _ids(out: Path) -> set[str]:
    key = pd.read_csv(out / "key" / "answer_key.csv", keep_default_na=False)
    return {i for c in ("question_id", "image_id", "reference_id") for i in key[c] if i}


def test_ids_are_secret_tokens_not_replayable_from_the_seed(study_inputs, tmp_path, monkeypatch):
    import copy

    from palp.steps import study

    real_deal, seeded = study.deal_forms, []

    def deal(n, forms, rng):  # the seeded RNG where the old export drew the ids: after picking, before dealing
        seeded.append(copy.deepcopy(rng))
        return real_deal(n, forms, rng)

    monkeypatch.setattr(study, "deal_forms", deal)
    _export(study_inputs, tmp_path / "a")
    _export(study_inputs, tmp_path / "b")
    a, b = _ids(tmp_path / "a"), _ids(tmp_path / "b")
    assert len(a) == len(b) == 12 * 2 + 6 and not a & b  # same seed, unrelated ids
    assert {p.stem for p in (tmp_path / "a/forms/images").iterdir()}.isdisjoint(p.stem for p in (tmp_path / "b/forms/images").iterdir())
    # Replay the seed the old way: hex tokens drawn from that RNG, question by question.
    replayed = {"".join(seeded[0].choice(list("0123456789abcdef"), 12)) for _ in range(3 * 12)}
    assert not {i.removeprefix("Q") for i in a} & replayed


def _png_chunks(data: bytes) -> list[str]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append(kind.decode())
        pos += 12 + length
    return chunks


def test_forms_are_blinded(study_inputs, tmp_path):
    root, samples = study_inputs
    _export(study_inputs, tmp_path / "x")
    forms = tmp_path / "x" / "forms"
    key = pd.read_csv(tmp_path / "x" / "key" / "answer_key.csv", keep_default_na=False)
    # Everything a participant or a survey tool gets: names, CSV text, every part of every workbook.
    texts = [str(p.relative_to(forms)) for p in forms.rglob("*")]
    for p in forms.rglob("*"):
        if p.suffix == ".csv":
            texts.append(p.read_text())
        elif p.suffix == ".xlsx":
            with zipfile.ZipFile(p) as z:
                texts += z.namelist() + [z.read(n).decode("latin-1") for n in z.namelist()]
    blob = "\n".join(texts)
    secrets = {*METHODS, "base", *key["run"], *(str(s) for s in key["seed"]), *(Path(s).name for s in key["source"]),
               *(Path(s).stem for s in key["source"]), *(str(Path(s).parent.parent) for s in samples), "answer_key"}
    for secret in secrets:
        assert not re.search(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", blob), secret
    # Images: one size in bytes, the same chunks, no text or EXIF metadata.
    images = [p.read_bytes() for p in (forms / "images").iterdir()]
    assert len({len(b) for b in images}) == 1
    assert {tuple(_png_chunks(b)) for b in images} == {tuple(_png_chunks(images[0]))}
    assert not {"tEXt", "iTXt", "zTXt", "eXIf", "tIME"} & set(_png_chunks(images[0]))
    with zipfile.ZipFile(forms / "form-1.xlsx") as z:
        media = [z.read(n) for n in z.namelist() if n.startswith("xl/media/")]
    assert media and {len(m) for m in media} == {len(images[0])}
    # Order: across seeds, each method's questions sit on average mid-form (no positional signal).
    positions = {m: [] for m in (*METHODS, "base")}
    for seed in range(20):
        out = tmp_path / f"order-{seed}"
        _export(study_inputs, out, seed=seed)
        k = pd.read_csv(out / "key" / "answer_key.csv", keep_default_na=False)
        sizes = k.groupby("form")["position"].transform("max")
        for m, g in k.assign(rel=(k["position"] - 1) / (sizes - 1)).groupby("method"):
            positions[m] += list(g["rel"])
    means = {m: float(np.mean(v)) for m, v in positions.items()}
    assert max(means.values()) - min(means.values()) < 0.15, means


def test_workbook_cells_validation_and_images(study_inputs, tmp_path):
    _export(study_inputs, tmp_path / "x")
    path = tmp_path / "x" / "forms" / "form-1.xlsx"
    ws = openpyxl.load_workbook(path)["Form"]
    assert ws["A2"].value == "Participant ID"
    header = [c.value for c in ws[HEADER_ROW + 1]]
    assert header[:4] == ["question_id", "image_id", "reference_id", "question"] and header[-1] == "rating"
    sources = {str(v.formula1) for v in ws.data_validations.dataValidation}
    key = pd.read_csv(tmp_path / "x" / "key" / "answer_key.csv", keep_default_na=False)
    kinds = set(key[key["form"] == 1]["kind"])  # the layout is drawn afresh (secret salt): see which kinds form 1 got
    assert sources == {{"elements": '"0,1"', "similarity": '"1,2,3,4,5"'}[k] for k in kinds}
    csv = pd.read_csv(tmp_path / "x" / "forms" / "form-1.csv", keep_default_na=False)
    with zipfile.ZipFile(path) as z:
        media = {z.read(n) for n in z.namelist() if n.startswith("xl/media/")}  # the writer stores identical pictures once
    ids = list(csv["image_id"]) + [i for i in csv["reference_id"] if i]
    assert media == {(tmp_path / "x" / "forms" / "images" / f"{i}.png").read_bytes() for i in ids}


def _fill(key: pd.DataFrame, form: int, participant: str, rule) -> pd.DataFrame:
    """A filled CSV form: answers from ``rule(method, n_elements, participant)``."""
    rows = []
    for _, q in key[key["form"] == form].sort_values("position").iterrows():
        r = {"participant_id": participant, "question_id": q["question_id"]}
        n = len(json.loads(q["elements"]))
        marks, rating = rule(q["method"], n, participant)
        if q["kind"] == "elements":
            r.update({f"present_{k + 1}": marks[k] for k in range(n)})
        else:
            r["rating"] = rating
        rows.append(r)
    return pd.DataFrame(rows)


def _truth(method, n, participant):
    """Known answers: palp sees every element, ti-db half (rounded down), base none."""
    odd = int(participant[-1]) % 2 if participant else 0
    found = {"palp": n, "ti-db": n // 2, "base": 0}[method]
    rating = {"palp": 5 - odd, "ti-db": 3, "base": 1 + odd}[method]
    return [1] * found + [0] * (n - found), rating


def _write_xlsx_response(template: Path, filled: pd.DataFrame, dest: Path) -> None:
    wb = openpyxl.load_workbook(template)
    ws = wb["Form"]
    header = [c.value for c in ws[HEADER_ROW + 1]]
    ws["B2"] = filled["participant_id"].iloc[0]
    by_id = filled.set_index("question_id")
    for row in ws.iter_rows(min_row=HEADER_ROW + 2):
        qid = row[header.index("question_id")].value
        for col, name in enumerate(header):
            if name.startswith("present_") or name == "rating":
                v = by_id.loc[qid].get(name)
                if v is not None and v != "" and not (isinstance(v, float) and np.isnan(v)):
                    row[col].value = int(v)
    wb.save(dest)


def test_analysis_recovers_known_percentages(study_inputs, tmp_path):
    _export(study_inputs, tmp_path / "x")
    key = pd.read_csv(tmp_path / "x" / "key" / "answer_key.csv", keep_default_na=False)
    responses = tmp_path / "responses"
    responses.mkdir()
    expected = {m: {"num": 0.0, "den": 0.0, "ratings": []} for m in (*METHODS, "base")}
    for form in (1, 2, 3):
        for p in range(2):
            pid = f"P{form}{p}"
            filled = _fill(key, form, pid, _truth)
            if p == 0:
                filled.to_csv(responses / f"{pid}.csv", index=False)
            else:
                _write_xlsx_response(tmp_path / "x" / "forms" / f"form-{form}.xlsx", filled, responses / f"{pid}.xlsx")
            for _, q in key[key["form"] == form].iterrows():
                n = len(json.loads(q["elements"]))
                marks, rating = _truth(q["method"], n, pid)
                if q["kind"] == "elements":
                    expected[q["method"]]["num"] += sum(marks)
                    expected[q["method"]]["den"] += n
                else:
                    expected[q["method"]]["ratings"].append(rating)
    assert main(["study", "analyze", "--responses", str(responses), "--key", str(tmp_path / "x/key/answer_key.csv"),
                 "--output", str(tmp_path / "t3"), "--bootstrap", "500"]) == 0
    t3 = pd.read_csv(tmp_path / "t3" / "table3.csv").set_index("method")
    for m, e in expected.items():
        text = 100 * e["num"] / e["den"]
        pers = 100 * float(np.mean([(r - 1) / 4 for r in e["ratings"]]))
        assert t3.loc[m, "text_alignment"] == pytest.approx(text, abs=1e-9)
        assert t3.loc[m, "personalization"] == pytest.approx(pers, abs=1e-9)
        for metric, v in (("text_alignment", text), ("personalization", pers)):
            assert t3.loc[m, f"{metric}_ci_low"] <= v <= t3.loc[m, f"{metric}_ci_high"]
        assert t3.loc[m, "participants"] == 2 * key[key["method"] == m]["form"].nunique()  # 2 per form that shows m
    assert t3.loc["palp", "text_alignment"] == 100 and t3.loc["base", "text_alignment"] == 0
    assert t3.loc["palp", "personalization_ci_high"] - t3.loc["palp", "personalization_ci_low"] > 0  # varied answers
    for name in ("table3.md", "table3.png", "summary.html", "table3_by_subject.csv", "table3_by_prompt.csv"):
        assert (tmp_path / "t3" / name).is_file()
    assert "palp" in (tmp_path / "t3" / "table3.md").read_text()
    by_subject = pd.read_csv(tmp_path / "t3" / "table3_by_subject.csv")
    assert sorted(set(zip(by_subject["method"], by_subject["subject"]))) == sorted(
        (m, s) for m in (*METHODS, "base") for s in ("cat", "toy"))


def test_malformed_responses_name_file_row_and_column(study_inputs, tmp_path, capsys):
    _export(study_inputs, tmp_path / "x")
    key = pd.read_csv(tmp_path / "x" / "key" / "answer_key.csv", keep_default_na=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    form = _fill(key, 1, "P1", _truth)
    rating_row = form.index[form["rating"].notna()][0]
    present_row = form.index[form["present_1"].notna()][0]
    form.loc[rating_row, "rating"] = 7
    form.loc[present_row, "present_1"] = 2
    form.loc[len(form)] = {"participant_id": "P1", "question_id": "Qnosuchquestion"}
    form.to_csv(bad / "a.csv", index=False)
    _fill(key, 1, "P1", _truth).to_csv(bad / "b.csv", index=False)  # P1 answers form 1 again
    empty = _fill(key, 2, "P2", _truth)
    empty[[c for c in empty.columns if c.startswith("present_") or c == "rating"]] = ""
    empty.to_csv(bad / "c.csv", index=False)
    _write_xlsx_response(tmp_path / "x/forms/form-3.xlsx", _fill(key, 3, "", _truth).fillna(""), bad / "d.xlsx")
    code = main(["study", "analyze", "--responses", str(bad / "*"), "--key", str(tmp_path / "x/key/answer_key.csv"),
                 "--output", str(tmp_path / "t3")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "t3").exists()
    a = str(bad / "a.csv")
    assert f"{a}: row {rating_row + 2}, column rating: expected a rating from 1 to 5, got '7'" in err
    assert f"{a}: row {present_row + 2}, column present_1: expected 0 or 1, got '2'" in err
    assert f"{a}: row {len(form) + 1}, column question_id: unknown question id 'Qnosuchquestion'" in err
    assert f"{bad / 'b.csv'}: row 2: participant 'P1' already answered" in err
    assert f"{bad / 'c.csv'}: the form is empty" in err
    assert f"{bad / 'd.xlsx'}: row 2, column B: the participant ID is empty" in err


def test_signed_urls_for_gcs_output(study_inputs, gcs_emulator, tmp_path, monkeypatch):
    """V4 signed URLs, signed locally with a service-account key (generated for the test)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from palp.core import gcs, storage

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    sa = {"type": "service_account", "project_id": "palp", "private_key_id": "k1", "private_key": pem,
          "client_email": "study@palp.iam.gserviceaccount.com", "client_id": "1",
          "token_uri": "https://oauth2.googleapis.com/token"}
    (tmp_path / "sa.json").write_text(json.dumps(sa))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "sa.json"))
    gcs.gcs_client().create_bucket("palp-study-test")
    root, samples = study_inputs
    export(samples, str(root / "prep"), "gs://palp-study-test/study1", forms=2, image_size=32, links="signed", expiry_hours=2)
    form = pd.read_csv(io.BytesIO(storage.read_bytes("gs://palp-study-test/study1/forms/form-1.csv")), keep_default_na=False)
    for _, r in form.iterrows():
        url = r["image_url"]
        assert f"/palp-study-test/study1/forms/images/{r['image_id']}.png?" in url
        assert "X-Goog-Algorithm=GOOG4-RSA-SHA256" in url and "X-Goog-Expires=7200" in url and "X-Goog-Signature=" in url
        assert storage.exists(f"gs://palp-study-test/study1/forms/images/{r['image_id']}.png")
    assert storage.exists("gs://palp-study-test/study1/key/answer_key.csv")


def test_more_forms_than_questions_is_a_clear_error(study_inputs, tmp_path, capsys):
    root, samples = study_inputs
    code = main(["study", "export", "--samples", samples[0], "--prepared", str(root / "prep"), "--output",
                 str(tmp_path / "x"), "--forms", "5", "--methods", "palp"])
    assert code == 2 and "4 questions cannot fill 5 forms; use --forms 4 or fewer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


HYPERLINK = '=HYPERLINK("http://evil","click")'


def test_formula_texts_are_plain_text_in_xlsx_and_neutralised_in_csv(study_inputs, tmp_path, monkeypatch):
    import csv

    from palp.core.safecsv import DANGEROUS, read_csv
    from palp.steps import study

    real = study.build_questions

    def hostile(*args, **kw):  # prompt texts as an attacker would write them
        questions = real(*args, **kw)
        for q in questions:
            q["clean_prompt"] = "=1+1"
            if q["elements"]:
                q["elements"][:2] = [HYPERLINK, "=1+1"]
        return questions

    monkeypatch.setattr(study, "build_questions", hostile)
    _export(study_inputs, tmp_path / "x")
    ws = openpyxl.load_workbook(tmp_path / "x" / "forms" / "form-1.xlsx")["Form"]
    cells = [c for row in ws.iter_rows() for c in row if c.value is not None]
    assert {c.data_type for c in cells if c.value in (HYPERLINK, "=1+1")} == {"s"}
    assert not [c.coordinate for c in cells if c.data_type == "f"]
    assert any(c.value == HYPERLINK for c in cells)
    for rel in ["forms/form-1.csv", "key/answer_key.csv"]:
        rows = list(csv.reader((tmp_path / "x" / rel).open(newline="")))
        assert not [c for r in rows for c in r if c.startswith(DANGEROUS)], rel
        if rel.startswith("forms"):
            assert "'" + HYPERLINK in [c for r in rows for c in r] and "'=1+1" in [c for r in rows for c in r]
    # analyze reads the neutralised key back as the original text, and writes it neutralised.
    key = pd.read_csv(tmp_path / "x" / "key" / "answer_key.csv", keep_default_na=False)
    (tmp_path / "r").mkdir()
    for form in (1, 2, 3):
        _fill(key, form, "P1", _truth).to_csv(tmp_path / "r" / f"{form}.csv", index=False)
    assert main(["study", "analyze", "--responses", str(tmp_path / "r"), "--key", str(tmp_path / "x/key/answer_key.csv"),
                 "--output", str(tmp_path / "t3"), "--bootstrap", "50"]) == 0
    raw = (tmp_path / "t3" / "table3_by_prompt.csv").read_text()
    assert [r[1] for r in csv.reader(io.StringIO(raw))][1:] == ["'=1+1"] * 3
    assert set(read_csv(raw)["clean_prompt"]) == {"=1+1"}


def _one_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err and err.count("error:") == 1, err
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("case", ["truncated", "not-a-zip", "key-is-a-form", "key-missing"])
def test_bad_study_files_give_one_clear_error(study_inputs, tmp_path, capsys, case):
    _export(study_inputs, tmp_path / "x")
    key_path = tmp_path / "x" / "key" / "answer_key.csv"
    key = pd.read_csv(key_path, keep_default_na=False)
    responses = tmp_path / "responses"
    responses.mkdir()
    filled = responses / "P1.xlsx"
    _write_xlsx_response(tmp_path / "x" / "forms" / "form-1.xlsx", _fill(key, 1, "P1", _truth), filled)
    if case == "truncated":
        filled.write_bytes(filled.read_bytes()[: filled.stat().st_size // 2])
    elif case == "not-a-zip":
        filled.write_bytes(b"participant_id,question_id\nP1,Q1\n")
    elif case == "key-is-a-form":
        key_path = tmp_path / "x" / "forms" / "form-1.csv"
    else:
        key_path = tmp_path / "x" / "key" / "no_such_key.csv"
    code = main(["study", "analyze", "--responses", str(responses), "--key", str(key_path), "--output", str(tmp_path / "t3")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "t3").exists()
    if case in ("truncated", "not-a-zip"):
        _one_error(err, f"{filled}: not a readable form", "save the filled form again as .xlsx or .csv")
    else:
        _one_error(err, f"--key {key_path}", "pass the key/answer_key.csv that `palp study export` wrote")
        assert ("no column kind" if case == "key-is-a-form" else "does not exist") in err


def test_export_into_an_existing_file_is_a_clear_error(study_inputs, tmp_path, capsys):
    root, samples = study_inputs
    (tmp_path / "study").write_text("not a folder")
    code = main(["study", "export", "--samples", samples[0], "--prepared", str(root / "prep"), "--output", str(tmp_path / "study")])
    _one_error(capsys.readouterr().err, f"--output {tmp_path / 'study'}", "is a file, not a folder")
    assert code == 2 and (tmp_path / "study").read_text() == "not a folder"
