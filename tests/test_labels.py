import numpy as np
import pytest

from raycxr.labels import UnionLabelSpace, apply_uncertain_policy, canonical_name


def test_synonyms():
    assert canonical_name("Effusion") == canonical_name("Pleural Effusion") == "Pleural Effusion"
    assert canonical_name("Pleural_Thickening") == "Pleural Thickening"
    assert canonical_name("Infiltrate") == "Infiltration"
    assert canonical_name("My Hospital Finding") == "My Hospital Finding"
    assert canonical_name("Foo", {"foo": "Bar"}) == "Bar"


def test_union_and_masks():
    u = UnionLabelSpace.build({"nih": ["Effusion", "Mass"], "chex": ["Pleural Effusion", "Edema"]})
    assert u.names == ["Pleural Effusion", "Mass", "Edema"]
    lab = np.array([[1, -1], [np.nan, 0]], np.float32)
    t, m = u.to_union("chex", lab, policy="ignore")
    # Effusion known positive; Mass never annotated by chex; Edema uncertain dropped / negative
    np.testing.assert_array_equal(t, [[1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(m, [[1, 0, 0], [0, 0, 1]])
    t, m = u.to_union("chex", lab, policy="ones")
    np.testing.assert_array_equal(t, [[1, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(m, [[1, 0, 1], [0, 0, 1]])
    t, m = u.to_union("chex", lab, policy="zeros")
    np.testing.assert_array_equal(t[0], [1, 0, 0])
    np.testing.assert_array_equal(m[0], [1, 0, 1])


def test_all_missing_row_gives_empty_mask():
    u = UnionLabelSpace.build({"a": ["X", "Y"]})
    t, m = u.to_union("a", np.full((1, 2), np.nan))
    assert m.sum() == 0 and t.sum() == 0


def test_lsr_ones_in_range_and_missing_untouched():
    lab = np.array([[-1, np.nan, 1, 0]] * 50, np.float32)
    out = apply_uncertain_policy(lab, "lsr_ones", rng=np.random.default_rng(0))
    assert ((out[:, 0] >= 0.55) & (out[:, 0] <= 0.85)).all()
    assert np.isnan(out[:, 1]).all() and (out[:, 2] == 1).all() and (out[:, 3] == 0).all()
    with pytest.raises(ValueError, match="unknown uncertain-label policy"):
        apply_uncertain_policy(lab, "maybe")


def test_site_whose_labels_collide_is_rejected():
    with pytest.raises(ValueError, match="map to the same class"):
        UnionLabelSpace.build({"h": ["Effusion", "Pleural Effusion"]})


def test_sorted_union_keeps_mapping():
    u = UnionLabelSpace.build({"a": ["Zeta", "Alpha"], "b": ["Mass"]}, sort=True)
    assert u.names == ["Alpha", "Mass", "Zeta"]
    t, m = u.to_union("a", np.array([[1, 0]]))
    np.testing.assert_array_equal(t, [[0, 0, 1]])
    np.testing.assert_array_equal(m, [[1, 0, 1]])
