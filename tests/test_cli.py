from memorizing_transformers.cli import main


def test_demo_quick_streams_with_memory(capsys, tmp_path):
    document = tmp_path / "doc.py"
    document.write_text("def f(x):\n    return x + 1\n" * 200)
    main(["demo", "--quick", "--preset", "tiny", "--file", str(document)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    fills = [int(row.split("|")[5].replace(",", "")) for row in rows]
    assert fills == [16, 32, 48, 64]  # tiny: 16-token segments, memory of 128
    assert "mean loss" in out
