import numpy as np
import pytest

from drafters.corpus import Corpus


def test_round_trip(tmp_path):
    c = Corpus([[1, 2, 3], [], [4], [5, 6]], vocab_size=10)
    assert len(c) == 3  # empty documents are dropped
    c.save(tmp_path / "c.npz")
    d = Corpus.load(tmp_path / "c.npz")
    assert [x.tolist() for x in d.documents()] == [[1, 2, 3], [4], [5, 6]] and d.vocab_size == 10
    assert d.sources is None and Corpus.sources_of(tmp_path / "c.npz") is None  # provenance unknown
    Corpus([[1]], vocab_size=10, sources=[81, "q2"]).save(tmp_path / "s.npz")
    assert Corpus.load(tmp_path / "s.npz").sources == Corpus.sources_of(tmp_path / "s.npz") == ["81", "q2"]


@pytest.mark.parametrize("docs, match", [([], "empty"), ([[], []], "empty"), ([[1, 10]], "outside"),
                                         ([[-1]], "outside")], ids=["none", "all-empty", "id=vocab", "negative"])
def test_bad_corpora(docs, match):
    with pytest.raises(ValueError, match=match):
        Corpus(docs, vocab_size=10)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="specdec corpus"):
        Corpus.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a specdec corpus"):
        Corpus.load(tmp_path / "other.npz")
