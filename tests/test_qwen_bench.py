

def test_flops_table_script(capsys, monkeypatch, qwen_cache):
    import flops_table

    monkeypatch.setenv("ADATP_CACHE_DIR", str(qwen_cache))
    assert flops_table.main(["--frames", "8", "--size", "640x360"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") == 5 and "| Qwen2.5-VL-7B | 4x12x21 | 1008 |" in out and "Qwen3-VL-8B" in out
