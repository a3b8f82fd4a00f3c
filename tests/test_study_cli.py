"""`dcml study` on the command line: the grids in --help, an unknown --only before anything runs."""

import pytest

from dcml_app.cli import main as dcml_main
from dcml_app.study import STUDIES, grid_text


def test_help_lists_every_grid_and_its_number_of_runs(capsys):
    dcml_main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "embedding-size: 6 runs, embedding_dim = 32, 64, 128, 256, 512, 1024" in text
    assert "loss: 4 runs, loss = contrastive, triplet, margin, proxy_anchor" in text
    assert all(" ".join(grid_text(name).split()) in text for name in STUDIES)


def test_unknown_only_point_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        dcml_main(["study", "loss", "--only", "hinge"])
    captured = capsys.readouterr()
    assert done.value.code == 2 and captured.out == ""
    assert captured.err.strip() == ("error: --only hinge: not a point of the loss grid; pick from contrastive, "
                                    "triplet, margin, proxy_anchor")
    assert not list(tmp_path.iterdir())
