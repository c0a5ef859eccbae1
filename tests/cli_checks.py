"""What a refused command line must look like, for both entry points (misa.train, misa.finetune): exit 2,
one message naming the argument, no traceback, and no file created or changed."""


def snapshot(folder):
    """Every file under `folder` with its bytes (to prove nothing changed)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(main, capsys, argv, text, workdir):
    before = snapshot(workdir)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert text in err, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert snapshot(workdir) == before
