"""Progress of long work (eval, wise, make-shards): a tqdm bar on a terminal, periodic lines in logs."""
import io

from open_clip_starft.eval.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_on_a_non_terminal_and_none_when_disabled():
    log = io.StringIO()
    with Progress(10, "eval ft × imagenet", stream=log, interval_s=0) as bar:
        for _ in range(3):
            bar.update(2)
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in log.getvalue()
    assert lines[0].startswith("eval ft × imagenet: 2/10 img (20 %)") and lines[-1].startswith("eval ft × imagenet: 6/10 img (60 %)")
    assert "elapsed" in lines[-1] and "left" in lines[-1] and "img/s" in lines[-1]

    quiet = io.StringIO()
    with Progress(10, "x", stream=quiet, interval_s=30) as bar:  # within the interval: no line yet
        bar.update(5)
    with Progress(10, "x", stream=quiet, interval_s=0, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""

    unknown = io.StringIO()
    with Progress(None, "shards", stream=unknown, interval_s=0) as bar:
        bar.update(7)
    assert unknown.getvalue().startswith("shards: 7 img [")


def test_a_bar_on_a_terminal_and_messages_that_keep_it():
    term, out = Terminal(), io.StringIO()
    with Progress(4, "make-shards", stream=term) as bar:
        bar.update(3)
        bar.write("skipped unreadable image a.jpg", file=out)
        assert bar.bar is not None and bar.bar.n == 3  # tqdm's own bar (it redraws at most every 0.1 s)
    assert term.getvalue().startswith("\rmake-shards:   0%|") and "| 0/4 [" in term.getvalue()
    assert out.getvalue() == "skipped unreadable image a.jpg\n"
