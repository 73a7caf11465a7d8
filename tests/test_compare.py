"""The studies end to end at a nano scale: `compare --quick` (round 2) and `--rounds 3 --quick`.

Small and seeded (2 seeds, nano model, one alpha): they check the studies' design and
bookkeeping (branching, the matched baseline, records, predictions, statistics), not their
findings (README.md and notebooks 04/05 report the full studies).
"""

import json

import pytest
import torch

from spo_min import chain, compare, study
from spo_min.checkpoint import read_metadata


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "study"
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)  # training runs use the torch path (as train.py users do)
    try:
        records, comparisons = compare.main(["--quick", "--out", str(out), "--alphas", "1", "--samples", "1"])
    finally:
        mp.undo()
    return out, records, comparisons


def test_every_seed_has_spo_its_matched_chain_and_dpo(quick_study):
    out, records, comparisons = quick_study
    assert sorted((r["seed"], r["method"]) for r in records) == [
        (0, "dpo"), (0, "matched"), (0, "spo"), (1, "dpo"), (1, "matched"), (1, "spo")]
    assert len((out / "results.jsonl").read_text().splitlines()) == 6 and (out / "compare.png").stat().st_size > 0
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["seeds"] == 2
    primary = [c for c in verdict["comparisons"] if c["primary"]]
    assert len(primary) == 1 and "matched" in primary[0]["baseline"]
    for c in verdict["comparisons"]:  # nothing dropped: every comparison has every seed
        assert {"spo", "baseline", "statistic", "n", "dof", "mean", "half_width", "verdict"} <= set(c)
        assert c["n"] == 2 and c["dof"] == 1 and len(c["diffs"]) == 2


def test_matched_chain_is_e10s(quick_study):
    """Round 1 of the matched chain: beta_1' = beta_1 beta_2 / (beta_2 + lambda beta_1), from the same
    pi_0 with the same seed (batch order); round 2: DPO at beta_2 from it. SPO branches from pi_1."""
    out, records, _ = quick_study
    for seed in (0, 1):
        base, pi1 = out / f"seed{seed}" / "base.safetensors", out / f"seed{seed}" / "round1_helpful.safetensors"
        m1 = read_metadata(out / f"seed{seed}_matched_1_r1" / "round1_helpful.safetensors")
        m2 = read_metadata(out / f"seed{seed}_matched_1" / "round2_harmless.safetensors")
        spo = read_metadata(out / f"seed{seed}_spo_1" / "round2_harmless.safetensors")
        beta1 = read_metadata(pi1)["beta"]
        assert m1["beta"] == pytest.approx(beta1 * spo["beta"] / (spo["beta"] + (1.0 / beta1) * beta1))
        m1_path = out / f"seed{seed}_matched_1_r1" / "round1_helpful.safetensors"
        assert chain.parent_path(m1_path, m1["parent"]) == str(base)  # recorded relative to its folder
        assert m1["parent_sha256"] == chain.file_sha256(base) and m1["seed"] == seed == read_metadata(pi1)["seed"]
        assert m1["data_fingerprint"] == read_metadata(pi1)["data_fingerprint"]
        assert m2["loss"] == "dpo" and m2["lambdas"] == [0.0] and m2["beta"] == spo["beta"]
        assert spo["lambdas"] == [pytest.approx(1.0 / beta1)] and spo["parent_sha256"] == chain.file_sha256(pi1)
        by_method = {r["method"]: r for r in records if r["seed"] == seed}
        # SPO and its matched chain share pi_0, the objective J and its optimum (E10): the same J*
        # and the same ideal prediction, though their round 1s differ.
        s, m, d = by_method["spo"], by_method["matched"], by_method["dpo"]
        assert s["J*"] == pytest.approx(m["J*"], abs=1e-9) and s["weights"] == m["weights"]
        assert s["opt_ideal"] == pytest.approx(m["opt_ideal"], abs=1e-9)
        assert m["pi1"]["exact/helpful_benign"] != s["pi1"]["exact/helpful_benign"]
        assert d["weights"] == {"helpful": 1 / beta1, "harmless": 1 / spo["beta"]}
        assert s["gap"] == pytest.approx(s["J*"] - s["J"]) and s["gap"] >= 0 and m["gap"] >= 0


def test_primary_statistic_is_the_paired_j_difference(quick_study):
    _, records, comparisons = quick_study
    primary = next(c for c in comparisons if c["primary"])
    by = {(r["seed"], r["method"]): r for r in records}
    assert primary["diffs"] == [pytest.approx(by[(s, "spo")]["J"] - by[(s, "matched")]["J"]) for s in (0, 1)]
    progress = [by[(s, "matched")]["J"] - by[(s, "matched")]["J_pi0"] for s in (0, 1)]
    assert primary["band"] == pytest.approx(0.1 * abs(sum(progress) / 2))
    # Secondary: absolute scores of pi_2, SPO minus matched, same seeds.
    help_ = next(c for c in comparisons if c.get("key") == "exact/helpful_benign" and "matched" in c["baseline"])
    assert help_["diffs"] == [pytest.approx(by[(s, "spo")]["pi2"]["exact/helpful_benign"]
                                            - by[(s, "matched")]["pi2"]["exact/helpful_benign"]) for s in (0, 1)]


def test_a_study_never_writes_into_a_used_folder(quick_study, tmp_path):
    out = quick_study[0]
    with pytest.raises(SystemExit, match="is not empty"):
        compare.main(["--quick", "--out", str(out)])
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit, match="is not empty"):
        compare.main(["--quick", "--out", str(tmp_path)])


def test_resume_trains_only_the_unfinished_runs_and_reproduces_them(quick_study, tmp_path):
    """A study killed midway (machine restart) is finished with --resume: the finished runs are
    kept byte for byte, a half-written run is retrained from the start, and seeded runs make the
    report the same as the original (which runs wait for which: the unit test below)."""
    import shutil

    out, records, _ = quick_study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    (copy / "seed1_matched_1" / "metrics.jsonl").unlink()  # killed before its last write
    kept = (copy / "seed0_spo_1" / "round2_harmless.safetensors").read_bytes()
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    try:  # --jobs 1: the one run trains in this process (a worker pool would start torch again)
        resumed, _ = compare.main(["--quick", "--out", str(copy), "--alphas", "1", "--samples", "1", "--resume",
                                   "--jobs", "1"])
    finally:
        mp.undo()
        torch.set_num_threads(threads)  # a study's run takes one thread
    assert (copy / "seed0_spo_1" / "round2_harmless.safetensors").read_bytes() == kept
    assert (copy / "seed1_matched_1" / "metrics.jsonl").is_file()
    key = lambda r: (r["seed"], r["method"], r.get("alpha"))  # noqa: E731
    assert [key(r) for r in sorted(records, key=key)] == [key(r) for r in sorted(resumed, key=key)]
    for a, b in zip(sorted(records, key=key), sorted(resumed, key=key)):
        # Same seed, same batch order, one CPU thread: the retrained run repeats the original; the
        # tolerance only absorbs the JSON round trip. Timings ("seconds") are the one thing that differs.
        assert b["J"] == pytest.approx(a["J"], abs=1e-6) and b["gap"] == pytest.approx(a["gap"], abs=1e-6)
        exact = {k: v for k, v in a["pi2"].items() if k.startswith("exact/")}
        assert exact and {k: b["pi2"][k] for k in exact} == pytest.approx(exact, abs=1e-6)
    verdict = json.loads((copy / "verdict.json").read_text())
    assert verdict["wall_seconds_covers"] == "the resumed runs only"


def test_unfinished_jobs_wait_only_for_unfinished_parents(tmp_path):
    """--resume's plan: finished runs (metrics.jsonl written) are skipped, a half-written folder is
    deleted, a run whose parent finished starts at once, one whose parent is retrained waits for it."""
    two = ["--stage", "helpful", "--stage", "harmless"]
    jobs = [study.job("a", two, str(tmp_path)), study.job("b", two, str(tmp_path), after="a"),
            study.job("c", ["--stage", "concise"], str(tmp_path), after="b"),
            study.job("d", ["--stage", "concise"], str(tmp_path), after="a"),
            study.job("e", two, str(tmp_path))]
    rows = {0: '{"round": 0, "stage": "base"}\n', 1: '{"round": 1, "stage": "helpful"}\n',
            2: '{"round": 2, "stage": "harmless"}\n'}
    for name, text in (("a", rows[0] + rows[1] + rows[2]),   # finished: its last row is its last stage's
                       ("b", rows[0] + rows[1]),             # killed in round 2: a row per finished round
                       ("e", rows[0] + rows[1] + '{"round": 2, "sta')):  # killed while writing its last row
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(text)
    todo = study.unfinished_jobs(jobs)
    assert [(j["name"], j["after"]) for j in todo] == [("b", None), ("c", "b"), ("d", None), ("e", None)]
    assert not (tmp_path / "b").exists() and not (tmp_path / "e").exists()
    assert (tmp_path / "a" / "metrics.jsonl").exists()


def test_run_jobs_refuses_unknown_parents():
    with pytest.raises(ValueError, match="after"):
        study.run_jobs([study.job("a", [], "/tmp", after="b")], 1)


def test_a_copied_run_folder_verifies_and_refuses_a_changed_parent(quick_study, tmp_path):
    import shutil

    src = quick_study[0] / "seed0"
    copy = tmp_path / "seed0"
    shutil.copytree(src, copy)
    # A copied folder verifies on its own: round 1 names its base relative to its folder, by hash.
    assert len(chain.rebuild_chain(str(copy / "round1_helpful.safetensors"))) == 2
    meta = read_metadata(copy / "round1_helpful.safetensors")
    victim = chain.parent_path(copy / "round1_helpful.safetensors", meta["parent"])
    assert victim == str(copy / "base.safetensors")
    with open(victim, "ab") as f:
        f.write(b"\0")
    with pytest.raises(chain.ChainError, match="has changed since"):
        chain.rebuild_chain(str(copy / "round1_helpful.safetensors"))


# ----------------------------------------------------------------------------- n = 3

@pytest.fixture(scope="module")
def quick_round3(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare3") / "study"
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        records, comparisons = compare.main(["--rounds", "3", "--quick", "--out", str(out), "--alphas", "1",
                                             "--samples", "0"])
    finally:
        mp.undo()
    return out, records, comparisons


def test_round3_study_branches_every_method_from_the_same_pi2(quick_round3):
    out, records, comparisons = quick_round3
    assert sorted((r["seed"], r["method"]) for r in records) == [
        (0, "dpo"), (0, "exact"), (0, "telescoped"), (1, "dpo"), (1, "exact"), (1, "telescoped")]
    assert (out / "round3.png").stat().st_size > 0 and len((out / "results.jsonl").read_text().splitlines()) == 6
    for seed in (0, 1):
        pi2 = out / f"seed{seed}" / "round2_harmless.safetensors"
        meta2 = read_metadata(pi2)
        beta1 = read_metadata(out / f"seed{seed}" / "round1_helpful.safetensors")["beta"]
        paths = {m: out / f"seed{seed}_r3_{m}{'' if m == 'dpo' else '_1'}" / "round3_concise.safetensors"
                 for m in ("exact", "telescoped", "dpo")}
        metas = {m: read_metadata(path) for m, path in paths.items()}
        for m, meta in metas.items():
            assert chain.parent_path(paths[m], meta["parent"]) == str(pi2)
            assert meta["parent_sha256"] == chain.file_sha256(pi2)
        # --alpha 1: lambda_i^(3) = 1 / beta_i as recorded; the telescoped run says so in its metadata.
        assert metas["exact"]["lambdas"] == [pytest.approx(1 / beta1), pytest.approx(1 / meta2["beta"])]
        # The telescoped round records the lambdas its margin amounts to: R_1 counted twice.
        (lam21,) = meta2["lambdas"]
        assert metas["telescoped"]["lambdas"] == [pytest.approx(1 / beta1 + lam21 / meta2["beta"]),
                                                  pytest.approx(1 / meta2["beta"])]
        assert metas["exact"]["margin_mode"] == "exact" and metas["telescoped"]["margin_mode"] == "telescoped"
        assert metas["dpo"]["lambdas"] == [0.0, 0.0] and metas["dpo"]["loss"] == "dpo"
    for r in records:
        # Changes are pi_3 minus the SAME seed's pi_2, on the exact evaluation.
        assert r["measured"]["concise gained"] == pytest.approx(r["pi3"]["exact/concise_all"] - r["pi2"]["exact/concise_all"])
        assert r["measured"]["help kept"] == pytest.approx(r["pi3"]["exact/helpful_benign"] - r["pi2"]["exact/helpful_benign"])
        if r["method"] == "dpo":  # no margin: both predictions are the same E3 step from pi_2
            assert r["from_margin"] == pytest.approx(r["optimum"])
    primary = [c for c in comparisons if c["primary"]]
    assert len(primary) == 1 and primary[0]["n"] == 2
    # The primary statistic by hand: the measured exact-minus-telescoped change projected on the unit
    # vector of the margin-optimum gap, per seed.
    by = {(r["seed"], r["method"]): r for r in records}
    for seed, got in zip((0, 1), primary[0]["diffs"]):
        e, t = by[(seed, "exact")], by[(seed, "telescoped")]
        gap = [e["from_margin"][a] - t["from_margin"][a] for a in e["measured"]]
        moved = [e["measured"][a] - t["measured"][a] for a in e["measured"]]
        assert got == pytest.approx(sum(m * g for m, g in zip(moved, gap)) / sum(g * g for g in gap) ** 0.5)


@pytest.mark.parametrize("which", ["quick_study", "quick_round3"])
def test_report_only_rebuilds_the_same_report_and_keeps_the_training_wall_time(which, request):
    """--report-only reads the runs back from their files: the same records, and the wall time the
    training recorded (not None: the JSON it reads is the one it rewrites)."""
    out, records, _ = request.getfixturevalue(which)
    argv = (["--quick", "--out", str(out), "--alphas", "1", "--samples", "1", "--report-only"] if which == "quick_study"
            else ["--rounds", "3", "--quick", "--out", str(out), "--alphas", "1", "--samples", "0", "--report-only"])
    trained = json.loads((out / "verdict.json").read_text())["wall_seconds"]
    again, _ = compare.main(argv)
    assert isinstance(trained, int) and json.loads((out / "verdict.json").read_text())["wall_seconds"] == trained
    key = lambda r: (r["seed"], r["method"], r.get("alpha"))  # noqa: E731
    assert [key(r) for r in sorted(again, key=key)] == [key(r) for r in sorted(records, key=key)]
    for a, b in zip(sorted(again, key=key), sorted(records, key=key)):
        # Run times aside (a whole run's when trained here, its last round's when read back).
        a, b = ({k: v for k, v in r.items() if k != "seconds"} for r in (a, b))
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
