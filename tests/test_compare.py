"""`python -m spo_min.compare --quick` end to end: branching, records, prediction, verdict, plot.

Small and seeded (2 seeds, nano model, one alpha and one beta_2): it checks the study's
plumbing and bookkeeping, not its finding (README.md reports the full study).
"""

import json

import pytest

from spo_min import chain, compare
from spo_min.checkpoint import read_metadata


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)  # training runs use the torch path (as train.py users do)
    try:
        records, summary = compare.main(["--quick", "--out", str(out), "--alphas", "2", "--beta2s", "3", "--samples", "1"])
    finally:
        mp.undo()
    return out, records, summary


def test_quick_study_writes_every_record(quick_study):
    out, records, summary = quick_study
    assert sorted((r["seed"], r["method"]) for r in records) == [(0, "dpo"), (0, "spo"), (1, "dpo"), (1, "spo")]
    on_disk = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(on_disk) == 4 and (out / "frontier.png").stat().st_size > 0
    assert json.loads((out / "verdict.json").read_text())["measured"]["pooled"]["verdict"]
    for r in records:
        # x and y are differences of the exact evaluation between pi_2 and the SAME seed's pi_1.
        assert r["measured"]["x"] == pytest.approx(r["pi2"]["exact/harmless_harmful"] - r["pi1"]["exact/harmless_harmful"])
        assert r["measured"]["y"] == pytest.approx(r["pi2"]["exact/helpful_benign"] - r["pi1"]["exact/helpful_benign"])
        assert -1 <= r["predicted"]["x"] <= 1 and -1 <= r["predicted"]["y"] <= 1
    assert set(summary["measured"]["per_alpha"]) == {2.0}


def test_round2_variants_branch_from_the_same_pi1(quick_study):
    out = quick_study[0]
    for seed in (0, 1):
        pi1 = out / f"seed{seed}" / "round1_helpful.safetensors"
        beta1 = read_metadata(pi1)["beta"]
        paths = [out / f"seed{seed}_spo_2" / "round2_harmless.safetensors",
                 out / f"seed{seed}_dpo_3" / "round2_harmless.safetensors"]
        spo, dpo = (read_metadata(path) for path in paths)
        for path, meta in zip(paths, (spo, dpo)):
            assert chain.parent_path(path, meta["parent"]) == str(pi1)  # recorded relative to its folder
            assert meta["parent_sha256"] == chain.file_sha256(pi1)
        # lambda_1^(2) = alpha / beta_1 from the beta that round 1 RECORDED; DPO records a zero.
        assert spo["lambdas"] == [pytest.approx(2.0 / beta1)] and spo["loss"] == "spo"
        assert dpo["lambdas"] == [0.0] and dpo["beta"] == 3.0 and dpo["loss"] == "dpo"
        # The chain of a branch is rebuilt from the files and verified link by link.
        links = chain.rebuild_chain(str(out / f"seed{seed}_spo_2" / "round2_harmless.safetensors"))
        assert [m["round"] for m in links] == [0, 1, 2] and links[1]["path"] == str(pi1)


def test_branch_refuses_a_changed_parent(quick_study, tmp_path):
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
    out = tmp_path_factory.mktemp("compare3")
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        records, summary = compare.main(["--rounds", "3", "--quick", "--out", str(out), "--alphas", "1",
                                         "--beta2s", "1"])
    finally:
        mp.undo()
    return out, records, summary


def test_round3_study_branches_every_method_from_the_same_pi2(quick_round3):
    out, records, summary = quick_round3
    assert sorted((r["seed"], r["method"]) for r in records) == [
        (0, "dpo"), (0, "exact"), (0, "telescoped"), (1, "dpo"), (1, "exact"), (1, "telescoped")]
    assert (out / "round3.png").stat().st_size > 0 and len((out / "results.jsonl").read_text().splitlines()) == 6
    for seed in (0, 1):
        pi2 = out / f"seed{seed}" / "round2_harmless.safetensors"
        meta2 = read_metadata(pi2)
        beta1 = read_metadata(out / f"seed{seed}" / "round1_helpful.safetensors")["beta"]
        paths = {m: out / f"seed{seed}_r3_{m}_1" / "round3_concise.safetensors" for m in ("exact", "telescoped", "dpo")}
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
        assert metas["telescoped"]["alpha"] == 1.0 and metas["dpo"]["margin_mode"] is None
        assert metas["dpo"]["lambdas"] == [0.0, 0.0] and metas["dpo"]["loss"] == "dpo"
    for r in records:
        # Changes are pi_3 minus the SAME seed's pi_2, on the exact evaluation.
        assert r["measured"]["concise gained"] == pytest.approx(r["pi3"]["exact/concise_all"] - r["pi2"]["exact/concise_all"])
        assert r["measured"]["help kept"] == pytest.approx(r["pi3"]["exact/helpful_benign"] - r["pi2"]["exact/helpful_benign"])
        if r["method"] == "dpo":  # no margin: both predictions are the same E3 step from pi_2
            assert r["from_margin"] == pytest.approx(r["optimum"])
    assert set(summary) == {1.0} and set(summary[1.0]) == {"measured", "from_margin", "optimum"}
    assert len(summary[1.0]["measured"]["help kept"]["diffs"]) == 2
