"""`gptoss-jax eval groups` and the PNG plot of perplexity vs int4 group size (gptoss_jax.evaluation): a valid PNG
of the expected size, the table / JSON forms, one-line errors for a bad --plot path or a missing matplotlib, and the
sweep end to end on the shipped tiny model (RTN; the AWQ rows go through the same code with the converter's AWQ)."""

import json
import struct
import sys

import pytest

from gptoss_jax import cli, demo, evaluation
from gptoss_jax.evaluation import EvaluationError, PlotUnavailable, SweepRow, format_sweep, plot_group_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG spec puts first (after the 8-byte signature)."""
    assert data[:8] == PNG_SIGNATURE, data[:8]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


ROWS = [SweepRow("bf16", None, 40.0, 3.69, 999, 4_600_000, 1.0),
        SweepRow("rtn", 32, 40.4, 3.70, 999, 2_100_000, 1.0), SweepRow("awq", 32, 40.1, 3.69, 999, 2_100_000, 1.0),
        SweepRow("rtn", 64, 40.8, 3.71, 999, 2_000_000, 1.0), SweepRow("awq", 64, 40.4, 3.70, 999, 2_000_000, 1.0),
        SweepRow("rtn", 128, 41.6, 3.73, 999, 1_900_000, 1.0), SweepRow("awq", 128, 40.6, 3.70, 999, 1_900_000, 1.0)]


def test_plot_is_a_valid_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "groups.png"
    plot_group_sweep(ROWS, out)
    data = out.read_bytes()
    assert png_size(data) == (640, 420)  # figsize 6.4 x 4.2 inches at 100 dpi
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"  # complete: ends with the IEND chunk
    assert [p.name for p in tmp_path.iterdir()] == ["groups.png"]  # no temporary file left


def test_plot_into_a_missing_folder_is_one_error(tmp_path):
    with pytest.raises(EvaluationError, match=r"^--plot .*: folder .* does not exist$"):
        plot_group_sweep(ROWS, tmp_path / "missing" / "groups.png")
    assert not (tmp_path / "missing").exists()


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(PlotUnavailable, match=r"pip install 'gptoss-jax\[plot\]'"):
        plot_group_sweep(ROWS, tmp_path / "groups.png")
    assert list(tmp_path.iterdir()) == []


def test_table_and_json_forms():
    table = format_sweep(ROWS).splitlines()
    assert table[0] == "| group size | int4 RTN | int4 AWQ | bf16 (source) |"
    assert table[3] == "| 64 | 40.80 (+2.0%) | 40.40 (+1.0%) | 40.00 |"
    d = evaluation.sweep_to_dict(ROWS)
    assert [r["label"] for r in d["rows"]][:3] == ["bf16 (source)", "int4 RTN g32", "int4 AWQ g32"]
    assert d["rows"][5]["vs_source_percent"] == pytest.approx(4.0)


@pytest.fixture
def heldout(tmp_path):
    text = (demo.shipped_model_dir() / "heldout.txt").read_text(encoding="utf-8")
    path = tmp_path / "held.txt"
    path.write_text(text[:3000], encoding="utf-8")
    return path


@pytest.mark.parametrize("extra, message", [
    (["--plot", "{tmp}/missing/g.png"], "--plot {tmp}/missing/g.png: folder {tmp}/missing does not exist"),
    (["--plot", "{tmp}/held.txt"], "--plot {tmp}/held.txt: exists; pass --force to replace it"),
    (["--json", "{tmp}"], "--json {tmp}: is a folder; name a file"),
    (["--group-sizes", "32,x"], "argument --group-sizes: expected comma-separated integers, got '32,x'"),
])
def test_cli_bad_output_is_one_line_before_any_work(heldout, tmp_path, capsys, extra, message):
    tmp = str(tmp_path)
    argv = ["eval", "groups", str(demo.shipped_model_dir()), str(heldout), *[a.format(tmp=tmp) for a in extra]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message.format(tmp=tmp)), err
    assert "Traceback" not in "\n".join(err) and sorted(p.name for p in tmp_path.iterdir()) == ["held.txt"]


def test_cli_plot_without_matplotlib_is_one_line(heldout, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluation, "_plot_available", lambda: False)
    for argv in (["eval", "groups", str(demo.shipped_model_dir()), str(heldout)], ["demo"]):
        assert cli.main([*argv, "--plot", str(tmp_path / "g.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith("--plot needs matplotlib: pip install 'gptoss-jax[plot]'"), err
    assert not (tmp_path / "g.png").exists()


def test_demo_plot_into_a_missing_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["demo", "--plot", str(tmp_path / "missing" / "g.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"gptoss-jax demo: error: --plot {tmp_path}/missing/g.png: folder "
                                        f"{tmp_path}/missing does not exist"), err


@pytest.mark.slow  # ~20 s: two conversions and three models scored
def test_cli_groups_end_to_end_rtn(heldout, tmp_path, capsys):
    """The shipped model and its RTN int4 conversions at g32 and g128: JSON rows, the table on stdout, a valid PNG;
    int4 perplexity is finite and close to the source's (within 10 %), and the rows equal a direct evaluation."""
    pytest.importorskip("matplotlib")
    import gptoss_jax
    from gptoss_jax.evaluation import perplexity
    src = demo.shipped_model_dir()
    js, png = tmp_path / "g.json", tmp_path / "g.png"
    assert cli.main(["eval", "groups", str(src), str(heldout), "--no-awq", "--group-sizes", "32,128",
                     "--eval-tokens", "300", "--json", str(js), "--plot", str(png)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["method"], r["group_size"]) for r in rows] == [("bf16", None), ("rtn", 32), ("rtn", 128)]
    base = rows[0]["perplexity"]
    model = gptoss_jax.load(src, dtype="bfloat16", max_seq_len=256)
    want = perplexity(model, model.encode(heldout.read_text(encoding="utf-8"))[:300], max_length=256, stride=128)
    assert base == pytest.approx(want.perplexity, rel=1e-6) and rows[0]["num_scored"] == 299
    for r in rows[1:]:
        assert 0.9 * base < r["perplexity"] < 1.1 * base and r["weights_bytes"] < rows[0]["weights_bytes"]
    assert "| 32 | " in capsys.readouterr().out
    assert png_size(png.read_bytes()) == (640, 420)
