import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import vote  # noqa: E402
from common import UserError  # noqa: E402

# ---------------------------------------------------------------------------
# Pure numerics


def test_hard_vote_majority_and_first_file_tiebreak():
    labels = np.array(
        [
            [0, 0, 1, 2, 2],  # 0 and 2 tie at 2 votes: file 0 voted 0 -> 0
            [1, 2, 2, 2, 1],  # clear majority 2
            [2, 0, 1, 1, 0],  # 0 and 1 tie; file 0 voted neither, file 1 voted 0 -> 0
            [3, 3, 3, 1, 1],
        ]
    )
    assert vote.hard_vote(labels).tolist() == [0, 2, 0, 3]


def test_hard_vote_weighted_and_prob_tiebreak():
    labels = np.array([[0, 1, 1], [0, 1, 2], [2, 1, 0]])
    # weights 1.5,1,1: row 0 -> 1 (2 > 1.5); row 1 -> 0 (1.5 beats 1 and 1); row 2 -> 2
    assert vote.hard_vote(labels, weights=[1.5, 1, 1]).tolist() == [1, 0, 2]
    # weights 2,1,1: row 0 ties 2 vs 2 -> file 0's label 0
    assert vote.hard_vote(labels, weights=[2, 1, 1]).tolist()[0] == 0
    # equal weights, row 1 is a three-way tie; summed probabilities pick class 1
    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    assert vote.hard_vote(labels, tiebreak_probs=probs).tolist() == [1, 1, 2]
    # row 2 is a tie too (2,1,0); probs 0.3/0.3/0.4 -> 2; a zero-weight file never breaks ties
    assert vote.hard_vote(labels, weights=[0, 1, 1]).tolist() == [1, 1, 1]


def test_hard_vote_multi_per_class_majority():
    a = np.array([[1, 0, 1], [0, 0, 1]])
    b = np.array([[1, 1, 0], [0, 1, 1]])
    c = np.array([[0, 1, 0], [1, 0, 1]])
    assert vote.hard_vote_multi([a, b, c]).tolist() == [[1, 1, 0], [0, 0, 1]]
    # two models: every disagreement is a tie -> first model, or probs >= threshold
    assert vote.hard_vote_multi([a, b]).tolist() == a.tolist()
    probs = np.array([[0.9, 0.7, 0.2], [0.1, 0.4, 0.6]])
    assert vote.hard_vote_multi([a, b], tiebreak_probs=probs).tolist() == [[1, 1, 0], [0, 0, 1]]
    assert vote.hard_vote_multi([a, b], weights=[1, 2]).tolist() == b.tolist()


def test_soft_vote_weighted_mean_and_tie():
    p1 = np.array([[0.8, 0.2], [0.6, 0.4]])
    p2 = np.array([[0.2, 0.8], [0.4, 0.6]])
    np.testing.assert_allclose(vote.soft_vote([p1, p2], [3, 1]), [[0.65, 0.35], [0.55, 0.45]])
    even = vote.soft_vote([p1, p2])
    np.testing.assert_allclose(even, [[0.5, 0.5], [0.5, 0.5]])
    assert even.argmax(1).tolist() == [0, 0]  # an exact soft tie goes to the first class


def _onehotish(y, wrong_rows, k=3):
    """Probabilities right (0.7 on the label) except on wrong_rows (0.6 on label + 1)."""
    p = np.full((len(y), k), 0.15)
    p[np.arange(len(y)), y] = 0.7
    for r in wrong_rows:
        p[r] = 0.2
        p[r, (y[r] + 1) % k] = 0.6
    return p


def _acc(y, metric="accuracy", multi_label=False):
    return lambda p: vote.score_probs(p, y, metric, multi_label)


def test_caruana_best_first_and_never_below_best_single():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    members = [_onehotish(y, [6, 7, 8]), _onehotish(y, [0, 1]), _onehotish(y, [3, 4, 5])]
    counts, history = vote.caruana_select(members, _acc(y), n_iter=0, init_sorted=1)
    assert counts.tolist() == [0, 1, 0]  # model 1 (7/9 right) is the known best
    assert history == [pytest.approx(7 / 9)]
    counts, history = vote.caruana_select(members, _acc(y), n_iter=5, init_sorted=1)
    assert counts[1] >= 1 and counts.sum() >= 2
    best_single = max(vote.accuracy(y, p.argmax(1)) for p in members)
    ens = vote.accuracy(y, vote.soft_vote(members, counts).argmax(1))
    assert ens == 1.0 and ens >= best_single and max(history) == ens


def test_caruana_sorted_init_keeps_the_single_best_when_others_hurt():
    y = np.array([0, 1, 2, 0, 1, 2])
    bad = _onehotish(y, [0, 1, 2, 3])
    members = [bad, _onehotish(y, []), bad.copy()]
    counts, history = vote.caruana_select(members, _acc(y, "macro-f1"), n_iter=4, init_sorted=3)
    assert history[0] == 1.0 and counts.tolist() == [0, 1, 0]
    counts, _ = vote.caruana_select(members, _acc(y), n_iter=10, replacement=False)
    assert counts.max() == 1


def test_caruana_multi_label():
    y = np.array([[1, 0], [0, 1], [1, 1]])
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]])
    poor = np.array([[0.4, 0.6], [0.6, 0.4], [0.7, 0.6]])
    counts, history = vote.caruana_select([poor, good], _acc(y, multi_label=True), n_iter=3)
    assert counts[1] >= 1 and history[0] == 1.0


def test_align_reorders_and_refuses_mismatches():
    ref = ["a", "b", "c"]
    arr = np.array([[3], [1], [2]])
    out = vote.align(ref, ["c", "a", "b"], arr, "x.npy")
    assert out[:, 0].tolist() == [1, 2, 3]
    with pytest.raises(UserError, match=r"other\.csv: id 'z' is not in"):
        vote.align(ref, ["a", "z", "c"], arr, "other.csv")
    with pytest.raises(UserError, match=r"short\.csv: 2 rows but .* has 3"):
        vote.align(ref, ["a", "b"], arr[:2], "short.csv")


# ---------------------------------------------------------------------------
# Metrics


def test_metrics_hand_values():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    assert vote.accuracy(y, p) == pytest.approx(0.6)
    # F1: class 0 = 2/(2+1+1) = .5, class 1 = 4/5 = .8, class 2 = 0
    assert vote.macro_f1(y, p) == pytest.approx((0.5 + 0.8 + 0) / 3)
    np.testing.assert_allclose(vote.per_class_accuracy(y, p), [0.5, 1.0, 0.0])
    cm = vote.confusion_matrix(y, p, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert np.isnan(vote.per_class_accuracy(y, p, 4)[3])
    assert vote.macro_f1(y, p, 4) == pytest.approx((0.5 + 0.8 + 0) / 3)  # class 3 unseen


def test_multi_label_metrics():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    p = np.array([[1, 0, 1], [1, 1, 0]])
    assert vote.accuracy(y, p) == 0.5 == common.exact_match_accuracy(y, p)
    # column F1: 2/(2+1) , 1, 1
    assert vote.macro_f1(y, p) == pytest.approx((2 / 3 + 1 + 1) / 3)
    np.testing.assert_allclose(vote.per_class_accuracy(y, p), [0.5, 1, 1])


# ---------------------------------------------------------------------------
# File formats


def test_submission_round_trips(tmp_path):
    ids = ["img3", "007", "x"]
    f = vote.write_submission(tmp_path / "s.csv", ids, [2, 0, 1], "single", ["cat", "dog", "owl"])
    assert f.read_text().splitlines() == ["id,label", "img3,owl", "007,cat", "x,dog"]
    got_ids, labels, kind, classes = vote.read_labels_csv(f)
    assert (got_ids, labels.tolist(), kind, classes) == (
        ids,
        ["owl", "cat", "dog"],
        "single",
        ["cat", "dog", "owl"],
    )

    f = vote.write_submission(tmp_path / "m.csv", ["a.jpg", "b.jpg"], [17, 3], "mask")
    assert f.read_text().splitlines() == ["ImageID,ans", "a.jpg,17", "b.jpg,3"]
    got_ids, labels, kind, _ = vote.read_labels_csv(f)
    assert (got_ids, labels.tolist(), kind) == (["a.jpg", "b.jpg"], [17, 3], "mask")

    y = np.array([[1, 0, 1], [0, 0, 1]])
    f = vote.write_submission(tmp_path / "ml.csv", [50000, 50001], y, "multi", ["A", "B", "long"])
    assert f.read_text().splitlines()[0] == "index,a,b,long"
    got_ids, labels, kind, classes = vote.read_labels_csv(f)
    assert got_ids == ["50000", "50001"] and kind == "multi" and classes == ["a", "b", "long"]
    assert labels.tolist() == y.tolist()


@pytest.mark.parametrize("fmt", ["npy", "csv"])
@pytest.mark.parametrize("multi", [False, True])
def test_probs_round_trip(tmp_path, fmt, multi):
    rng = np.random.default_rng(0)
    p = rng.random((4, 3)).astype(np.float32)
    if not multi:
        p /= p.sum(1, keepdims=True)
    ids, classes = ["b", "a", "010", "d"], ["x", "y", "z"]
    sub = tmp_path / "pred.csv"
    written = vote.write_probs(sub, vote.Probs(ids, p, classes, multi_label=multi), fmt=fmt)
    assert all(w.is_file() for w in written)
    direct = tmp_path / ("pred.npy" if fmt == "npy" else "pred.probs.csv")
    for path in (direct, sub):  # the probability file itself or the submission beside it
        got_ids, got, got_classes, meta = vote.read_probs(path)
        assert got_ids == ids and got_classes == classes and meta["multi_label"] == multi
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, p, rtol=1e-6)


def test_read_probs_errors_name_the_file_and_fix(tmp_path):
    p = np.full((3, 2), 0.5, dtype=np.float32)
    vote.write_probs(tmp_path / "a.csv", vote.Probs(["1", "2", "3"], p, ["n", "y"]))
    (tmp_path / "a.ids.txt").unlink()
    with pytest.raises(UserError, match=r"a\.ids\.txt: missing.*one id a line"):
        vote.read_probs(tmp_path / "a.npy")
    (tmp_path / "a.ids.txt").write_text("1\n2\n")
    with pytest.raises(UserError, match=r"a\.ids\.txt: 2 ids but a\.npy has 3 rows"):
        vote.read_probs(tmp_path / "a.npy")
    with pytest.raises(UserError, match=r"b\.csv: no probabilities beside it"):
        vote.read_probs(tmp_path / "b.csv")
    np.save(tmp_path / "c.npy", np.array([[3.0, -2.0]]))
    (tmp_path / "c.ids.txt").write_text("1\n")
    with pytest.raises(UserError, match="outside 0..1"):
        vote.read_probs(tmp_path / "c.npy")


def test_read_labels_csv_with_label_column_and_bad_multi(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("path,label,fold\nimg/1.png,cat,0\nimg/2.png,dog,1\n")
    ids, labels, kind, _ = vote.read_labels_csv(f)
    assert ids == ["img/1.png", "img/2.png"] and labels.tolist() == ["cat", "dog"]
    assert kind == "single"
    f.write_text("index,a,b\n1,0,2\n")
    with pytest.raises(UserError, match="must be 0/1"):
        vote.read_labels_csv(f)


# ---------------------------------------------------------------------------
# CLI end to end (in-process)


def _csv_rows(path):
    return pd.read_csv(path, dtype=str).values.tolist()


def test_cli_hard_vote_of_submissions(tmp_path, capsys):
    ids = ["1", "2", "3"]
    names = [["cat", "dog", "owl"], ["cat", "owl", "dog"], ["dog", "owl", "cat"]]
    files = []
    for k, labels in enumerate(names):
        files.append(str(vote.write_submission(tmp_path / f"m{k}.csv", ids, labels)))
    # model 2 lists ids in another order: rows are aligned by id
    pd.read_csv(files[2], dtype=str).iloc[::-1].to_csv(files[2], index=False)
    out = tmp_path / "vote.csv"
    res = vote.main([*files, "--out", str(out), "--quiet"])
    assert res["mode"] == "hard" and res["rows"] == 3
    # id 1: cat,cat,dog -> cat; id 2: dog,owl,owl -> owl; id 3: owl,dog,cat tie -> file 0 (owl)
    assert _csv_rows(out) == [["1", "cat"], ["2", "owl"], ["3", "owl"]]
    vote.main([*files, "--weights", "1,1,3", "--out", str(out), "--quiet"])
    assert _csv_rows(out) == [["1", "dog"], ["2", "owl"], ["3", "cat"]]
    assert "hard vote of 3 files" in capsys.readouterr().out


def test_cli_soft_vote_weights_return_probs_and_scores(tmp_path):
    ids, classes = ["a", "b", "c"], ["0", "1"]
    p1 = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    p2 = np.array([[0.2, 0.8], [0.8, 0.2], [0.6, 0.4]])
    files = []
    for k, p in enumerate([p1, p2]):
        sub = tmp_path / f"m{k}.csv"
        vote.write_submission(sub, ids, p.argmax(1), "single", classes)
        vote.write_probs(sub, vote.Probs(ids, p, classes))
        files.append(str(tmp_path / f"m{k}.npy"))
    labels = tmp_path / "labels.csv"
    vote.write_submission(labels, ["c", "b", "a"], ["1", "0", "0"])
    out = tmp_path / "ens.csv"
    png = tmp_path / "cm.png"
    res = vote.main(
        [*files, "--weights", "1.5,1", "--out", str(out), "--return-probs", "--quiet"]
        + ["--labels", str(labels), "--confusion", str(png)]
    )
    # weighted means: a (.62,.38) -> 0; b (.56,.44) -> 0; c (.42,.58) -> 1
    assert res["mode"] == "soft"
    assert _csv_rows(out) == [["a", "0"], ["b", "0"], ["c", "1"]]
    got_ids, got, got_classes, meta = vote.read_probs(out)
    want = (1.5 * p1 + p2) / 2.5
    assert got_ids == ids and got_classes == classes and not meta["multi_label"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert res["scores"]["accuracy"] == pytest.approx(1.0)
    assert png.is_file() and png.stat().st_size > 0
    # soft mode on the submission CSVs reads the probabilities beside them
    res = vote.main(
        [str(tmp_path / "m0.csv"), str(tmp_path / "m1.csv"), "--mode", "soft"]
        + ["--weights", "1.5,1", "--out", str(out), "--quiet"]
    )
    assert _csv_rows(out) == [["a", "0"], ["b", "0"], ["c", "1"]]


def test_cli_multi_label_soft_and_hard(tmp_path):
    ids, classes = ["10", "11"], ["A", "B", "C"]
    p1 = np.array([[0.9, 0.2, 0.6], [0.1, 0.7, 0.3]])
    p2 = np.array([[0.7, 0.4, 0.2], [0.3, 0.5, 0.9]])
    files = []
    for k, p in enumerate([p1, p2]):
        sub = tmp_path / f"m{k}.csv"
        vote.write_submission(sub, ids, (p >= 0.5).astype(int), "multi", classes)
        vote.write_probs(sub, vote.Probs(ids, p, classes, multi_label=True), fmt="csv")
        files.append(sub)
    out = tmp_path / "ens.csv"
    probs = [str(f).replace(".csv", ".probs.csv") for f in files]
    vote.main([*probs, "--out", str(out), "--threshold", "0.45", "--quiet"])
    # means: row 10 (.8,.3,.4) -> 1,0,0 ; row 11 (.2,.6,.6) -> 0,1,1
    text = out.read_text().splitlines()
    assert text == ["index,a,b,c", "10,1,0,0", "11,0,1,1"]
    # hard vote of the two 0/1 submissions: ties go to file 0
    labels = tmp_path / "truth.csv"
    vote.write_submission(labels, ids, [[1, 0, 1], [0, 1, 0]], "multi", classes)
    res = vote.main([*map(str, files), "--out", str(out), "--labels", str(labels), "--quiet"])
    assert out.read_text().splitlines() == ["index,a,b,c", "10,1,0,1", "11,0,1,0"]
    assert res["scores"]["accuracy"] == 1.0


def test_cli_soft_vote_label_limits(tmp_path, capsys):
    ids, classes = ["10", "11"], ["A", "B", "C"]
    files = []
    for k, p in enumerate([[[0.9, 0.2, 0.6], [0.1, 0.7, 0.3]], [[0.7, 0.4, 0.2], [0.3, 0.5, 0.9]]]):
        f = tmp_path / f"m{k}.npy"
        vote.write_probs(f, vote.Probs(ids, np.array(p), classes, multi_label=True))
        files.append(str(f))
    out = tmp_path / "ens.csv"
    base = [*files, "--weights", "1.5,1", "--out", str(out), "--quiet"]
    # weighted means: row 10 (.82, .28, .44), row 11 (.18, .62, .54)
    vote.main(base)
    assert out.read_text().splitlines() == ["index,a,b,c", "10,1,0,0", "11,0,1,1"]
    vote.main([*base, "--max-labels", "1"])  # row 11 keeps B (.62 > .54)
    assert out.read_text().splitlines() == ["index,a,b,c", "10,1,0,0", "11,0,1,0"]
    vote.main([*base, "--min-labels", "2"])  # row 10 adds C (.44 > .28)
    assert out.read_text().splitlines() == ["index,a,b,c", "10,1,0,1", "11,0,1,1"]
    before = out.read_bytes()
    err = _exit2([*base, "--min-labels", "1", "--mode", "hard"], capsys)
    assert "--min-labels: works on the averaged probabilities; use --mode soft" in err
    err = _exit2([*base, "--max-labels", "4"], capsys)
    assert "--max-labels 4: there are 3 classes" in err
    assert out.read_bytes() == before


def test_cli_soft_vote_tunes_thresholds_on_the_val_vote(tmp_path, capsys):
    classes = ["A", "B"]

    def probs(name, ids, p):
        f = tmp_path / f"{name}.npy"
        vote.write_probs(f, vote.Probs(ids, np.array(p), classes, multi_label=True))
        return str(f)

    vids, tids = ["v0", "v1", "v2", "v3"], ["t0", "t1"]
    # vote of the two (weights 1, 1): val A = .3 .35 .1 .2 with truth 1 1 0 0 -> threshold in
    # (.2, .3], nearest 0.5: 0.30; val B = .8 .1 .9 .4 with truth 1 0 1 0 -> in (.4, .8]: 0.5
    va = probs("va", vids, [[0.4, 0.7], [0.3, 0.2], [0.0, 1.0], [0.3, 0.4]])
    vb = probs("vb", vids, [[0.2, 0.9], [0.4, 0.0], [0.2, 0.8], [0.1, 0.4]])
    ta = probs("ta", tids, [[0.4, 0.9], [0.1, 0.3]])
    tb = probs("tb", tids, [[0.2, 0.7], [0.3, 0.1]])
    vlab = tmp_path / "val.csv"
    vote.write_submission(vlab, vids, [[1, 1], [1, 0], [0, 1], [0, 0]], "multi", classes)
    out = tmp_path / "ens.csv"
    r = vote.main([ta, tb, "--tune-threshold", "exact", "--val-probs", va, vb, "--val-labels",
                   str(vlab), "--out", str(out), "--quiet"])  # fmt: skip
    rec = json.loads((tmp_path / "ens.thresholds.json").read_text())
    assert rec["thresholds"] == pytest.approx([0.30, 0.50]) and rec["val_score_tuned"] == 1.0
    assert rec["val_score_at_0.5"] == 0.5 and r["thresholds"]["classes"] == classes  # v0, v1 miss A
    # test vote: A .3 / .2 -> 1 / 0 at 0.30 (0 / 0 at 0.5); B .8 / .2 -> 1 / 0
    assert out.read_text().splitlines() == ["index,a,b", "t0,1,1", "t1,0,0"]
    r = vote.main([ta, tb, "--tune-threshold", "f1", "--val-probs", va, vb, "--val-labels",
                   str(vlab), "--out", str(tmp_path / "f1.csv"), "--quiet"])  # fmt: skip
    assert r["thresholds"]["metric"] == "f1" and r["thresholds"]["val_score_tuned"] == 1.0
    # the file applies to a later vote as it is
    vote.main([ta, tb, "--threshold", str(tmp_path / "ens.thresholds.json"), "--out",
               str(tmp_path / "again.csv"), "--quiet"])  # fmt: skip
    assert (tmp_path / "again.csv").read_text() == out.read_text()
    before = out.read_bytes()
    err = _exit2([ta, tb, "--tune-threshold", "exact", "--out", str(out)], capsys)
    assert "--tune-threshold: needs --val-probs (one per FILE) and --val-labels" in err
    err = _exit2([ta, tb, "--threshold", "0.4", "--tune-threshold", "f1", "--out", str(out)],
                 capsys)  # fmt: skip
    assert "--threshold and --tune-threshold cannot be used together" in err
    err = _exit2([ta, tb, "--mode", "hard", "--threshold", str(tmp_path / "ens.thresholds.json"),
                  "--out", str(out)], capsys)  # fmt: skip
    assert "--threshold FILE: works on the averaged probabilities; use --mode soft" in err
    tfile = tmp_path / "ens.thresholds.json"
    keep = tfile.read_bytes()
    err = _exit2([ta, tb, "--threshold", str(tfile), "--out", str(tfile)], capsys)
    assert "--threshold" in err and tfile.read_bytes() == keep
    assert out.read_bytes() == before


def test_cli_mask_hard_vote(tmp_path):
    ids = ["x.jpg", "y.jpg"]
    files = [
        str(vote.write_submission(tmp_path / f"m{k}.csv", ids, lab, "mask"))
        for k, lab in enumerate([[17, 2], [4, 2], [17, 5]])
    ]
    out = tmp_path / "ens.csv"
    vote.main([*files, "--out", str(out), "--quiet"])
    assert out.read_text().splitlines() == ["ImageID,ans", "x.jpg,17", "y.jpg,2"]


def test_cli_caruana_selection(tmp_path, capsys):
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    val_ids = [f"v{i}" for i in range(9)]
    classes = ["0", "1", "2"]
    vote.write_submission(tmp_path / "val.csv", val_ids, y, "single", classes)
    val_members = [_onehotish(y, [6, 7, 8]), _onehotish(y, [0, 1]), _onehotish(y, [3, 4, 5])]
    test_ids = ["t0", "t1"]
    test_probs = [
        np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]),
        np.array([[0.1, 0.8, 0.1], [0.1, 0.6, 0.3]]),
        np.array([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]),
    ]
    vals, tests = [], []
    for k in range(3):
        vote.write_probs(tmp_path / f"val{k}.csv", vote.Probs(val_ids, val_members[k], classes))
        vote.write_probs(tmp_path / f"test{k}.csv", vote.Probs(test_ids, test_probs[k], classes))
        vals.append(str(tmp_path / f"val{k}.npy"))
        tests.append(str(tmp_path / f"test{k}.npy"))
    out = tmp_path / "sel.csv"
    res = vote.main(
        [*tests, "--select", "caruana", "--val-probs", *vals, "--val-labels"]
        + [str(tmp_path / "val.csv"), "--iters", "5", "--init-sorted", "1", "--out", str(out)]
    )
    sel = res["selection"]
    assert sel["val_score"] == 1.0 and sel["best_single"] == pytest.approx(7 / 9)
    counts = sel["counts"]
    assert counts[1] >= 1
    want = vote.soft_vote(test_probs, counts).argmax(1)
    assert _csv_rows(out) == [["t0", classes[want[0]]], ["t1", classes[want[1]]]]
    printed = capsys.readouterr().out
    assert (
        "caruana: " in printed and "distinct models" in printed and "best single 0.7778" in printed
    )


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    p = np.array([[0.5, 0.5]])
    vote.write_probs(tmp_path / "a.csv", vote.Probs(["1"], p, ["n", "y"]))
    vote.write_probs(tmp_path / "b.csv", vote.Probs(["2"], p, ["n", "y"]))
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    with pytest.raises(SystemExit) as e:
        vote.main([a, b, "--weights", "1,1,1", "--out", str(tmp_path / "o.csv")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--weights: 3 values for 2 files" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        vote.main([a, b, "--out", str(tmp_path / "o.csv")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "b.npy: id '2' is not in" in err
    assert not (tmp_path / "o.csv").exists()


# ---------------------------------------------------------------------------
# Guarantees: explicit task, outputs never on inputs, all outputs or none


def _exit2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        vote.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_weighted_soft_vote_of_five_matches_hand_computation(tmp_path):
    ids, classes = ["r0", "r1"], ["a", "b", "c"]
    members = [
        [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]],
        [[0.1, 0.6, 0.3], [0.3, 0.4, 0.3]],
        [[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]],
        [[0.6, 0.2, 0.2], [0.1, 0.2, 0.7]],
        [[0.2, 0.2, 0.6], [0.3, 0.4, 0.3]],
    ]
    files = []
    for k, p in enumerate(members):
        vote.write_probs(tmp_path / f"m{k}.csv", vote.Probs(ids, np.array(p), classes))
        files.append(str(tmp_path / f"m{k}.npy"))
    out = tmp_path / "v.csv"
    vote.main([*files, "--weights", "1.5,1,1,1,1", "--out", str(out), "--return-probs"])
    # by hand, sum of w*p / 5.5: r0 a = (.75+.1+.2+.6+.2)/5.5 = 1.85/5.5, b = (.45+.6+.5+.2+.2)
    # /5.5 = 1.95/5.5, c = 1.7/5.5 -> b; r1 a = 1.05/5.5, b = 1.65/5.5, c = 2.8/5.5 -> c
    want = np.array([[1.85, 1.95, 1.7], [1.05, 1.65, 2.8]]) / 5.5
    _, got, _, _ = vote.read_probs(out)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert _csv_rows(out) == [["r0", "b"], ["r1", "c"]]


def test_out_onto_an_input_is_refused_and_the_input_kept(tmp_path, capsys):
    p = np.array([[0.7, 0.3], [0.2, 0.8]])
    for k in range(2):
        vote.write_submission(tmp_path / f"m{k}.csv", ["1", "2"], p.argmax(1), "single", ["n", "y"])
        vote.write_probs(tmp_path / f"m{k}.csv", vote.Probs(["1", "2"], p, ["n", "y"]))
    a, b = str(tmp_path / "m0.npy"), str(tmp_path / "m1.npy")
    before = {f: f.read_bytes() for f in tmp_path.iterdir()}
    for argv in (
        [a, b, "--out", a],  # the CSV would land on the .npy being voted
        [a, b, "--out", str(tmp_path / "m1.csv")],  # m1's own submission, read for its kind
        [
            a,
            b,
            "--out",
            str(tmp_path / "v.csv"),
            "--return-probs",
            "--labels",
            str(tmp_path / "m0.csv"),
            "--confusion",
            a,
        ],  # fmt: skip
        [str(tmp_path / "m0.csv"), str(tmp_path / "m1.csv"), "--out", str(tmp_path / "m0.csv")],
    ):
        err = _exit2(argv, capsys)
        assert "is the input" in err or "also the" in err
    assert {f: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_rows_not_summing_to_one_without_meta_are_ambiguous(tmp_path, capsys):
    ids = ["1", "2"]
    p = np.array([[0.9, 0.8], [0.1, 0.3]], dtype=np.float32)  # sigmoid-like rows
    for k in range(2):
        np.save(tmp_path / f"m{k}.npy", p)
        (tmp_path / f"m{k}.ids.txt").write_text("1\n2\n")
    files = [str(tmp_path / "m0.npy"), str(tmp_path / "m1.npy")]
    out = tmp_path / "v.csv"
    err = _exit2([*files, "--out", str(out)], capsys)
    assert "m0.npy" in err and "single- from multi-label" in err and "--kind" in err
    assert not out.exists()
    # the flag decides, both ways (never the row sums)
    vote.main([*files, "--out", str(out), "--kind", "multi"])
    assert out.read_text().splitlines() == ["index,0,1", "1,1,1", "2,0,0"]
    vote.main([*files, "--out", str(out), "--kind", "single"])
    assert _csv_rows(out) == [["1", "0"], ["2", "1"]]
    # a submission CSV beside the probabilities says it too (here: single-label)
    vote.write_submission(tmp_path / "m0.csv", ids, ["0", "1"])
    vote.write_submission(tmp_path / "m1.csv", ids, ["0", "1"])
    assert vote.main([*files, "--out", str(out)])["kind"] == "single"


def test_mask_submission_with_named_one_mapped_or_refused(tmp_path, capsys):
    ids = ["x.jpg", "y.jpg"]
    classes = ["wear_m", "wear_f", "none_m"]
    mask = vote.write_submission(tmp_path / "mask.csv", ids, [1, 2], "mask")
    named = vote.write_submission(tmp_path / "named.csv", ids, ["wear_f", "wear_m"])
    named2 = vote.write_submission(tmp_path / "named2.csv", ids, ["wear_m", "wear_m"])
    out = tmp_path / "v.csv"
    err = _exit2([str(mask), str(named), str(named2), "--out", str(out)], capsys)
    assert "mask.csv" in err and "named.csv" in err and "classes" in err
    assert not out.exists()
    # with its classes recorded beside it, ans 1 = wear_f, 2 = none_m: the votes line up
    p = np.eye(3)[[1, 2]]
    vote.write_probs(mask, vote.Probs(ids, p, classes, kind="mask"), fmt="csv")
    r = vote.main([str(mask), str(named), str(named2), "--out", str(out)])
    # x: wear_f, wear_f, wear_m -> wear_f (ans 1); y: none_m, wear_m, wear_m -> wear_m (ans 0)
    assert r["kind"] == "mask" and out.read_text().splitlines() == [
        "ImageID,ans",
        "x.jpg,1",
        "y.jpg,0",
    ]


def test_confusion_failure_leaves_no_outputs(tmp_path, capsys):
    ids, classes = ["a", "b"], ["0", "1"]
    p = np.array([[0.9, 0.1], [0.3, 0.7]])
    files = []
    for k in range(2):
        vote.write_probs(tmp_path / f"m{k}.csv", vote.Probs(ids, p, classes))
        files.append(str(tmp_path / f"m{k}.npy"))
    labels = vote.write_submission(tmp_path / "truth.csv", ids, ["0", "1"])
    out = tmp_path / "v.csv"
    (tmp_path / "adir").mkdir()
    base = [*files, "--out", str(out), "--return-probs", "--labels", str(labels)]
    err = _exit2([*base, "--confusion", str(tmp_path / "adir")], capsys)
    assert "is a directory" in err
    err = _exit2([*base, "--confusion", str(tmp_path / "cm.notanimage")], capsys)
    assert "cm.notanimage" in err and "png" in err
    assert not out.exists() and not (tmp_path / "v.npy").exists()
    r = vote.main([*base, "--confusion", str(tmp_path / "cm.png"), "--metric", "f1"])
    assert out.exists() and (tmp_path / "cm.png").stat().st_size > 0
    assert r["scores"]["accuracy"] == 1.0


@pytest.mark.parametrize(
    "flag,value,words",
    [
        ("--threshold", "1.5", "[0, 1]"),
        ("--threshold", "nan", "not finite"),
        ("--iters", "-1", ">= 0"),
        ("--init-sorted", "0", ">= 1"),
        ("--weights", "1,-2", ">= 0"),
        ("--weights", "1,x", "not a number"),
        ("--metric", "auc", "accuracy"),
    ],
)
def test_bad_numbers_are_one_line_errors(tmp_path, capsys, flag, value, words):
    err = _exit2(["a.npy", "b.npy", flag, value, "--out", str(tmp_path / "v.csv")], capsys)
    assert flag in err and words in err


def test_directory_as_input_says_so(tmp_path, capsys):
    (tmp_path / "d.npy").mkdir()
    err = _exit2([str(tmp_path / "d.npy"), "--out", str(tmp_path / "v.csv")], capsys)
    assert "is a directory" in err


def test_metric_aliases_are_one_vocabulary():
    y = np.array([0, 1, 1])
    p = np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    assert vote.score_probs(p, y, "f1") == vote.score_probs(p, y, "macro-f1")
    assert (
        vote.score_probs(p, y, "acc") == vote.score_probs(p, y, "accuracy") == pytest.approx(2 / 3)
    )
    assert common.metric_name("macro_f1") == "macro-f1" and common.metric_name("ACC") == "accuracy"


def test_threshold_for_single_label_is_refused_and_zero_is_kept(tmp_path, capsys):
    ids = ["1", "2"]
    vote.write_probs(
        tmp_path / "s.csv", vote.Probs(ids, np.array([[0.6, 0.4], [0.3, 0.7]]), ["x", "y"])
    )
    m = tmp_path / "m.csv"
    vote.write_probs(
        m, vote.Probs(ids, np.array([[0.1, 0.0], [0.3, 0.7]]), ["x", "y"], multi_label=True)
    )
    err = _exit2(
        [str(tmp_path / "s.npy"), "--threshold", "0.3", "--out", str(tmp_path / "o.csv")], capsys
    )
    assert "--threshold" in err and "single-label" in err and not (tmp_path / "o.csv").exists()
    vote.main([str(tmp_path / "m.npy"), "--threshold", "0", "--out", str(tmp_path / "o.csv")])
    assert (tmp_path / "o.csv").read_text().splitlines()[1:] == ["1,1,1", "2,1,1"]  # p >= 0
